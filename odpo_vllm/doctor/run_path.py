"""The run's path, end to end, on the real `OnlineDPOTrainer`: its start (learner, `output_dir`
as every rank sees it, engines, the first weight push and its probe), a few training steps
(sample, learner step, weight push, probe, checkpoint saves), a checkpoint loaded back, and the
GPU rows (NCCL, CUDA IPC, sleep/wake) where the run uses them.

`watch.Phases` gives each part its row: a failure lands in the row of the part that raised it,
and the parts that never ran are skipped, naming that row.
"""

from __future__ import annotations

import os

import torch

from odpo_vllm.doctor.report import FAIL, NA, PASS, SKIP, WARN, Report, describe_error
from odpo_vllm.doctor.watch import Phases, Target
from odpo_vllm.primitives.waits import wait_all, wait_for
from odpo_vllm.run import checkpoint

FIXES = {
    "trainer start": "the error names the setting; python -m odpo_vllm.train --help describes each",
    "learner start": "see the error: the policy must load (model_init_kwargs, dtype), DeepSpeed must start its ranks "
                     "(pip install 'deepspeed==0.19.8'; a slow node: raise --ray_start_timeout_s)",
    "output_dir": "put output_dir on storage mounted at the same path on every node (NFS, Lustre, GCS-fuse)",
    "engine start": "check vllm_gpu_memory_utilization, vllm_kv_cache_memory_bytes, vllm_max_model_len, "
                    "vllm_tensor_parallel_size and that vLLM runs this architecture (vllm_model_impl); "
                    "or use_vllm false (in process)",
    "weight push": "an engine error here (its first forward pass: the probe) is the engine's, see engine start; "
                   "a transport's: weight_transport auto picks NCCL, CUDA IPC or odpo_gloo, and between nodes the "
                   "ports must be open, NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME the interface the nodes share",
    "logprob probe": "the engine serves other weights than the learner trains: the same dtype on both (bf16 or fp16 "
                     "flags), the tested vLLM version; vllm_sync_tolerance sets the bound",
    "one sample": "see the error: max_new_tokens and vllm_max_model_len must fit the engine's context",
    "learner step": "see the error: a smaller per_device_train_batch_size, gradient_checkpointing, or a dtype the "
                    "device supports (bf16 / fp16)",
    "checkpoint save/load": "output_dir must be writable, with room, and shared by every rank",
    "NCCL push": "NCCL between the ranks' and the engines' GPUs: NCCL_DEBUG=INFO, NCCL_SOCKET_IFNAME; "
                 "or weight_transport odpo_gloo",
    "CUDA IPC push": "CUDA IPC needs the engine on its rank's GPU (placement colocated); or weight_transport nccl",
    "sleep/wake": "vllm_enable_sleep_mode false (the colocated engines then keep their GPU memory while the learner "
                  "trains)",
}
START_ROWS = ["learner start", "output_dir", "engine start", "weight push", "logprob probe"]
TRAIN_ROWS = ["one sample", "learner step", "weight push", "logprob probe", "checkpoint save/load"]
GPU_ROWS = ["NCCL push", "CUDA IPC push", "sleep/wake"]
PROBE_TEXT = "Review the film: it was great fun"  # logprobs compared across a checkpoint's save and load
LOAD_EXACT = 1e-6  # the same weights back: the same logprobs, to rounding


# ------------------------------------------------------------------------------------ start
def _engines_answer(_, pool) -> None:
    """After `EnginePool.wait_started`: every engine answers a ping. The pool leaves an engine
    whose start failed to the first push, which replaces it; the doctor wants the failure itself,
    and Ray's error carries it (the engine's own exception)."""
    import ray

    names = pool.names
    refs = [pool.ping(name) for name in names]
    late = wait_all(refs, pool.start_timeout_s)
    if late:
        raise TimeoutError(f"{', '.join(names[refs.index(ref)] for ref in late)} did not answer ping() within "
                           f"{pool.start_timeout_s:.0f}s (ray_start_timeout_s)")
    for name, ref in zip(names, refs):
        try:
            ray.get(ref)
        except Exception as err:  # the engine died starting: say which, and why
            raise RuntimeError(f"{name} did not start ({describe_error(err)})") from err


def start_targets(args) -> list[Target]:
    """The calls of the trainer's start that make each row (the placement's builder makes them)."""
    from odpo_vllm.runtime.publisher import LocalWeightPublisher, RayWeightPublisher

    if args.placement == "in_process":
        from odpo_vllm.learning import learner, models
        from odpo_vllm.sampling.vllm_engine import VLLMGenerator

        return [Target(models, "prepare_policy_and_reference", "learner start"),
                Target(learner.Learner, "__init__", "learner start"),
                Target(VLLMGenerator, "__init__", "engine start"),
                Target(LocalWeightPublisher, "publish", "weight push")]
    from odpo_vllm.learning.group import LearnerGroup
    from odpo_vllm.runtime.engine_pool import EnginePool

    return [Target(LearnerGroup, "__init__", "learner start"),
            Target(LearnerGroup, "check_shared_storage", "output_dir"),
            Target(EnginePool, "__init__", "engine start"),
            Target(EnginePool, "wait_started", "engine start", after=_engines_answer),
            Target(RayWeightPublisher, "publish", "weight push")]


def start_trainer(report: Report, phases: Phases, parsed):
    """The trainer the command line builds from `parsed` (`train.parse_args`), its start timed
    row by row, and the row that failed: (None, row) when it did not start."""
    from odpo_vllm.train import trainer_from_args

    script, args, _ = parsed
    trainer = failure = None
    with phases.watching(start_targets(args)):
        try:
            trainer, _ = trainer_from_args(*parsed)
        except Exception as err:  # the rows below place it
            failure = err
    failed = _start_rows(report, phases, trainer, failure, args)
    if trainer is not None:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for callback in (PrinterCallback, ProgressCallback):  # the table is the doctor's only output
            trainer.remove_callback(callback)
    return trainer, failed


def place_failure(report: Report, rows: list[str], phases: Phases, failure: BaseException) -> str:
    """Fails the row of `rows` whose part raised `failure` (a `trainer start` row when none of the
    watched parts did: a setting the trainer refused) and returns its name."""
    name = phases.failed_row(rows) or "trainer start"
    error = phases.errors.get(name, failure)
    earlier = report.rows.get(name)  # output_dir: the nodes' check passed before the ranks' failed
    seconds = (earlier.seconds or 0.0 if earlier else 0.0) + phases.seconds.get(name, 0.0)
    report.add(name, FAIL, describe_error(error), seconds or None, FIXES[name])
    return name


def _start_rows(report: Report, phases: Phases, trainer, failure, args) -> str | None:
    rows = [row for row in START_ROWS if args.placement != "in_process" or row != "output_dir"]
    failed = place_failure(report, rows, phases, failure) if failure is not None else None
    for name in rows:
        if name == failed or (name == "logprob probe" and phases.ran("weight push")):
            continue  # the probe's row comes with the push's
        if not phases.ran(name):
            if name == "output_dir":
                continue  # the nodes' check stands; the ranks never got to theirs
            if failed is not None:
                report.add(name, SKIP, f"needs {failed}")
            else:  # in process with use_vllm false: no engine, nothing to push
                report.add(name, NA, "use_vllm false: transformers' generate samples with the learner's model")
        elif name in phases.errors:  # raised, and the trainer went on without it (the transformers sampler)
            report.add(name, WARN, f"{describe_error(phases.errors[name])}; the run samples with transformers "
                       "instead", phases.seconds[name], FIXES[name])
        else:
            _passed_start_row(report, phases, name, trainer, args)
    return failed


def _passed_start_row(report: Report, phases: Phases, name: str, trainer, args) -> None:
    seconds = phases.seconds.get(name)
    if name == "output_dir":  # the nodes' check passed earlier; now the ranks agreed
        row = report.rows["output_dir"]
        nodes = getattr(trainer.learner, "nodes", {}) if trainer is not None else {}
        row.detail += "; every rank read it too" + (f" ({', '.join(f'{r} on {n}' for r, n in nodes.items())})"
                                                    if nodes else "")
        row.seconds = (row.seconds or 0.0) + (seconds or 0.0)
    elif name == "weight push":
        push_rows(report, phases, trainer)
    elif name == "learner start":
        report.add(name, PASS, _learner_text(trainer, args), seconds)
    elif name == "engine start":
        report.add(name, PASS, _engine_text(trainer), seconds)


def _learner_text(trainer, args) -> str:
    if args.placement == "in_process":
        if trainer is None:
            return "policy and reference loaded in this process"
        weight = next(trainer.model.parameters())
        return f"policy and reference in this process ({weight.device}, {str(weight.dtype).split('.')[-1]})"
    names = getattr(trainer.learner, "names", []) if trainer is not None else []
    return f"{args.ray_learner_ranks} DeepSpeed rank(s), ZeRO-{args.ray_zero_stage}" + \
        (f": {', '.join(names)}" if names else "")


def _engine_text(trainer) -> str:
    if trainer is None:
        return "the engine(s) started"
    pool = trainer.roles.engine_pool
    if pool is not None:
        return f"{len(pool.names)} engine actor(s): {', '.join(pool.names)}"
    import vllm

    return f"vLLM {vllm.__version__} in this process"


def transport_of(trainer) -> str:
    """What moves the weights: the Ray publisher's backend, vLLM's in-process reload, or nothing
    (the transformers sampler uses the learner's own model)."""
    backend = getattr(trainer.publisher, "backend", None)
    if backend is not None:
        return backend
    return "in-process reload" if hasattr(trainer.generator, "load_weights") else "none"


def push_rows(report: Report, phases: Phases, trainer) -> None:
    """The weight push and the logprob probe rows from every push so far (the start's, each
    step's, the one after a checkpoint load): their metrics are what the run logs as sync/*."""
    transport = transport_of(trainer) if trainer is not None else "the run's transport"
    if transport == "none":
        report.add("weight push", NA, "the transformers sampler uses the learner's model: nothing to move")
        report.add("logprob probe", NA, "no engine")
        return
    pushes = phases.results.get("weight push", [])
    size = max((metrics.get("sync/bytes", 0.0) for metrics in pushes), default=0.0)
    report.add("weight push", PASS, f"{len(pushes)} push(es) over {transport}, {size / 1e6:.2f} MB each",
               phases.seconds.get("weight push"))
    gaps = [metrics["sync/logprob_gap"] for metrics in pushes if "sync/logprob_gap" in metrics]
    tolerance = trainer.publisher.tolerance if trainer is not None else float("inf")
    if not gaps:
        report.add("logprob probe", NA, "no probe sequence")
    elif max(gaps) > tolerance:
        report.add("logprob probe", FAIL, f"engine and learner differ by {max(gaps):.3g} > {tolerance:g} "
                   "(sync/logprob_gap)", fix=FIXES["logprob probe"])
    else:
        report.add("logprob probe", PASS, f"gap {max(gaps):.2g} at most, {len(gaps)} push(es) (tolerance {tolerance:g})")


# ------------------------------------------------------------------------------------ training
class Observations:
    """What the training rows need besides timings: the learner's probe logprobs after each step
    (compared once a checkpoint is loaded back) and the engines' sleep state after each sample."""

    def __init__(self, trainer, sleep_check: bool):
        self.trainer, self.sleep_check = trainer, sleep_check
        self.probe_ids = trainer.tokenizer(PROBE_TEXT)["input_ids"]
        self.after_step: list[torch.Tensor] = []
        self.asleep: list[list[str]] = []
        self.load_detail = ""

    def learner_stepped(self, *_) -> None:
        self.after_step.append(self.trainer.learner.sequence_logprobs(self.probe_ids))

    def sampled(self, *_) -> None:
        if self.sleep_check:
            self.asleep.extend(engines_sleeping(self.trainer))

    def loaded(self, _, trainer, directory: str) -> None:
        """After `checkpoint.load`: the learner computes what it did right after that step (and,
        after later steps, no longer what it computed at the end: the load replaced something)."""
        step = int(directory.rstrip("/").rsplit("-", 1)[-1])
        expected = self.after_step[step - 1]
        gap = (trainer.learner.sequence_logprobs(self.probe_ids) - expected).abs().max().item()
        if gap > LOAD_EXACT:
            raise RuntimeError(f"{directory} loaded back computes other logprobs than after its step (max "
                               f"difference {gap:.3g})")
        replaced = ""
        if len(self.after_step) > step:
            moved = (self.after_step[-1] - expected).abs().max().item()
            replaced = f" over step {len(self.after_step)}'s (which differ by {moved:.2g})"
        self.load_detail = (f"{os.path.basename(directory)} loaded back{replaced}: logprobs as after step {step} "
                            f"(gap {gap:.2g})")


def engines_sleeping(trainer) -> list[list[str]]:
    """What each engine has asleep now (`VLLMGenerator.sleeping`)."""
    pool = trainer.roles.engine_pool
    if pool is None:
        return [trainer.generator.sleeping()]
    refs = [pool.engines[name].sleeping.options(concurrency_group="control").remote() for name in pool.names]
    return wait_for(refs, pool.names, pool.timeout_s, "doctor", "sleeping")


def train_and_load(report: Report, phases: Phases, trainer, sleep_check: bool) -> Observations:
    """`trainer.train()` (its max_steps, a checkpoint after every step), then the first
    checkpoint loaded back into the trainer as a resume loads it; each part in its row."""
    seen = Observations(trainer, sleep_check)
    # in process a batch is sampled (and scored) when requested, under Ray in the background until taken
    targets = [Target(trainer.pipeline, "request_ahead", "one sample"),
               Target(trainer.pipeline, "take", "one sample", after=seen.sampled),
               Target(trainer.learner, "step", "learner step", after=seen.learner_stepped),
               Target(trainer.publisher, "publish", "weight push"),
               Target(checkpoint, "save", "checkpoint save/load"),
               Target(checkpoint, "load", "checkpoint save/load", after=seen.loaded)]
    failure = None
    with phases.watching(targets):
        try:
            trainer.train()
            checkpoint.load(trainer, saved_checkpoints(phases)[0])
        except Exception as err:  # train() closed the roles on its way out; the rows say where it broke
            failure = err
    _training_rows(report, phases, trainer, seen, failure)
    return seen


def saved_checkpoints(phases: Phases) -> list[str]:
    return [path for path in phases.results["checkpoint save/load"] if isinstance(path, str)]


def _training_rows(report: Report, phases: Phases, trainer, seen: Observations, failure) -> None:
    failed = place_failure(report, TRAIN_ROWS, phases, failure) if failure is not None else None
    passed = [name for name in TRAIN_ROWS if phases.ran(name) and name not in phases.errors]
    if "one sample" in passed:
        pairs, _ = next(result for result in phases.results["one sample"] if result is not None)
        report.add("one sample", PASS, f"{len(pairs.batch.prompt_ids)} prompts x {trainer.args.num_samples} "
                   f"completions, mean reward {pairs.metrics.get('objective/scores', float('nan')):.3f}",
                   phases.seconds["one sample"])
    if "learner step" in passed:
        losses = [metrics["loss"] for metrics in phases.results["learner step"]]
        report.add("learner step", PASS, f"{len(losses)} step(s), loss " + ", ".join(f"{loss:.4f}" for loss in losses),
                   phases.seconds["learner step"])
    if failed != "weight push":
        push_rows(report, phases, trainer)  # every push: the start's, each step's, the load's
    if "checkpoint save/load" in passed and seen.load_detail:
        report.add("checkpoint save/load", PASS, f"{len(saved_checkpoints(phases))} saved; {seen.load_detail}",
                   phases.seconds["checkpoint save/load"])
    if failed is not None:
        report.skip_rest(TRAIN_ROWS, failed)


# ------------------------------------------------------------------------------------ GPU rows
def gpu_rows(report: Report, on_gpu: bool, trainer_transport: str | None, sleep_mode: bool,
             seen: Observations | None, needs: str = "engine start") -> None:
    """NCCL, CUDA IPC and sleep/wake: what the run's path on GPUs adds. Each reads the rows of
    the path that used it (a push over NCCL is the weight push row); on CPU, none applies."""
    if not on_gpu:
        for name in GPU_ROWS:
            report.add(name, NA, "on CPU (needs CUDA GPUs)")
        return
    push = report.rows.get("weight push")
    for name, backend in (("NCCL push", "nccl"), ("CUDA IPC push", "ipc")):
        if trainer_transport is None:  # the trainer did not start
            report.add(name, SKIP, f"needs {needs}")
        elif trainer_transport != backend:
            report.add(name, NA, f"this run pushes over {trainer_transport}")
        elif push is not None:
            report.add(name, push.status, push.detail, push.seconds, FIXES[name] if push.status == FAIL else "")
    _sleep_row(report, sleep_mode, seen, needs)


def _sleep_row(report: Report, sleep_mode: bool, seen: Observations | None, needs: str) -> None:
    if not sleep_mode:
        report.add("sleep/wake", NA, "vllm_enable_sleep_mode is off")
        return
    if seen is None or not report.ok("one sample"):
        report.add("sleep/wake", SKIP, f"needs {needs if seen is None else 'one sample'}")
        return
    woke = report.ok("logprob probe") and report.ok("learner step")
    if not seen.sleep_check:  # async_steps > 0: the engines sample ahead, asleep only now and then
        report.add("sleep/wake", PASS if woke else FAIL, "woke for every push (probe agreed) and sample; not "
                   "looked at asleep (async_steps > 0)", fix=FIXES["sleep/wake"])
        return
    awake = [state for state in seen.asleep if state != ["kv_cache", "weights"]]
    if awake or not seen.asleep:
        report.add("sleep/wake", FAIL, f"engines not asleep after sampling: {awake or 'not observed'}",
                   fix=FIXES["sleep/wake"])
    elif woke:
        report.add("sleep/wake", PASS, f"asleep after each of {len(seen.asleep)} sample(s); woke for every push "
                   "(probe agreed) and sample")
    else:
        report.add("sleep/wake", FAIL, "asleep after sampling, but the push or the probe after waking failed",
                   fix=FIXES["sleep/wake"])
