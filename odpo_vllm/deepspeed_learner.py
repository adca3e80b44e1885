"""A DeepSpeed learner rank (ZeRO stage 2 or 3): the same contract as `Learner`, one process per
rank; a Ray learner group runs N of them data-parallel.

The loss and metrics are `Learner`'s; DeepSpeed owns the backward, the gradient reduction across
ranks, clipping and the optimizer step. Each rank gets its own shard of the step's pairs and
normalises by its shard size, so DeepSpeed's average over ranks is the mean over all pairs.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from .learner import Learner, build_optimizer, build_scheduler
from .weights import TensorMeta, checkpoint_name, merged_adapter


def import_deepspeed():
    """deepspeed, without the C++ op that `init_distributed` would JIT-compile for 1-2 minutes on
    CPU and that ZeRO training never uses (ENVIRONMENT.md)."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(args, zero_stage: int, world_size: int) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "gradient_clipping": args.max_grad_norm or 0.0,
        "zero_optimization": {"stage": zero_stage},
        # the optimizer is built from `optim` like the in-process learner (torch AdamW, SGD, ...)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if args.bf16:
        config["bf16"] = {"enabled": True}
    elif args.fp16:
        config["fp16"] = {"enabled": True}
    return config


class DeepSpeedLearner(Learner):
    """One data-parallel rank. The process must have RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
    and MASTER_PORT set (a Ray learner actor sets them before constructing this)."""

    def __init__(self, model, ref_model, args, pad_token_id: int, num_training_steps: int, zero_stage: int = 2):
        if zero_stage not in (2, 3):
            raise ValueError(f"zero_stage: 2 or 3, got {zero_stage}")
        deepspeed = import_deepspeed()
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"DeepSpeedLearner: environment variable {name} is not set for this rank")
        world_size = int(os.environ["WORLD_SIZE"])
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            model, ref_model = model.cuda(), ref_model.cuda() if ref_model is not None else None
        optimizer = build_optimizer(model, args)
        scheduler = build_scheduler(optimizer, args, num_training_steps)
        self.engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(args, zero_stage, world_size),
        )
        self.zero_stage, self.rank, self.world_size = zero_stage, int(os.environ["RANK"]), world_size
        # The loop's forwards go through the engine, not the bare module: under ZeRO-3 with
        # gradient accumulation, calling the module directly gave wrong gradients (grad norm
        # about 1/sqrt(2) of the single-process one, weights off by 0.025; measured).
        super().__init__(self.engine, ref_model, args, pad_token_id, num_training_steps, optimizer, scheduler)
        self.autocast_dtype = None  # DeepSpeed runs the module in its own precision
        self.scaler = None

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if last != self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"rank {self.rank}: got a step whose micro-batch count does not match "
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}; give each rank "
                "per_device_train_batch_size * gradient_accumulation_steps pairs per step"
            )
        # The loss is already divided by this rank's pair count; DeepSpeed must not divide again.
        self.engine.backward(loss, scale_wrt_gas=False)
        # Counts micro-steps; at the boundary: reduce across ranks, clip, optimizer and
        # scheduler step, zero the gradients.
        self.engine.step()

    def _apply_update(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ---------------------------------------------------------------- weights for the engines
    def named_weights(self, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights the engines load (`weights.py`'s definition: checkpoint names, tied weights
        under every name, LoRA merged). Under ZeRO-3 each size-capped group of parameters is
        gathered, copied out and released before the next (never the whole model at once), except
        for a LoRA policy, whose merge needs every base weight and its adapter at once. Every rank
        must iterate in lockstep: gathering is a collective."""
        deepspeed = import_deepspeed()
        module = self.engine.module
        names_of, params = _parameters_with_names(module)
        zero3 = self.zero_stage == 3
        if hasattr(module, "peft_config"):
            # modifier_rank=None: the merge is undone and nothing is written back to the partitions
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3), merged_adapter(module):
                copies = [(p, p.detach().clone()) for p in params]
            yield from _mapped(copies, names_of)
            return
        group, used = [], 0
        for param in params + [None]:
            size = 0 if param is None else _full_numel(param) * param.element_size()
            if group and (param is None or used + size > bucket_bytes):
                with deepspeed.zero.GatheredParameters(group, modifier_rank=None, enabled=zero3):
                    copies = [(p, p.detach().clone()) for p in group]
                yield from _mapped(copies, names_of)
                group, used = [], 0
            if param is not None:
                group.append(param)
                used += size

    def weights_meta(self) -> list[TensorMeta]:
        """What `named_weights` yields, in the same order, without gathering anything."""
        names_of, params = _parameters_with_names(self.engine.module)
        metas = []
        for param in params:
            shape = tuple(getattr(param, "ds_shape", param.shape))
            for name in names_of[id(param)]:
                mapped = checkpoint_name(name)
                if mapped is not None:
                    metas.append(TensorMeta(mapped, param.dtype, shape))
        return metas

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="deepspeed")

    def load(self, directory: str) -> None:
        self.engine.load_checkpoint(directory, tag="deepspeed")


def _parameters_with_names(model) -> tuple[dict[int, list[str]], list]:
    """Unique parameters in first-appearance order, each with all its names (tied weights have
    several, and vLLM needs every one)."""
    names_of: dict[int, list[str]] = {}
    params = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in names_of:
            names_of[id(param)] = []
            params.append(param)
        names_of[id(param)].append(name)
    return names_of, params


def _mapped(copies, names_of) -> Iterator[tuple[str, torch.Tensor]]:
    for param, tensor in copies:
        for name in names_of[id(param)]:
            mapped = checkpoint_name(name)
            if mapped is not None:
                yield mapped, tensor


def _full_numel(param) -> int:
    shape = getattr(param, "ds_shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


class _EngineWeights:
    """The `WeightSource` of a DeepSpeed rank: metadata without gathering, gathered iteration.

    With `keep_published`, rank 0 keeps in host memory the version it last sent live (the
    published one), and with `send_published` it sends that copy instead of the live weights: a
    replacement engine must sample the batch it inherits with the version that batch was
    scheduled for, even when the learners have taken a step since (async_steps >= 1)."""

    def __init__(self, learner: DeepSpeedLearner, bucket_bytes: int):
        self.learner, self.bucket_bytes = learner, bucket_bytes
        self.keep_published, self.send_published = False, False
        self.published: list[tuple[str, torch.Tensor]] | None = None

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(m.name, m.dtype, m.shape) for m in self.learner.weights_meta()]

    def __iter__(self):
        if not self.send_published:
            return self._live()
        if self.learner.rank != 0:  # nothing to gather: rank 0 sends its copy alone
            return iter(())
        if self.published is None:
            raise RuntimeError("weight source: no published version was kept")
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return ((name, tensor.to(device)) for name, tensor in self.published)

    def _live(self):
        # filled as the tensors go out (a sender stops asking after the last one, so nothing
        # after this loop would run); a send that fails halfway fails the run anyway
        published = self.published = [] if self.keep_published and self.learner.rank == 0 else None
        copies: dict[int, torch.Tensor] = {}  # tied weights come under several names: one copy
        for name, tensor in self.learner.named_weights(self.bucket_bytes):
            if published is not None:
                if id(tensor) not in copies:  # named_weights yields copies already: on CPU this copies nothing
                    copies[id(tensor)] = tensor.to("cpu")
                published.append((name, copies[id(tensor)]))
            yield name, tensor


class WeightSender:
    """A rank's side of the weight transport, opened and closed by the weight publisher: vLLM's
    trainer-side engine of the chosen backend over this rank's `named_weights`. Rank 0 sends and
    drives the engines; the other ranks take part in the ZeRO-3 gathers."""

    def __init__(self, learner: DeepSpeedLearner, engines: list, info: dict, source: _EngineWeights | None = None):
        """`source`: the rank's weight source, kept by the caller across transports (it holds the
        published weights when asked to keep them); a fresh one by default."""
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient

        from .transport_vllm import open_trainer_transport

        info = dict(info)
        self.backend, self.info = info.pop("backend"), info
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.source = source or _EngineWeights(learner, info["bucket_bytes"])
        self.source.bucket_bytes = info["bucket_bytes"]
        self.engine = open_trainer_transport(
            self.backend, info, rank=learner.rank, client=RayVLLMWeightSyncClient(list(engines)), source=self.source)
        self.bytes = sum(m.nbytes for m in learner.weights_meta())

    def send(self, published: bool = False) -> dict[str, float]:
        """Send the live weights, or (`published`) the copy of the published version the source kept."""
        import time

        from .transport import call_with_timeout

        def send():
            if self.device is not None:  # the current CUDA device is per thread
                torch.cuda.set_device(self.device)
            self.engine.send_weights()

        start = time.perf_counter()
        self.source.send_published = published
        try:
            call_with_timeout(send, self.info["timeout_s"],
                              f"{self.info['engine_name']} did not finish the {self.backend} weight update")
        finally:
            self.source.send_published = False
        return {"sync/seconds": time.perf_counter() - start, "sync/bytes": float(self.bytes)}

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.engine = None
