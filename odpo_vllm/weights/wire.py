"""The wire between learner ranks and vLLM engines: bucket plans, packing, a private gloo group,
and waits that name the peer.

The transport is vLLM 0.32's `vllm.distributed.weight_transfer`: a trainer-side transfer
engine (`TrainerWeightTransferEngine.send_weights`) drives the inference side through a client
(`init_weight_transfer_engine`, `start_weight_update`, `update_weights`, `finish_weight_update`)
and a worker-side transfer engine receives. Backends per medium:

- ``nccl``: vLLM's own NCCL engines (separate GPUs, packed broadcast).
- ``ipc``: vLLM's own CUDA IPC engine (learner and engine on the same GPU).
- ``odpo_gloo``: ours, registered in both of vLLM's factories: packed, size-capped buckets over a
  private gloo group (CPU machines, and a fallback anywhere).
- in-process: no wire at all; `VLLMGenerator.load_weights` hands tensors to `reload_weights`.

What is sent (names, merged LoRA, tied weights) is defined once in `names.py`; our backend's
two sides are in `vllm_backend.py`; which backend a placement uses is `placement.resolve_weight_transport`.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from odpo_vllm.weights.names import TensorMeta

logger = logging.getLogger(__name__)

GLOO_BACKEND = "odpo_gloo"
DEFAULT_BUCKET_BYTES = 256 << 20


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
@dataclass
class SyncStats:
    seconds: float
    bytes: int

    def as_metrics(self) -> dict[str, float]:
        return {"sync/seconds": self.seconds, "sync/bytes": float(self.bytes)}


def in_daemon_thread(fn, *args) -> Future:
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
    future = in_daemon_thread(fn)
    done, _ = wait([future], timeout=timeout_s)
    if not done:
        raise TimeoutError(f"weight transport: {what} within {timeout_s:.0f}s")
    return future.result()


def run_with_peer(call, args: tuple, work, timeout_s: float, peer: str):
    """Run `call(*args)` (an RPC to `peer` that returns once its side of the transfer is done)
    beside `work()` (this side of the same collective). Fails as soon as either side fails, and
    names `peer` if the pair has not finished within `timeout_s`."""
    remote, local = in_daemon_thread(call, *args), in_daemon_thread(work)
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
