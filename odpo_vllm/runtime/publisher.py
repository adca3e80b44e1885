"""Weight publishers: the one owner of the weights' way to the engines.

A publisher holds the engines it serves, the transport, the policy version the engines serve and
the sync probe. `publish(version)` makes every attached engine serve the learner's weights after
`version` optimizer steps and proves it: the engine's logprobs of a fixed probe sequence are
compared with the learner's (`sync/logprob_gap`), since a silent sync failure otherwise looks
like training. Learners only expose their weights; engines only load what they are sent.

- `LocalWeightPublisher`: learner and engine in this process (vLLM `reload_weights`, or the
  transformers sampler that shares the learner's model and needs nothing moved).
- `RayWeightPublisher`: the engine pool's actors fed by DeepSpeed ranks over vLLM's weight
  transfer (NCCL, CUDA IPC or our gloo backend). An engine the pool replaced is given the
  published weights here, alone, and probed before it samples anything.
"""

from __future__ import annotations

import logging
import time

import torch

from odpo_vllm.primitives.preemption import StopWaiting
from odpo_vllm.primitives.waits import wait_for
from odpo_vllm.weights.adapter import adapter_weights
from odpo_vllm.weights.names import LearnerWeights
from odpo_vllm.weights.wire import SyncStats

logger = logging.getLogger(__name__)

RANK_MARGIN_S = 30.0  # how much longer the driver waits for a push than rank 0 waits for its engines
STOP_PING_S = 3.0  # after a stop signal: an engine that does not answer a ping on its control thread in this is hung


def default_tolerance(tolerance: float | None, dtype: torch.dtype) -> float:
    return tolerance if tolerance is not None else (1e-3 if dtype == torch.float32 else 0.1)


def probe_gap(served: torch.Tensor, learned: torch.Tensor, tolerance: float, engine: str, version: int) -> float:
    """Max |engine - learner| logprob over the probe; a warning above `tolerance`."""
    gap = (served - learned).abs().max().item()
    if gap > tolerance:
        logger.warning("%s serves weights that differ from the learner's: logprob gap %.3g > %.3g (policy version %d)",
                       engine, gap, tolerance, version)
    return gap


class LocalWeightPublisher:
    """`lora_sync="adapter"`: the engine gets the base weights at the first push and only the
    adapter's tensors afterwards (`VLLMGenerator.load_adapter`)."""

    def __init__(self, generator, learner, probe_ids: list[int] | None, tolerance: float | None,
                 lora_sync: str = "merged"):
        self.generator, self.learner, self.probe_ids = generator, learner, probe_ids
        self.dtype = getattr(generator, "dtype", torch.float32)
        self.tolerance = default_tolerance(tolerance, self.dtype)
        self.version = -1
        self.lora_sync, self.base_sent = lora_sync, False

    def _send(self, load) -> SyncStats:
        model = self.learner.model
        if self.lora_sync != "adapter":
            return load(LearnerWeights(model, self.dtype))
        stats = SyncStats(0.0, 0)
        if not self.base_sent:  # once: the base weights, which LoRA training never changes
            stats = load(LearnerWeights(model, self.dtype, merge_lora=False))
            self.base_sent = True
        adapter = self.generator.load_adapter(adapter_weights(model, self.dtype))
        return SyncStats(stats.seconds + adapter.seconds, stats.bytes + adapter.bytes)

    def publish(self, version: int, stop: list | None = None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        load = getattr(self.generator, "load_weights", None)
        if load is not None:  # a vLLM engine; the transformers sampler shares the learner's model
            metrics.update(self._send(load).as_metrics())
        self.generator.set_policy_version(version)
        self.version = version
        if load is not None and self.probe_ids is not None:
            metrics["sync/logprob_gap"] = probe_gap(
                self.generator.sequence_logprobs(self.probe_ids), self.learner.sequence_logprobs(self.probe_ids),
                self.tolerance, getattr(self.generator, "name", "engine"), version)
        return metrics

    def close(self) -> None:
        pass


class RayWeightPublisher:
    """The engine pool's engines fed by a `LearnerGroup`: rank 0 sends (ZeRO-3: every rank joins
    the gathers). The pool replaces engines; this publisher gives a replacement the published
    weights (`sync_replacement`), since it serves nothing before it has them.

    `lora_sync="adapter"`: an engine gets the base weights once (its first push, or its sync as
    a replacement) and the LoRA adapter's tensors alone at every push; which engine incarnations
    hold the base is this publisher's record (`based`)."""

    def __init__(self, learner_group, pool, backend: str, probe_ids: list[int] | None, tolerance: float | None,
                 dtype: torch.dtype, timeout_s: float, workers_per_engine: int = 1, lora_sync: str = "merged"):
        self.learner, self.pool = learner_group, pool
        self.lora_sync = lora_sync
        self.based: dict[str, int] = {}  # engine -> the incarnation that holds the base weights
        self.backend, self.probe_ids, self.timeout_s = backend, probe_ids, timeout_s
        self.tolerance = default_tolerance(tolerance, dtype)
        self.workers_per_engine = workers_per_engine
        self.version = -1
        self.published_probe: torch.Tensor | None = None  # the learner's probe logprobs at `version`
        # the open transport's engines and the ones whose side of a closed transport is still
        # open, each with the incarnation it was opened with (a replaced engine's is gone)
        self.transport: dict[str, int] | None = None
        self.unclosed: dict[str, int] = {}

    def _get(self, refs: list, names: list[str], call: str, timeout_s: float | None = None,
             stop: list | None = None) -> list:
        return wait_for(refs, names, timeout_s or self.timeout_s, "weight publisher", call, stop=stop)

    def _engines(self, names: list[str]) -> list:
        return [self.pool.engines[n] for n in names]

    # ---------------------------------------------------------------- transport lifecycle
    def _open_transport(self, names: list[str]) -> None:
        """A transport from the learner to the engines `names`, on a fresh port."""
        # each engine's place among the receivers (a replacement is synced alone, in place 0)
        self._get([e.set_transport_position.remote(i) for i, e in enumerate(self._engines(names))], names,
                  "set_transport_position")
        wire = {"backend": self.backend, "master_address": self.learner.master_addr,
                "master_port": self.learner.free_port_on_rank0(),
                "world_size": 1 + len(names) * self.workers_per_engine, "timeout_s": self.timeout_s,
                "engine_name": ", ".join(names)}
        self.learner.call("open_weight_transport", self._engines(names), wire)
        self.transport = {n: self.pool.incarnation(n) for n in names}

    def _close_transport(self, idle: list[str] | None = None, timeout_s: float | None = None) -> None:
        """Close the learner's side, then the side of each engine in `idle` (default: every engine)
        that still holds one (an NCCL backend keeps a communicator and buffers on the engine's GPU
        until then). Engines that may be sampling now are closed before the next push instead."""
        if self.transport is not None:
            opened, self.transport = self.transport, None
            self.unclosed.update(opened)  # first: their sides are closed below or before the next push
            # bounded like the engines' side: at close after a failure a hung rank answers nothing,
            # and the run must not wait ray_timeout_s for it a second time
            self.learner.call_with_timeout("close_weight_transport", timeout_s or self.timeout_s)
        idle = self.pool.names if idle is None else idle
        ready = [n for n in idle if n in self.unclosed and self.pool.incarnation(n) == self.unclosed[n]]
        for name in [n for n in self.unclosed if n in idle or n not in self.pool.engines]:
            del self.unclosed[name]
        self._get([e.shutdown_weight_transfer_engine.remote() for e in self._engines(ready)], ready,
                  "shutdown_weight_transfer_engine", timeout_s)

    # ---------------------------------------------------------------- publishing
    def _probe(self, names: list[str], version: int, learned: torch.Tensor, stop: list | None = None) -> float:
        """The largest logprob gap between the learner's probe logprobs `learned` and the engines `names`."""
        served = self._get([e.sequence_logprobs.remote(self.probe_ids) for e in self._engines(names)], names,
                           "sequence_logprobs", stop=stop)
        return max(probe_gap(s, learned, self.tolerance, n, version) for s, n in zip(served, names))

    def publish(self, version: int, stop: list | None = None) -> dict[str, float]:
        """(Engines idle: the generator has drained.) Every engine serves the learner's weights
        after `version` optimizer steps. An engine found dead now is replaced first (no batch waits
        for it: this push gives it the weights); one that dies or hangs during the push or the
        probe is replaced and the push is made again, within `ray_max_engine_restarts`. A stop
        signal in `stop` during the push, its probe or the diagnosis of a failure ends it
        (`StopWaiting`): engines that do not answer a ping within a few seconds are killed, so
        that rank 0, which sends to them, is free for the checkpoint."""
        for name, reason in self.pool.find_dead(stop=stop).items():
            self.pool.replace(name, reason)
        while True:
            names = self.pool.names
            try:
                try:
                    metrics = self._send(names, version, stop)
                except StopWaiting:
                    raise
                except Exception as err:
                    self._replace_lost(names, err, "the weight push", cut_short=True, stop=stop)
                    continue
                if self.probe_ids is None:
                    break
                probe = self.learner.sequence_logprobs(self.probe_ids)
                try:
                    metrics["sync/logprob_gap"] = self._probe(names, version, probe, stop)
                    break
                except StopWaiting:
                    raise
                except Exception as err:  # the replacement gets the weights in the next round
                    self._replace_lost(names, err, "the sync probe", cut_short=False, stop=stop)
            except StopWaiting:
                self._abandon_push(self.pool.names)
                raise
        self.published_probe = probe if self.probe_ids is not None else None
        self.version = version
        self.pool.stale.clear()
        return metrics

    def _send(self, names: list[str], version: int, stop: list | None = None) -> dict[str, float]:
        if self.transport != {n: self.pool.incarnation(n) for n in names}:
            self._close_transport()
            self._open_transport(names)
        if self.lora_sync != "adapter":
            metrics = self._rank_send(stop=stop)
        else:  # the base to engines that lack it (all of this transport's, which is harmless), then the adapter
            metrics = {"sync/seconds": 0.0, "sync/bytes": 0.0}
            if any(self.based.get(n) != self.pool.incarnation(n) for n in names):
                metrics = self._rank_send(kind="base", stop=stop)
                self.based.update({n: self.pool.incarnation(n) for n in names})
            adapter = self._rank_send(kind="adapter", stop=stop)
            metrics = {key: metrics[key] + adapter[key] for key in metrics}
        self._get([e.set_policy_version.remote(version) for e in self._engines(names)], names, "set_policy_version",
                  stop=stop)
        return metrics

    def _rank_send(self, published: bool = False, kind: str = "weights", stop: list | None = None) -> dict:
        """One send from the ranks to the open transport's engines; rank 0's metrics. The driver
        waits longer than rank 0 does for its engines, so a hung engine is reported by the rank
        (which names the engines it sends to), not as a silent rank."""
        return self.learner.call_with_timeout("send_weights", self.timeout_s + RANK_MARGIN_S, published, kind,
                                              stop=stop)[0]

    def _abandon_push(self, names: list[str]) -> None:
        """A push given up for a stop signal: engines silent for `STOP_PING_S` are killed (rank 0's
        send to them then fails; at once over gloo, while NCCL may wait for its own timeout), and
        the push is left to finish or fail on its own."""
        silent = self.pool.find_dead(names, STOP_PING_S)
        for name, reason in silent.items():
            logger.warning("%s %s during the weight push cut short by a stop signal: killed", name, reason)
            self.pool.ray.kill(self.pool.engines[name])
        self.transport, self.unclosed = None, {}  # nothing more is sent; the ranks close at the end

    def _replace_lost(self, names: list[str], err: Exception, during: str, cut_short: bool,
                      stop: list | None = None) -> None:
        """After `err` in a push or a probe to `names`: replace each engine that died or stopped
        answering (its ping goes to a thread of its own, so a live engine answers even while
        blocked in the failed transfer) and drop the transport, so the caller can try again.
        `cut_short`: the other engines of the push are replaced too, without counting against
        their budget: their weight update was cut short part-way (some layers loaded, vLLM's update session
        open), and a fresh engine is the state we know. No engine lost: the failure is not an
        engine's, and `err` is raised. A stop signal in `stop` ends the diagnosis (`StopWaiting`)."""
        from odpo_vllm.runtime.engine_pool import DIAGNOSE_S

        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise err
        lost = self.pool.find_dead(names, min(self.timeout_s, DIAGNOSE_S), stop=stop)
        if not lost:
            raise err
        for name, reason in lost.items():
            logger.warning("%s %s during %s (%s)", name, reason, during, (str(err).splitlines() or [repr(err)])[0][:300])
        for name, reason in lost.items():  # killed first: a sender blocked on it then fails at once
            self.pool.replace(name, f"{reason} during {during}")
        self._drop_transport()
        for name in names if cut_short else []:
            if name not in lost:
                self.pool.replace(name, f"was cut off during {during} by the loss of {', '.join(lost)}", charged=False)

    def _drop_transport(self) -> None:
        """After a failed transfer: the learner's side closed, the survivors' sides closed before
        the next push (`unclosed`); a side that cannot be closed now is left to that push."""
        try:
            self._close_transport(idle=[], timeout_s=min(self.timeout_s, 60.0))
        except Exception as err:  # the transport is dropped all the same (`unclosed` holds the engines' sides)
            logger.debug("weight publisher: closing the failed transport: %s", err)

    def sync_replacement(self, name: str) -> None:
        """Give the replacement `name` the published version alone (the other engines keep
        sampling), then probe it as every push is probed. The batches it inherits were scheduled
        for that version; the ranks send the published version (with async_steps >= 1 rank 0 keeps
        a copy of it, since the learners may have stepped past it already). A replacement that
        dies or hangs during its own sync is replaced again, within its restart budget."""
        if name not in self.pool.stale:
            return
        start = time.perf_counter()
        while True:
            try:
                self._sync_alone(name)
                break
            except Exception as err:
                self._replace_lost([name], err, "its replacement sync", cut_short=False)
        self.pool.stale.discard(name)
        self.pool.count_fault(time.perf_counter() - start)
        logger.warning("%s replaced; it serves policy version %d", name, self.version)

    def _sync_alone(self, name: str) -> None:
        self._close_transport(idle=[])  # the others may be sampling
        self._open_transport([name])
        if self.lora_sync == "adapter":  # a fresh engine: the base (never changed by training), then the adapter
            self._rank_send(kind="base")
            self.based[name] = self.pool.incarnation(name)
            self._rank_send(True, kind="adapter")
        else:
            self._rank_send(True)
        self._close_transport(idle=[name])
        self._get([self.pool.engines[name].set_policy_version.remote(self.version)], [name], "set_policy_version")
        if self.probe_ids is not None:  # against the learner's logprobs at the published version
            self._probe([name], self.version, self.published_probe)

    def close(self) -> None:
        try:  # briefly: after a failure or a stop an engine may be stuck, and everything is killed next
            self._close_transport(timeout_s=min(self.timeout_s, 5.0))
        except Exception as err:  # closing after a failure must not hide the failure
            logger.debug("weight publisher: closing the transport failed: %s", err)


class ServerWeightPublisher:
    """A vLLM server the user started (`python -m odpo_vllm.serve`), fed by the learner in this
    process over the same wire as the Ray placements (the server's `weight_transport`: our gloo
    backend on CPU, vLLM's NCCL between GPUs); HTTP carries the control calls only. Attaching
    checks that the server serves this policy's architecture, names and shapes. `close` closes
    the transport and leaves the server running, for the next run to attach."""

    def __init__(self, client, learner, served: dict, probe_ids: list[int] | None, tolerance: float | None,
                 timeout_s: float, group_port: int, attach: dict):
        """`served`: the server's /health answer; `attach`: what the trainer tells the server
        (context, sampling settings, EOS ids), sent with the policy's weight names and shapes."""
        from odpo_vllm.weights.names import LearnerWeights

        self.client, self.learner, self.probe_ids, self.timeout_s = client, learner, probe_ids, timeout_s
        self.group_port, self.backend, self.workers = group_port, served["weight_transport"], int(served["workers"])
        self.dtype = getattr(torch, served["dtype"])
        # the gap is as coarse as the coarser side: a bf16 learner against a float32 server too
        self.tolerance = default_tolerance(tolerance, getattr(learner, "autocast_dtype", None) or self.dtype)
        self.name = f"the vLLM server at {client.url}"
        self.weights = LearnerWeights(learner.model, self.dtype)
        self.bytes = sum(m.nbytes for m in self.weights.tensor_meta())
        metas = [[m.name, str(m.dtype).split(".")[-1], list(m.shape)] for m in self.weights.tensor_meta()]
        architectures = list(getattr(getattr(learner.model, "get_base_model", lambda: learner.model)().config,
                                     "architectures", None) or [])
        self.client.attach(dict(attach, weights=metas, architectures=architectures))
        self.transfer = None
        self.version = -1

    def _open_transport(self) -> None:
        from odpo_vllm.sampling.server_client import ServerWeightSyncClient
        from odpo_vllm.weights.vllm_backend import open_trainer_transport
        from odpo_vllm.weights.wire import DEFAULT_BUCKET_BYTES

        wire = {"master_address": self.client.local_address(), "master_port": self.group_port,
                "world_size": 1 + self.workers, "bucket_bytes": DEFAULT_BUCKET_BYTES, "timeout_s": self.timeout_s,
                "engine_name": self.name}
        self.sync_client = ServerWeightSyncClient(self.client, self.timeout_s)
        self.transfer = open_trainer_transport(self.backend, wire, rank=0, client=self.sync_client,
                                               source=self.weights)

    def publish(self, version: int, stop: list | None = None) -> dict[str, float]:
        """(The generator has drained.) The server serves the learner's weights after `version`
        optimizer steps, proved by the sync probe."""
        from odpo_vllm.weights.wire import call_with_timeout

        start = time.perf_counter()
        if self.transfer is None:
            self._open_transport()
        call_with_timeout(self.transfer.send_weights, self.timeout_s,
                          f"{self.name} did not finish the {self.backend} weight update")
        self.client.call("set_version", {"version": version})
        metrics = {"sync/seconds": time.perf_counter() - start, "sync/bytes": float(self.bytes)}
        if self.probe_ids is not None:
            served = torch.tensor(self.client.call("logprobs", {"token_ids": self.probe_ids})["logprobs"])
            metrics["sync/logprob_gap"] = probe_gap(served, self.learner.sequence_logprobs(self.probe_ids),
                                                    self.tolerance, self.name, version)
        self.version = version
        return metrics

    def close(self) -> None:
        """Both sides of the transport closed; the server keeps running."""
        transfer, self.transfer = self.transfer, None
        if transfer is None:
            return
        try:  # briefly: a server that died must not hold up the run's end
            self.sync_client.shutdown_weight_transfer_engine(timeout_s=min(self.timeout_s, 10.0))
        except Exception as err:  # closing after a failure must not hide the failure
            logger.warning("%s: closing its side of the weight transport failed: %s", self.name, err)
        shutdown = getattr(transfer, "shutdown", None)
        if shutdown is not None:
            shutdown()
