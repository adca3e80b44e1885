"""Weight transport from the learner to vLLM engines.

One interface, vLLM 0.32's `vllm.distributed.weight_transfer`: a trainer-side engine
(`TrainerWeightTransferEngine.send_weights`) drives the inference side through a client
(`init_weight_transfer_engine`, `start_weight_update`, `update_weights`, `finish_weight_update`)
and a worker-side engine receives. Backends per medium:

- ``nccl``: vLLM's own NCCL engines (separate GPUs, packed broadcast).
- ``ipc``: vLLM's own CUDA IPC engine (learner and engine on the same GPU).
- ``odpo_gloo``: ours, registered in both of vLLM's factories: packed, size-capped buckets over a
  private gloo group (CPU machines, and a fallback anywhere).
- in-process: no wire at all; `VLLMGenerator.load_weights` hands tensors to `reload_weights`.

`LearnerWeights` is the `WeightSource` of every backend: Hugging Face checkpoint names (what
vLLM's loaders expect), tied weights included, LoRA merged, cast to the engine's dtype.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

GLOO_BACKEND = "odpo_gloo"
DEFAULT_BUCKET_BYTES = 256 << 20


# --------------------------------------------------------------------------------------------
# What is sent: the learner's weights under checkpoint names
# --------------------------------------------------------------------------------------------
def checkpoint_name(name: str) -> str | None:
    """Map a (possibly PEFT-wrapped) parameter name to its base checkpoint name; None = skip."""
    if "lora_" in name or ".original_module." in name:
        return None
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


@contextlib.contextmanager
def merged_adapter(model):
    """LoRA merged into the base weights for the duration (no-op for plain models)."""
    merge = getattr(model, "merge_adapter", None)
    if merge is None or not hasattr(model, "peft_config"):
        yield
        return
    merge()
    try:
        yield
    finally:
        model.unmerge_adapter()


def _base_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    # state_dict() lists tied parameters under every name (lm_head.weight too), which vLLM
    # needs: its loader does not re-tie a missing lm_head on reload.
    for name, tensor in model.state_dict().items():
        mapped = checkpoint_name(name)
        if mapped is not None:
            yield mapped, tensor


def _weight_source_base():
    try:
        from vllm.distributed.weight_transfer.base import WeightSource

        return WeightSource
    except ImportError:  # the in-process transformers path does not need vLLM
        return object


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


class LearnerWeights(_weight_source_base()):
    """A re-iterable `WeightSource` over a learner model in checkpoint format."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        self.model, self.dtype = model, dtype

    def _meta(self):
        with merged_adapter(self.model):
            return [TensorMeta(n, self.dtype or t.dtype, tuple(t.shape)) for n, t in _base_weights(self.model)]

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(m.name, m.dtype, m.shape) for m in self._meta()]

    def tensor_meta(self) -> list[TensorMeta]:
        return self._meta()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Merged LoRA weights are unmerged in place afterwards: hand out copies of those, so a
        # consumer that keeps a tensor past the iteration still holds the merged values.
        copy = hasattr(self.model, "peft_config")
        with torch.no_grad(), merged_adapter(self.model):
            for name, tensor in _base_weights(self.model):
                tensor = tensor.detach().to(self.dtype) if self.dtype else tensor.detach()
                yield name, tensor.clone() if copy else tensor


def validate_weights(metas: list[TensorMeta], expected: dict[str, tuple[int, ...]], engine: str) -> None:
    """Refuse an update whose names or shapes do not match the engine's model: vLLM would fail
    halfway through the load and leave the engine with half-replaced weights."""
    got = {m.name: tuple(m.shape) for m in metas}
    unknown = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    wrong = sorted(n for n in set(got) & set(expected) if got[n] != tuple(expected[n]))
    if unknown or missing or wrong:
        details = []
        if unknown:
            details.append(f"unknown names {unknown[:5]}")
        if missing:
            details.append(f"missing names {missing[:5]}")
        if wrong:
            details.append("shape mismatch " + ", ".join(f"{n}: {got[n]} vs {tuple(expected[n])}" for n in wrong[:5]))
        raise ValueError(f"weight update for {engine} rejected before loading: " + "; ".join(details))


# --------------------------------------------------------------------------------------------
# Buckets: both sides derive the same plan from the same metadata
# --------------------------------------------------------------------------------------------
def plan_buckets(sizes: list[int], cap_bytes: int) -> list[list[int]]:
    """Group consecutive tensors into buckets of at most `cap_bytes` (a larger tensor goes alone)."""
    buckets, current, used = [], [], 0
    for index, size in enumerate(sizes):
        if current and used + size > cap_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append(index)
        used += size
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def unpack(buffer: torch.Tensor, metas: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for meta in metas:
        chunk = buffer[offset: offset + meta.nbytes]
        out.append((meta.name, chunk.view(meta.dtype).view(meta.shape)))
        offset += meta.nbytes
    return out


def _metas_from_update(names, dtype_names, shapes) -> list[TensorMeta]:
    return [TensorMeta(n, getattr(torch, d), tuple(s)) for n, d, s in zip(names, dtype_names, shapes)]


def open_gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: float, peer: str):
    """A private gloo group (TCPStore + ProcessGroupGloo) beside any default group."""
    try:
        store = dist.TCPStore(address, port, world_size, is_master=rank == 0,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))
    except Exception as err:  # rendezvous timeouts surface as RuntimeError/DistStoreError
        raise TimeoutError(
            f"weight transport: {peer} did not join the gloo group at {address}:{port} within {timeout_s:.0f}s "
            f"(rank {rank} of {world_size}): {err}"
        ) from err


class GlooBroadcast:
    """One broadcast from rank 0 on a private gloo group, started now and waited for later, so a
    side can pack or load one bucket while the next is on the wire."""

    def __init__(self, group, tensor: torch.Tensor, peer: str, timeout_s: float):
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.timeout = timedelta(seconds=timeout_s)
        self.tensor, self.peer, self.timeout_s = tensor, peer, timeout_s
        try:
            self.work = group.broadcast([tensor], options)
        except Exception as err:
            raise TimeoutError(f"weight transport: broadcast with {peer} failed: {err}") from err

    def wait(self) -> torch.Tensor:
        try:
            self.work.wait()
        except Exception as err:
            raise TimeoutError(f"weight transport: broadcast with {self.peer} failed or timed out after "
                               f"{self.timeout_s:.0f}s: {err}") from err
        return self.tensor


# --------------------------------------------------------------------------------------------
# odpo_gloo: worker side (inside the vLLM worker) and trainer side
# --------------------------------------------------------------------------------------------
def register_gloo_backend() -> bool:
    """Register `odpo_gloo` in vLLM's worker and trainer factories (idempotent)."""
    try:
        from vllm.distributed.weight_transfer.factory import (
            WeightTransferEngineFactory,
            WeightTransferTrainerFactory,
        )
    except ImportError:
        return False
    from . import transport_vllm

    for factory, cls in ((WeightTransferEngineFactory, transport_vllm.GlooWeightTransferEngine),
                         (WeightTransferTrainerFactory, transport_vllm.GlooTrainerWeightTransferEngine)):
        with contextlib.suppress(ValueError):  # already registered
            factory.register_engine(GLOO_BACKEND, cls)
    return True


@dataclass
class SyncStats:
    seconds: float
    bytes: int

    def as_metrics(self) -> dict[str, float]:
        return {"sync/seconds": self.seconds, "sync/bytes": float(self.bytes)}


def _in_daemon_thread(fn, *args) -> Future:
    """Run fn in a daemon thread: one stuck in a collective must not hold the process at exit."""
    future: Future = Future()

    def target():
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # handed to the waiting side
            future.set_exception(error)

    threading.Thread(target=target, daemon=True).start()
    return future


def call_with_timeout(fn, timeout_s: float, what: str):
    """`fn()` in a daemon thread; a TimeoutError saying `what` if it has not returned in time."""
    future = _in_daemon_thread(fn)
    done, _ = wait([future], timeout=timeout_s)
    if not done:
        raise TimeoutError(f"weight transport: {what} within {timeout_s:.0f}s")
    return future.result()


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


def run_with_peer(call, args: tuple, work, timeout_s: float, peer: str):
    """Run `call(*args)` (an RPC to `peer` that returns once its side of the transfer is done)
    beside `work()` (this side of the same collective). Fails as soon as either side fails, and
    names `peer` if the pair has not finished within `timeout_s`."""
    remote, local = _in_daemon_thread(call, *args), _in_daemon_thread(work)
    done, pending = wait([remote, local], timeout=timeout_s, return_when=FIRST_EXCEPTION)
    for future in (remote, local):
        if future in done and future.exception() is not None:
            error = future.exception()
            if isinstance(error, TimeoutError):
                raise error
            side = f"{peer} failed" if future is remote else "the sending side failed"
            raise RuntimeError(f"weight transport: {side}: {error}") from error
    if pending:
        raise TimeoutError(f"weight transport: {peer} did not finish the transfer within {timeout_s:.0f}s")
    return remote.result()
