"""Ray placements: who samples and who learns when the roles live in Ray actors.

`build_roles` starts vLLM engine actors and a DeepSpeed learner group (dedicated: apart;
colocated: sharing each rank's bundle) and returns objects with the loop's contracts (`Learner`-like, generator-like), so
`OnlineDPOTrainer.train` runs unchanged.
"""

from __future__ import annotations

import logging
import os

import torch

from . import console
from .generation import Rollouts
from .learner_group import LearnerGroup
from .transport import resolve_weight_transport

logger = logging.getLogger(__name__)


def ensure_ray(args) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "PYTHONPATH") if k in os.environ}
    env.update(console.library_log_env(args.log_level))  # quiet actors unless log_level asks
    # Inside `ray job submit`, RAY_ADDRESS names the cluster the job was submitted to.
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, **console.ray_init_kwargs(args.log_level))
    else:  # a local cluster owned by this process, even if `ray start` left one running here
        ray.init(address="local", num_cpus=args.ray_num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": env}, object_store_memory=512 << 20,
                 **console.ray_init_kwargs(args.log_level))


class RemoteGenerator:
    """vLLM engine actors used like one generator: prompts split across engines, completions
    merged back into one block layout; `sync_weights` has the learner group push to all of them."""

    def __init__(self, engines, names, probe_ids, timeout_s: float, tolerance: float | None, dtype: torch.dtype,
                 transport: str = "odpo_gloo", workers_per_engine: int = 1):
        import ray

        self.ray, self.engines, self.names = ray, engines, names
        self.transport, self.workers_per_engine = transport, workers_per_engine
        self.probe_ids, self.timeout_s = probe_ids, timeout_s
        self.tolerance = tolerance if tolerance is not None else (1e-3 if dtype == torch.float32 else 0.1)
        self.policy_version = -1

    def _get(self, refs, call: str):
        ready, pending = self.ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            late = [self.names[refs.index(ref)] for ref in pending]
            raise TimeoutError(f"generator: {', '.join(late)} did not answer {call}() within {self.timeout_s:.0f}s")
        return self.ray.get(refs)

    def generate(self, prompt_ids: list[list[int]], num_samples: int, seed: int) -> Rollouts:
        count = len(self.engines)
        size, extra = divmod(len(prompt_ids), count)
        bounds, start = [], 0
        for e in range(count):
            stop = start + size + (e < extra)
            bounds.append((start, stop))
            start = stop
        work = [(e, a, b) for e, (a, b) in enumerate(bounds) if b > a]
        parts = self._get([self.engines[e].generate.remote(prompt_ids[a:b], num_samples, seed + e * 1_000_003)
                           for e, a, b in work], "generate")
        total = len(prompt_ids)
        completions: list = [None] * (num_samples * total)
        logprobs: list = [None] * (num_samples * total)
        ended = torch.zeros(num_samples * total, dtype=torch.bool)
        for (e, a, b), part in zip(work, parts):
            local = b - a
            for j in range(num_samples):
                for i in range(local):
                    row, global_row = j * local + i, j * total + a + i
                    completions[global_row] = part.completion_ids[row]
                    logprobs[global_row] = part.sampling_logprobs[row] if part.sampling_logprobs else None
                    ended[global_row] = part.contains_eos[row]
        return Rollouts(prompt_ids, completions, ended, num_samples, self.policy_version, logprobs)

    def sync_weights(self, learner: LearnerGroup) -> dict[str, float]:
        metrics = learner.push_weights(self.engines, self.names, self.transport, self.workers_per_engine)
        self.policy_version += 1
        if self.probe_ids is not None:
            served = self._get([self.engines[0].sequence_logprobs.remote(self.probe_ids)], "sequence_logprobs")[0]
            gap = (served - learner.sequence_logprobs(self.probe_ids)).abs().max().item()
            if gap > self.tolerance:
                logger.warning("%s serves weights that differ from the learners': logprob gap %.3g > %.3g",
                               self.names[0], gap, self.tolerance)
            metrics["sync/logprob_gap"] = gap
        return metrics

    def shutdown(self) -> None:
        for engine in self.engines:
            self.ray.kill(engine)


def build_roles(model_path: str, tokenizer, args, eos_token_ids, max_model_len: int, probe_ids,
                num_training_steps: int, prompts_per_step: int):
    """Learner ranks in a placement group (one bundle per rank) and vLLM engine actors.

    dedicated: engines on resources of their own (`ray_num_engines` of them).
    colocated: one engine per rank, inside that rank's bundle (same node, same GPU share); on a
    GPU the engine sleeps while the learner trains (`vllm_enable_sleep_mode`).
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    from transformers import AutoConfig

    from .vllm_engine import VLLMGenerator

    ensure_ray(args)
    # The cluster's GPUs, not the driver's: a `ray job submit` driver often runs on a CPU-only head.
    on_gpu = ray.cluster_resources().get("GPU", 0) > 0 and not args.use_cpu
    colocated = args.placement == "colocated"
    transport = resolve_weight_transport(args.weight_transport, on_gpu, colocated)
    cpus = args.ray_cpus_per_actor
    engine_gpus = (0.5 if colocated else 1.0) * args.vllm_tensor_parallel_size if on_gpu else 0.0
    learner = LearnerGroup(model_path, args, tokenizer.pad_token_id, num_training_steps,
                           num_ranks=args.ray_learner_ranks, zero_stage=args.ray_zero_stage,
                           cpus_per_rank=cpus, gpus_per_rank=(0.5 if colocated else 1.0) if on_gpu else 0.0,
                           timeout_s=args.ray_timeout_s, name="learner",
                           bundle_extra={"CPU": cpus, "GPU": engine_gpus} if colocated else None)
    num_engines = args.ray_learner_ranks if colocated else args.ray_num_engines
    names = [f"vllm-engine-{i}" for i in range(num_engines)]
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=args.trust_remote_code)
    Engine = ray.remote(VLLMGenerator)
    # each engine samples its share of the step's completions in one call
    max_sequences = -(-prompts_per_step // num_engines) * args.num_samples
    engines = []
    for i, name in enumerate(names):
        options = dict(name=name, num_cpus=cpus, num_gpus=engine_gpus)
        if colocated:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                learner.placement, placement_group_bundle_index=i)
        engines.append(Engine.options(**options).remote(
            config, tokenizer, args, eos_token_ids, max_model_len, probe_ids=probe_ids, name=name,
            weight_transfer_backend=transport, engine_index=i, max_sequences=max_sequences))
    logger.info("%s placement: %d learner ranks (ZeRO-%d), %d engines, weights over %s", args.placement,
                args.ray_learner_ranks, args.ray_zero_stage, num_engines, transport)
    generator = RemoteGenerator(engines, names, probe_ids, args.ray_timeout_s, args.vllm_sync_tolerance,
                                torch.bfloat16 if args.bf16 else torch.float32, transport,
                                args.vllm_tensor_parallel_size)
    return learner, generator
