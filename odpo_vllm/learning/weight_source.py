"""A DeepSpeed rank's side of the weight push: what it sends and how.

`RankWeightSource` is the iterator vLLM's trainer-side transfer engine reads: tensor metadata
without gathering, then the weights (ZeRO-3: gathered bucket by bucket, `DeepSpeedRank.named_weights`).
`WeightSender` is one opened transport (vLLM's trainer-side engine of the chosen backend over
that source); the weight publisher opens and closes it through the rank actor.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, wait

import torch

from odpo_vllm.learning.deepspeed_rank import DeepSpeedRank
from odpo_vllm.weights.wire import in_daemon_thread


class RankWeightSource:
    """The weights a rank sends: metadata without gathering, gathered iteration.

    `keep_published`: rank 0 keeps in host memory the version it last sent live (the published
    one), and while `send_published` is set it sends that copy instead of the live weights: a
    replacement engine must sample the batch it inherits with the version that batch was
    scheduled for, even when the learners have taken a step since (async_steps >= 1).
    `bucket_bytes`: the cap of one ZeRO-3 gather (and of one odpo_gloo bucket).

    `kind`, set by each send: "weights" (LoRA merged in), "base" (LoRA training never changes
    these: the published copy is the live one) or "adapter" (the LoRA matrices alone,
    `lora_sync='adapter'`; the published copy is of the adapter)."""

    def __init__(self, learner: DeepSpeedRank, bucket_bytes: int, keep_published: bool = False):
        self.learner, self.bucket_bytes, self.keep_published = learner, bucket_bytes, keep_published
        self.send_published = False
        self.kind = "weights"
        self.published: list[tuple[str, torch.Tensor]] | None = None
        self.published_kind: str | None = None
        self.live = None  # the live iteration of the last send, until it ran to its end

    def tensor_meta(self):
        return self.learner.adapter_meta() if self.kind == "adapter" else self.learner.weights_meta()

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(m.name, m.dtype, m.shape) for m in self.tensor_meta()]

    def __iter__(self):
        if not (self.send_published and self.keep_published) or self.kind == "base":
            # without a kept copy the live weights are the published ones: nothing is sampled
            # while the learners step (async_steps = 0)
            self.live = self._live()
            return self.live
        if self.learner.rank != 0:  # nothing to gather: rank 0 sends its copy alone
            return iter(())
        if self.published is None or self.published_kind != self.kind:
            raise RuntimeError(f"weight source: no published version of the {self.kind} was kept")
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return ((name, tensor.to(device)) for name, tensor in self.published)

    def _live(self):
        # filled as the tensors go out (a sender stops asking after the last one, so nothing
        # after this loop would run); a send that fails halfway leaves a partial copy, and the
        # publisher makes the push again, live, before anything asks for the copy
        kept = self.keep_published and self.learner.rank == 0 and self.kind != "base"
        if kept:
            self.published, self.published_kind = [], self.kind
        elif self.kind != "base":  # a base send leaves the kept adapter as it is
            self.published = None
        copies: dict[int, torch.Tensor] = {}  # tied weights come under several names: one copy
        tensors = (self.learner.adapter_tensors() if self.kind == "adapter"
                   else self.learner.named_weights(self.bucket_bytes, merge_lora=self.kind == "weights"))
        for name, tensor in tensors:
            if kept:
                if id(tensor) not in copies:  # named_weights yields copies already: on CPU this copies nothing
                    copies[id(tensor)] = tensor.to("cpu")
                self.published.append((name, copies[id(tensor)]))
            yield name, tensor
        self.live = None

    def finish_live(self) -> None:
        """Run the live iteration of a send that failed part-way to its end. Under ZeRO-3 every
        rank walks `named_weights` in step (each group is an all-gather): the other ranks wait
        in the next gather until rank 0 has taken every group, and would otherwise hang there
        past the failed push, holding up the next one (or a checkpoint)."""
        live, self.live = self.live, None
        if live is None:
            return
        try:
            for _ in live:
                pass
        except Exception:  # a broken iteration: the collective fails on every rank alike
            pass


class TellingEngineClient:
    """vLLM's Ray client to the engines, which also tells each engine, as an update starts, what it
    receives (the source's `kind`): an engine serving the policy as a LoRA adapter loads an
    adapter push as a new adapter version, and everything else into its weights."""

    def __init__(self, client, source: RankWeightSource):
        self.client, self.source = client, source

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def start_weight_update(self) -> None:
        import ray

        ray.get([engine.start_weight_update.remote(self.source.kind) for engine in self.client.handles])


class WeightSender:
    """A rank's side of the weight transport, opened and closed by the weight publisher: vLLM's
    trainer-side engine of the chosen backend over this rank's `named_weights`. Rank 0 sends and
    drives the engines; the other ranks take part in the ZeRO-3 gathers."""

    def __init__(self, learner: DeepSpeedRank, engines: list, info: dict, source: RankWeightSource):
        """`engines`: the receiving engine actors; `info`: the wire (backend, address, port,
        world size, timeout, the engines' names for errors); `source`: the rank's weight source,
        kept by the rank across transports (it holds the published copy)."""
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient

        from odpo_vllm.weights.vllm_backend import open_trainer_transport

        info = dict(info, bucket_bytes=source.bucket_bytes)
        self.backend, self.info = info.pop("backend"), info
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.source = source
        self.transfer = open_trainer_transport(
            self.backend, info, rank=learner.rank, client=TellingEngineClient(RayVLLMWeightSyncClient(list(engines)),
                                                                              self.source), source=self.source)
        self.in_flight: Future | None = None  # the last send's thread

    def send(self, published: bool = False, kind: str = "weights") -> dict[str, float]:
        """Send the live weights, or (`published`) the copy of the published version the source
        kept; `kind`: "weights", "base" or "adapter" (see `RankWeightSource`)."""

        def send():
            if self.device is not None:  # the current CUDA device is per thread
                torch.cuda.set_device(self.device)
            self.transfer.send_weights()

        start = time.perf_counter()
        self._wait_for_earlier_send()
        self.source.send_published, self.source.kind = published, kind
        nbytes = sum(m.nbytes for m in self.source.tensor_meta())
        timeout_s = self.info["timeout_s"]
        self.in_flight = in_daemon_thread(send)
        try:
            done, _ = wait([self.in_flight], timeout=timeout_s)
            if not done:
                raise TimeoutError(f"weight transport: {self.info['engine_name']} did not finish the {self.backend} "
                                   f"weight update within {timeout_s:.0f}s")
            self.in_flight.result()
        except BaseException:
            if self.in_flight.done():  # (a send still running is finished by the next call, or close)
                self.source.finish_live()
            raise
        finally:
            if self.in_flight.done():
                self.source.send_published = False
        return {"sync/seconds": time.perf_counter() - start, "sync/bytes": float(nbytes)}

    def _wait_for_earlier_send(self) -> None:
        """A send that timed out still runs in its thread until its peers are gone (the publisher
        kills a hung engine next): it must end before anything else reads the weight source."""
        if self.in_flight is None or self.in_flight.done():
            return
        done, _ = wait([self.in_flight], timeout=self.info["timeout_s"])
        if not done:
            raise RuntimeError(f"weight transport: an earlier send to {self.info['engine_name']} is still stuck")
        self.source.send_published = False
        self.source.finish_live()

    def close(self) -> None:
        self._wait_for_earlier_send()
        shutdown = getattr(self.transfer, "shutdown", None)
        if shutdown is not None:
            shutdown()
        self.transfer = None
