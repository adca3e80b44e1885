"""A DeepSpeed learner rank (ZeRO stage 2 or 3): the same contract as `Learner`, one process per
rank; a Ray learner group (`group.py`) runs N of them data-parallel, one `RankActor` each.

The loss and metrics are `Learner`'s; DeepSpeed owns the backward, the gradient reduction across
ranks, clipping and the optimizer step. Each rank gets its own shard of the step's pairs and
normalises by its shard size, so DeepSpeed's average over ranks is the mean over all pairs.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from odpo_vllm.learning.learner import REFERENCE_FILE, Learner, build_optimizer, build_scheduler
from odpo_vllm.weights.adapter import saved_name
from odpo_vllm.weights.names import TensorMeta, checkpoint_name, lora_delta, lora_targets, merged_weight


def import_deepspeed():
    """deepspeed, without the C++ op that `init_distributed` would JIT-compile for 1-2 minutes on
    CPU and that ZeRO training never uses (measured: 50-110 s on a fresh 2-core machine)."""
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


class DeepSpeedRank(Learner):
    """One data-parallel rank. The process must have RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
    and MASTER_PORT set (a Ray learner actor sets them before constructing this)."""

    def __init__(self, model, ref_model, args, pad_token_id: int, num_training_steps: int, zero_stage: int = 2):
        if zero_stage not in (2, 3):
            raise ValueError(f"zero_stage: 2 or 3, got {zero_stage}")
        deepspeed = import_deepspeed()
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"DeepSpeedRank: environment variable {name} is not set for this rank")
        world_size = int(os.environ["WORLD_SIZE"])
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            model, ref_model = model.cuda(), ref_model.cuda() if ref_model is not None else None
        optimizer = build_optimizer(model, args)
        scheduler = build_scheduler(optimizer, args, num_training_steps)
        self.model_engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(args, zero_stage, world_size),
        )
        self.zero_stage, self.rank, self.world_size = zero_stage, int(os.environ["RANK"]), world_size
        # The loop's forwards go through the DeepSpeed engine, not the bare module: under ZeRO-3 with
        # gradient accumulation, calling the module directly gave wrong gradients (grad norm
        # about 1/sqrt(2) of the single-process one, weights off by 0.025; measured).
        super().__init__(self.model_engine, ref_model, args, pad_token_id, num_training_steps, optimizer, scheduler)
        self.autocast_dtype = None  # DeepSpeed runs the module in its own precision
        self.scaler = None

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if last != self.model_engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"rank {self.rank}: got a step whose micro-batch count does not match "
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}; give each rank "
                "per_device_train_batch_size * gradient_accumulation_steps pairs per step"
            )
        # The loss is already divided by this rank's pair count; DeepSpeed must not divide again.
        self.model_engine.backward(loss, scale_wrt_gas=False)
        # Counts micro-steps; at the boundary: reduce across ranks, clip, optimizer and
        # scheduler step, zero the gradients.
        self.model_engine.step()

    def _apply_update(self) -> float:
        norm = self.model_engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ---------------------------------------------------------------- weights for the engines
    def named_weights(self, bucket_bytes: int = 256 << 20,
                      merge_lora: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights the engines load (`weights/names.py`'s definition: checkpoint names, tied weights
        under every name, LoRA merged out of place; `merge_lora=False`: the base weights as they
        are, for an engine that serves the adapter itself). Under ZeRO-3 each size-capped group of
        parameters is gathered, copied out and released before the next (never the whole model at
        once); a group holding a LoRA-adapted weight also gathers that layer's adapter. Every rank
        must iterate in lockstep: gathering is a collective."""
        deepspeed = import_deepspeed()
        names_of, params = _parameters_with_names(self.model_engine.module)
        targets = lora_targets(self.model_engine.module) if merge_lora else {}
        zero3 = self.zero_stage == 3
        group, used = [], 0
        for param in params + [None]:
            size = 0 if param is None else _full_numel(param) * param.element_size()
            if group and (param is None or used + size > bucket_bytes):
                # modifier_rank=None: nothing is written back to the partitions (nothing is modified)
                gathered = _with_adapters(group, names_of, targets)
                with torch.no_grad(), deepspeed.zero.GatheredParameters(gathered, modifier_rank=None, enabled=zero3):
                    copies = list(_engine_tensors(group, names_of, targets))
                yield from copies
                group, used = [], 0
            if param is not None:
                group.append(param)
                used += size

    def weights_meta(self) -> list[TensorMeta]:
        """What `named_weights` yields, in the same order, without gathering anything."""
        names_of, params = _parameters_with_names(self.model_engine.module)
        metas = []
        for param in params:
            shape = tuple(getattr(param, "ds_shape", param.shape))
            for name in names_of[id(param)]:
                mapped = checkpoint_name(name)
                if mapped is not None:
                    metas.append(TensorMeta(mapped, param.dtype, shape))
        return metas

    def _adapter_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(PEFT's saved name, parameter) of the active adapter's LoRA matrices, in model order."""
        module = self.model_engine.module
        adapter = (list(getattr(module, "active_adapters", None) or []) or ["default"])[0]
        named = [(saved_name(name, adapter), param) for name, param in module.named_parameters()]
        return [(name, param) for name, param in named if name is not None]

    def adapter_meta(self) -> list[TensorMeta]:
        """What `adapter_tensors` yields, in the same order, without gathering anything."""
        return [TensorMeta(name, param.dtype, tuple(getattr(param, "ds_shape", param.shape)))
                for name, param in self._adapter_parameters()]

    def adapter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The active LoRA adapter's matrices under PEFT's saved names (`lora_sync='adapter'`):
        copies, gathered under ZeRO-3 (the adapter alone: a few MB, never the model). Every rank
        iterates together: gathering is a collective."""
        named = self._adapter_parameters()
        with torch.no_grad(), import_deepspeed().zero.GatheredParameters(
                [param for _, param in named], modifier_rank=None, enabled=self.zero_stage == 3):
            copies = [(name, param.detach().clone()) for name, param in named]
        yield from copies

    def _whole(self, param):
        # every rank holds the whole reference and gathers the policy's parameter (a collective:
        # every rank refreshes together); nothing is written back to the partitions
        return import_deepspeed().zero.GatheredParameters([param], modifier_rank=None, enabled=self.zero_stage == 3)

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: str) -> None:
        """This rank's part of `checkpoint_files` (every rank calls it together: DeepSpeed synchronises);
        with `sync_ref_model`, rank 0 also writes the reference (every rank holds the same one)."""
        self.model_engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)
        if self.rank == 0:
            self._save_reference(directory)

    def load(self, directory: str) -> None:
        self.model_engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        self._load_reference(directory)


CHECKPOINT_TAG = "deepspeed"  # the subfolder of a checkpoint that DeepSpeed's files go to


def checkpoint_files(world_size: int, zero_stage: int, bf16: bool, reference: bool = False) -> dict[str, int]:
    """The files `DeepSpeedRank.save` writes into a checkpoint folder, relative to it, each with the
    rank that writes it (DeepSpeed's names): the module states (ZeRO-2: rank 0's, whole; ZeRO-3:
    each rank's partition) and each rank's optimizer shard (`bf16_` first when training in bf16).
    Rank 0's `latest` file is left out: loading names the tag, and rank 0 writes the module
    states too. `reference`: rank 0 writes the refreshed reference (`sync_ref_model`)."""
    files = {REFERENCE_FILE: 0} if reference else {}
    for rank in range(world_size):
        if zero_stage == 3:
            files[f"{CHECKPOINT_TAG}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt"] = rank
        elif rank == 0:
            files[f"{CHECKPOINT_TAG}/mp_rank_00_model_states.pt"] = rank
        files[f"{CHECKPOINT_TAG}/{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = rank
    return files


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


def _with_adapters(group: list, names_of: dict[int, list[str]], targets: dict) -> list:
    """`group` and the parameters of the LoRA layers adapting any of them (base, adapter A and B):
    what must be gathered together to merge them."""
    params, seen = list(group), {id(p) for p in group}
    for param in group:
        for name in names_of[id(param)]:
            if name in targets:
                for extra in targets[name][0].parameters():
                    if id(extra) not in seen:
                        seen.add(id(extra))
                        params.append(extra)
    return params


def _engine_tensors(group: list, names_of: dict[int, list[str]], targets: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for each name of each parameter in `group`: copies, taken while
    gathered; a LoRA-adapted weight merged (a new tensor, in the parameter's dtype); a parameter
    with several names copied once."""
    for param in group:
        copy = None
        for name in names_of[id(param)]:
            mapped = checkpoint_name(name)
            if mapped is None:
                continue
            if name in targets:
                yield mapped, merged_weight(param, lora_delta(*targets[name]), param.dtype)
            else:
                copy = param.detach().clone() if copy is None else copy
                yield mapped, copy


def _full_numel(param) -> int:
    shape = getattr(param, "ds_shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()
