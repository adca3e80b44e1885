"""Placements: one function per placement builds the run's roles (`roles.Roles`).

- `build_in_process_roles`: everything in this process (the reference's shape).
- `build_dedicated_roles`: vLLM engine actors on resources of their own, DeepSpeed learner ranks
  in a placement group, reward models in reward-worker actors.
- `build_colocated_roles`: one engine inside each learner rank's bundle (same node, same GPU
  share; on a GPU the engine sleeps while the rank trains).
- `build_server_roles` (`vllm_mode="server"`): the learner in this process, a vLLM server the
  user started (`python -m odpo_vllm.serve`) as the generator; no Ray.

`build_roles` picks the builder from the config.

The training loop receives the roles and never asks which placement built them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from odpo_vllm import multimodal, validation
from odpo_vllm.primitives import console
from odpo_vllm.rewards.scorer import Rewards
from odpo_vllm.runtime import resources
from odpo_vllm.runtime.engine_pool import ENGINE_CONCURRENCY, EnginePool
from odpo_vllm.runtime.publisher import LocalWeightPublisher, RayWeightPublisher
from odpo_vllm.runtime.roles import Roles
from odpo_vllm.runtime.watchdog import Watchdog, cluster_roots
from odpo_vllm.sampling.remote_generator import RemoteGenerator
from odpo_vllm.weights.adapter import adapter_rank, choose_lora_sync, decide_lora_sync, engine_refusal
from odpo_vllm.weights.wire import GLOO_BACKEND

logger = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """What every placement needs to build its roles (decided by the trainer from the user's input)."""

    model: Any  # a model object or a path / hub id
    ref_model: Any
    peft_config: Any
    tokenizer: Any
    args: Any  # OnlineDPOConfig
    eos_token_ids: set[int]
    max_model_len: int
    probe_ids: list[int]
    num_training_steps: int
    prompts_per_step: int
    reward_funcs: Any
    reward_processing_classes: Any = None
    optimizers: tuple = (None, None)
    processor: Any = None  # a vision-language model's processor (`multimodal.py`)


def _engine_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)


# --------------------------------------------------------------------------------------------
# In process
# --------------------------------------------------------------------------------------------
def _local_learner_and_rewards(spec: RunSpec):
    """The learner (policy, reference, optimizer) and the rewards in this process."""
    from odpo_vllm.learning.learner import Learner
    from odpo_vllm.learning.models import prepare_policy_and_reference

    args = spec.args
    device = torch.device("cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu")
    model, ref_model = prepare_policy_and_reference(spec.model, spec.ref_model, spec.peft_config, args, device)
    validation.check_models(model, ref_model, spec.tokenizer)  # a reference given as a path is loaded now
    optimizer, scheduler = spec.optimizers
    learner = Learner(model, ref_model, args, spec.tokenizer.pad_token_id, spec.num_training_steps, optimizer,
                      scheduler)
    rewards = Rewards(spec.reward_funcs, spec.reward_processing_classes, args.reward_weights,
                      args.missing_eos_penalty, args.model_init_kwargs, args.trust_remote_code, device)
    return learner, rewards


def build_in_process_roles(spec: RunSpec) -> Roles:
    from odpo_vllm.sampling.hf_sampler import TransformersGenerator
    from odpo_vllm.sampling.custom_code import engine_model_impl
    from odpo_vllm.sampling.vllm_engine import VLLMGenerator

    args = spec.args
    learner, rewards = _local_learner_and_rewards(spec)
    model = learner.model
    use_vllm = args.use_vllm if args.use_vllm is not None else validation.vllm_available()
    generator = None
    if use_vllm and spec.processor is not None:
        generator = vision_engine_or_none(model, spec)
    elif use_vllm:
        impl = engine_model_impl(model.config, args.vllm_model_impl, log=False)  # the engine says which
        lora_sync = choose_lora_sync(args.lora_sync, model, torch.cuda.is_available() and not args.use_cpu)
        try:
            generator = VLLMGenerator(model, spec.tokenizer, args, spec.eos_token_ids, spec.max_model_len,
                                      probe_ids=spec.probe_ids, max_sequences=spec.prompts_per_step * args.num_samples,
                                      lora_rank=adapter_rank(model) if lora_sync == "adapter" else None)
        except RuntimeError as err:
            if impl == args.vllm_model_impl:  # an architecture vLLM has code for: a real failure
                raise
            # nor could vLLM's Transformers backend run it (e.g. custom code without an AutoModel
            # entry): sample with transformers, as the reference does
            logger.warning("vLLM cannot run %s (%s); sampling with transformers' generate instead (use_vllm=False)",
                           ", ".join(model.config.architectures or []), str(err).splitlines()[0][:300])
    sampling = args.sampling_settings()
    if spec.processor is not None:  # an image token in a completion would ask for image features that do not exist
        sampling["suppress_tokens"] = sorted(multimodal.image_token_ids(spec.processor))
    if generator is None:
        generator = TransformersGenerator(model, spec.eos_token_ids, spec.tokenizer.pad_token_id,
                                          sampling, args.generation_batch_size, learner.autocast_dtype)
    lora_sync = "adapter" if getattr(generator, "adapters", None) is not None else "merged"
    publisher = LocalWeightPublisher(generator, learner, spec.probe_ids, args.vllm_sync_tolerance, lora_sync)
    return Roles(generator, learner, rewards, publisher, background_sampling=False)


def vision_engine_or_none(model, spec: RunSpec):
    """The vLLM engine for a vision-language policy, or None (the transformers sampler) with one
    logged line saying why: vLLM's multi-modal models import torchvision, and an architecture or
    build the engine cannot run must not stop a run that transformers can sample."""
    from odpo_vllm.sampling.vllm_engine import VLLMGenerator

    architecture = ", ".join(model.config.architectures or [type(model).__name__])
    reason = multimodal.vision_engine_unavailable()
    if reason is None:
        try:
            engine = VLLMGenerator(model, spec.processor, spec.args, spec.eos_token_ids, spec.max_model_len,
                                   probe_ids=spec.probe_ids,
                                   max_sequences=spec.prompts_per_step * spec.args.num_samples)
            engine.suppress_token_ids = sorted(multimodal.image_token_ids(spec.processor))
            return engine
        except Exception as err:  # noqa: BLE001 (any engine failure: the transformers sampler samples)
            reason = f"the engine failed to start: {str(err).splitlines()[0][:300]}"
    logger.warning("use_vllm: vLLM cannot sample the vision-language model %s here (%s); sampling with "
                   "transformers' generate instead", architecture, reason)
    return None


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------
def resolve_weight_transport(requested: str, on_gpu: bool, colocated: bool) -> str:
    """The backend that moves weights from learner ranks to engine actors. `auto`: CUDA IPC when
    each engine shares its rank's GPU, NCCL between separate GPUs, odpo_gloo without GPUs."""
    if requested == "auto":
        return ("ipc" if colocated else "nccl") if on_gpu else GLOO_BACKEND
    if requested in ("nccl", "ipc") and not on_gpu:
        raise ValueError(f"OnlineDPOConfig.weight_transport: {requested!r} needs CUDA GPUs and the cluster has none; "
                         f"use 'auto' or '{GLOO_BACKEND}'")
    if requested == "ipc" and not colocated:
        raise ValueError("OnlineDPOConfig.weight_transport: 'ipc' shares GPU memory, so each engine must sit on its "
                         "learner rank's GPU: use placement='colocated', or 'nccl' for placement='dedicated'")
    return requested


@contextlib.contextmanager
def own_session():
    """The Ray processes started inside (GCS, raylet, agents; the raylet's workers follow) run in a
    session of their own. A signal to the driver's process group (`kill -- -PGID`, systemd,
    `scancel`) then reaches the driver alone, which checkpoints and closes the cluster itself;
    otherwise it also reached the raylet, and the run died as "learner-rank0 died" without a
    checkpoint. Ray starts them through `ConsolePopen`; a driver SIGKILLed is still covered by
    the watchdog, which knows their pids."""
    from ray._private import services

    original = services.ConsolePopen

    class SessionPopen(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = SessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = original


def ensure_ray(args) -> list:
    """Connect to Ray. When this call starts a local cluster, the run owns it: the closers that
    shut it down (and the watchdog that kills it if this process is killed), else []."""
    import ray

    if ray.is_initialized():
        return []
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "PYTHONPATH") if k in os.environ}
    env.update(console.library_log_env(args.log_level))  # quiet actors unless log_level asks
    # Inside `ray job submit`, RAY_ADDRESS names the cluster the job was submitted to.
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, **console.ray_init_kwargs(args.log_level))
        return []
    # a local cluster owned by this process, even if `ray start` left one running here
    with own_session():
        # Ray starts its workers at nice 15: beside any other work on the machine at the usual
        # priority, the engines and ranks (this run's whole work) got 3% of a core each and missed
        # their timeouts; they run at the driver's priority instead.
        ray.init(address="local", num_cpus=args.ray_num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": env}, object_store_memory=512 << 20, _system_config={"worker_niceness": 0},
                 **console.ray_init_kwargs(args.log_level))
    closers = [ray.shutdown]
    try:
        closers.insert(0, Watchdog(cluster_roots()).close)  # closed in reverse order: after ray.shutdown
    except Exception as err:  # the run works without it; only a SIGKILLed driver would leave processes
        logger.warning("no watchdog for this run's Ray cluster (%s): if this process is killed, Ray's agents "
                       "may outlive it for a minute", err)
    return closers


def num_reward_workers(args, local: Rewards) -> int:
    """Reward-worker actors the placement starts: none without a reward model (callables and
    judges run in the driver), else `ray_num_reward_workers` (default 1)."""
    return (args.ray_num_reward_workers or 1) if local.model_indices else 0


def _start_reward_workers(spec: RunSpec, local: Rewards, on_gpu: bool, cpus: float | None = None,
                          faults: dict | None = None):
    """Reward models in `ray_num_reward_workers` actors of `cpus` CPUs each (default:
    `ray_cpus_per_reward_worker`, or what `resources.reward_worker_cpus` gives on this cluster)
    behind a `RemoteRewards`; `local` itself when there is no reward model."""
    import ray

    from odpo_vllm.rewards.workers import RemoteRewards, RewardWorker

    args = spec.args
    count = num_reward_workers(args, local)
    if not count:
        return local  # callables and judges only: nothing to place
    if cpus is None:
        cpus = resources.resource_demand(args, args.placement == "colocated", on_gpu, count,
                                         ray.cluster_resources().get("CPU", 0.0))[-1].cpus
    Worker = ray.remote(RewardWorker)

    def start_worker(name: str, attempt: int):
        return Worker.options(name=name if attempt == 0 else f"{name}-restart{attempt}", num_cpus=cpus,
                              num_gpus=args.reward_gpus if on_gpu else 0).remote(
            local.model_specs, args.model_init_kwargs, args.trust_remote_code,
            args.ray_threads_per_actor or max(int(cpus), 1))

    remote = RemoteRewards(local, start_worker, count, args.ray_timeout_s, args.ray_max_engine_restarts, faults,
                           args.ray_start_timeout_s)
    try:
        remote.wait_ready()
    except BaseException:
        remote.close()
        raise
    return remote


def _build_ray_roles(spec: RunSpec, colocated: bool) -> Roles:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from transformers import AutoConfig

    from odpo_vllm.learning.group import LearnerGroup
    from odpo_vllm.sampling.vllm_engine import VLLMGenerator

    args = spec.args
    if spec.ref_model is not None:
        raise ValueError("ref_model: with a Ray placement the reference is a frozen copy of the policy (or, with "
                         "peft_config, the policy with its adapter disabled); pass ref_model=None")
    if not isinstance(spec.model, str):  # the ranks load the policy themselves: they need a path
        path = os.path.join(args.output_dir, "initial_policy")
        spec.model.save_pretrained(path)
        spec.model = path
    roles = Roles(None, None, None, None, background_sampling=True, closers=ensure_ray(args))
    try:
        # The cluster's GPUs, not the driver's: a `ray job submit` driver often runs on a CPU-only head.
        cluster = ray.cluster_resources()
        on_gpu = cluster.get("GPU", 0) > 0 and not args.use_cpu
        transport = resolve_weight_transport(args.weight_transport, on_gpu, colocated)
        cpus = args.ray_cpus_per_actor
        engine_gpus = (0.5 if colocated else 1.0) * args.vllm_tensor_parallel_size if on_gpu else 0.0
        local_rewards = Rewards(spec.reward_funcs, spec.reward_processing_classes, args.reward_weights,
                                args.missing_eos_penalty, args.model_init_kwargs, args.trust_remote_code,
                                load_models=False)
        # Before any actor or placement group: one Ray cannot hold would wait in silence.
        demand = resources.resource_demand(args, colocated, on_gpu, num_reward_workers(args, local_rewards),
                                           cluster.get("CPU", 0.0))
        no_engine = multimodal.vision_engine_unavailable() if spec.processor is not None else None
        if no_engine is not None:  # no engine starts: the driver samples on a copy of the policy
            demand = [share for share in demand if share.role != "vLLM engines"]
        joined = not roles.closers  # a cluster this run did not start: shared, perhaps autoscaling
        resources.ensure_resources(args.placement, demand, joined, args.ray_wait_for_resources_s, args.ray_timeout_s)
        logger.info("%s placement needs %s", args.placement, resources.describe(demand))
        reward_cpus = next((share.cpus for share in demand if share.role == "reward workers"), None)
        roles.rewards = _start_reward_workers(spec, local_rewards, on_gpu, reward_cpus, roles.faults)
        roles.learner = LearnerGroup(
            spec.model, args, spec.tokenizer.pad_token_id, spec.num_training_steps,
            num_ranks=args.ray_learner_ranks, zero_stage=args.ray_zero_stage, cpus_per_rank=cpus,
            gpus_per_rank=(0.5 if colocated else 1.0) if on_gpu else 0.0, timeout_s=args.ray_timeout_s,
            start_timeout_s=args.ray_start_timeout_s,
            name="learner", bundle_extra={"CPU": cpus, "GPU": engine_gpus} if colocated else None,
            peft_config=spec.peft_config,
            # batches can be in flight while the learners step (or the learners step past the
            # published version between pushes): rank 0 keeps the published version for an engine
            # that replaces one which died holding them
            keep_published=(args.async_steps >= 1 or args.weight_sync_steps > 1) and args.ray_max_engine_restarts > 0)
        # Before the engines start, and whatever save_strategy says: a stop signal saves a checkpoint,
        # the command line saves the final model from rank 0, and a resume is only known at train().
        roles.learner.check_shared_storage(args.output_dir)
        if no_engine is not None:
            from odpo_vllm.runtime.driver_publisher import driver_sampling

            roles.generator, roles.publisher = driver_sampling(spec, roles.learner, no_engine)
            logger.info("%s placement: %d learner ranks (ZeRO-%d), sampling in the driver", args.placement,
                        args.ray_learner_ranks, args.ray_zero_stage)
            return roles
        num_engines = args.ray_learner_ranks if colocated else args.ray_num_engines
        config = AutoConfig.from_pretrained(spec.model, trust_remote_code=args.trust_remote_code)
        adapter = roles.learner.call("lora_adapter")[0]  # what the ranks built from peft_config
        lora_sync = "merged" if adapter is None else decide_lora_sync(
            args.lora_sync, adapter["refusal"] or engine_refusal(args.vllm_tensor_parallel_size,
                                                                 vision=spec.processor is not None), on_gpu)
        adapter_config = adapter["config"] if lora_sync == "adapter" else None
        Engine = ray.remote(**ENGINE_CONCURRENCY)(VLLMGenerator)
        # each engine samples its share of the step's completions in one call
        max_sequences = -(-spec.prompts_per_step // num_engines) * args.num_samples
        processing_class = spec.tokenizer if spec.processor is None else spec.processor  # a VLM's engine: images

        def start_engine(name: str, index: int, attempt: int, files_dir: str):
            """Engine `name` in place `index`; a replacement (`attempt` > 0) gets the same resources
            and place under a fresh Ray name. `files_dir`: its start-up files, which the pool removes."""
            options = dict(name=name if attempt == 0 else f"{name}-restart{attempt}", num_cpus=cpus,
                           num_gpus=engine_gpus)
            if colocated:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    roles.learner.placement, placement_group_bundle_index=index)
            return Engine.options(**options).remote(
                config, processing_class, args, spec.eos_token_ids, spec.max_model_len, probe_ids=spec.probe_ids,
                name=name, weight_transfer_backend=transport, engine_index=index, max_sequences=max_sequences,
                files_dir=files_dir, suppress_token_ids=sorted(multimodal.image_token_ids(spec.processor)),
                adapter_config=adapter_config)

        roles.engine_pool = EnginePool(start_engine, num_engines, args.ray_timeout_s, args.ray_max_engine_restarts,
                                       roles.faults, args.ray_start_timeout_s)
        roles.engine_pool.wait_started()
        roles.publisher = RayWeightPublisher(roles.learner, roles.engine_pool, transport, spec.probe_ids,
                                             args.vllm_sync_tolerance, _engine_dtype(args), args.ray_timeout_s,
                                             args.vllm_tensor_parallel_size, lora_sync)
        roles.generator = RemoteGenerator(roles.engine_pool, roles.publisher, args.ray_timeout_s)
    except BaseException:
        roles.close()
        raise
    logger.info("%s placement: %d learner ranks (ZeRO-%d), %d engines, weights over %s%s", args.placement,
                args.ray_learner_ranks, args.ray_zero_stage, num_engines, transport,
                " (LoRA adapter pushes)" if lora_sync == "adapter" else "")
    return roles


def build_dedicated_roles(spec: RunSpec) -> Roles:
    """Engines on resources of their own (`ray_num_engines` of them), apart from the learner ranks."""
    return _build_ray_roles(spec, colocated=False)


def build_colocated_roles(spec: RunSpec) -> Roles:
    """One engine per learner rank, inside that rank's bundle (same node, same GPU share); on a GPU
    the engine sleeps while the learner trains (`vllm_enable_sleep_mode`)."""
    return _build_ray_roles(spec, colocated=True)


# --------------------------------------------------------------------------------------------
# A vLLM server
# --------------------------------------------------------------------------------------------
def build_server_roles(spec: RunSpec) -> Roles:
    """The learner and the rewards in this process; the generator is a vLLM server the user
    started (`python -m odpo_vllm.serve`), fed over the weight transport the server names. The
    server must answer /health within `vllm_server_timeout` (checked before the policy loads),
    and must serve this policy's architecture. Not replaced if it dies: the call that finds it
    gone fails with an error naming it."""
    from odpo_vllm.sampling.server_client import ServerClient, ServerGenerator, server_url
    from odpo_vllm.runtime.publisher import ServerWeightPublisher

    args = spec.args
    client = ServerClient(server_url(args), args.vllm_server_timeout)
    served = client.wait_for_health(args.vllm_server_timeout)
    learner, rewards = _local_learner_and_rewards(spec)
    roles = Roles(None, learner, rewards, None, background_sampling=True)
    try:
        attach = {"max_model_len": spec.max_model_len, "sampling": args.sampling_settings(),
                  "structured_outputs_regex": args.vllm_structured_outputs_regex,
                  "eos_token_ids": sorted(spec.eos_token_ids)}
        roles.publisher = ServerWeightPublisher(client, learner, served, spec.probe_ids, args.vllm_sync_tolerance,
                                                args.ray_timeout_s, args.vllm_group_port, attach)
        roles.generator = ServerGenerator(client, args.ray_timeout_s, roles.publisher.dtype, roles.publisher.name)
    except BaseException:
        roles.close()
        raise
    logger.info("server mode: sampling on %s (%s), weights over %s", client.url, served["model"],
                served["weight_transport"])
    return roles


BUILDERS = {"in_process": build_in_process_roles, "dedicated": build_dedicated_roles,
            "colocated": build_colocated_roles}


def build_roles(spec: RunSpec) -> Roles:
    """The roles of the run the config asks for: a vLLM server (`vllm_mode="server"` with vLLM
    sampling), else the placement's builder."""
    args = spec.args
    if args.vllm_mode == "server" and args.use_vllm is not False:
        return build_server_roles(spec)
    return BUILDERS[args.placement](spec)
