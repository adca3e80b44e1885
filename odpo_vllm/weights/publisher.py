"""Weight publishers: the one owner of the weights' way to the engines.

A publisher holds the engines it serves, the transport, the policy version the engines serve and
the sync probe. `publish(version)` makes every attached engine serve the learner's weights after
`version` optimizer steps and proves it: the engine's logprobs of a fixed probe sequence are
compared with the learner's (`sync/logprob_gap`), since a silent sync failure otherwise looks
like training. Learners only expose their weights; engines only load what they are sent.

- `LocalWeightPublisher`: learner and engine in this process (vLLM `reload_weights`, or the
  transformers sampler that shares the learner's model and needs nothing moved).
- `RayWeightPublisher`: engine actors fed by DeepSpeed ranks over vLLM's weight-transfer engines
  (NCCL, CUDA IPC or our gloo backend). A dead engine is replaced here: restarted in its place,
  sent the current weights alone and probed before it samples anything.
"""

from __future__ import annotations

import logging
import time

import torch

from odpo_vllm.runtime.roles import ActorDied, wait_for
from odpo_vllm.weights.names import LearnerWeights

logger = logging.getLogger(__name__)


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
    def __init__(self, generator, learner, probe_ids: list[int] | None, tolerance: float | None):
        self.generator, self.learner, self.probe_ids = generator, learner, probe_ids
        self.dtype = getattr(generator, "dtype", torch.float32)
        self.tolerance = default_tolerance(tolerance, self.dtype)
        self.version = -1

    def publish(self, version: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        load = getattr(self.generator, "load_weights", None)
        if load is not None:  # a vLLM engine; the transformers sampler shares the learner's model
            metrics.update(load(LearnerWeights(self.learner.model, self.dtype)).as_metrics())
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
    """Engine actors fed by a `LearnerGroup`: rank 0 sends (ZeRO-3: every rank joins the gathers).
    It also replaces dead engines (`replace_engine`), since a replacement must be given the
    current weights before it serves anything."""

    def __init__(self, learner_group, engines: dict, backend: str, probe_ids: list[int] | None,
                 tolerance: float | None, dtype: torch.dtype, timeout_s: float, workers_per_engine: int = 1,
                 bucket_bytes: int = 256 << 20, before_update=None, start_engine=None, max_restarts: int = 0,
                 faults: dict | None = None, keep_published: bool = False):
        """`engines`: name -> actor handle, shared with the generator that samples from them (this
        publisher is the one that changes it). `before_update()`: called before each push, so an
        engine finishes the batch it is sampling with the previous version first.
        `start_engine(name, index, attempt)`: a new engine actor in the place of `name` (the
        placement's); `max_restarts`: replacements allowed per engine; `faults`: where the
        restart count and the seconds they cost are kept (the run logs them). `keep_published`:
        batches can be in flight while the learners step (async_steps >= 1), so rank 0 keeps the
        published version in host memory for a replacement engine (see `replace_engine`)."""
        import ray

        self.ray, self.learner, self.engines = ray, learner_group, engines
        self.backend, self.probe_ids, self.timeout_s = backend, probe_ids, timeout_s
        self.tolerance = default_tolerance(tolerance, dtype)
        self.workers_per_engine, self.bucket_bytes = workers_per_engine, bucket_bytes
        self.before_update = before_update
        self.start_engine, self.max_restarts = start_engine, max_restarts
        self.keep_published = keep_published
        self.faults = faults if faults is not None else {}
        self.restarts: dict[str, int] = {}
        self.version = -1
        self.published_probe: torch.Tensor | None = None  # the learner's probe logprobs at `version`
        self.transport: list[str] | None = None  # the engines of the open transport
        self.unclosed: list[str] = []  # engines whose side of a closed transport is still open

    def _get(self, refs: list, names: list[str], call: str, timeout_s: float | None = None) -> list:
        return wait_for(refs, names, timeout_s or self.timeout_s, "weight publisher", call)

    # ---------------------------------------------------------------- transport lifecycle
    def open_transport(self, names: list[str] | None = None) -> None:
        """A transport from the learner to `names` (default: every engine), on a fresh port."""
        names = list(self.engines) if names is None else names
        # each engine's place among the receivers (a replacement is synced alone, in place 0)
        self._get([self.engines[n].set_transport_position.remote(i) for i, n in enumerate(names)], names,
                  "set_transport_position")
        info = {"backend": self.backend, "master_address": self.learner.master_addr,
                "master_port": self.learner.free_port_on_rank0(),
                "world_size": 1 + len(names) * self.workers_per_engine, "bucket_bytes": self.bucket_bytes,
                "timeout_s": self.timeout_s, "engine_name": ", ".join(names), "keep_published": self.keep_published}
        self.learner.call("open_weight_transport", [self.engines[n] for n in names], info)
        self.transport = names

    def close_transport(self, dead: str | None = None, timeout_s: float | None = None) -> None:
        """Close the learner's side, then the engines' (`dead`: an engine that cannot take part;
        the others may be busy sampling then, so their side is closed before the next push)."""
        if self.transport is None:
            return
        names, self.transport = self.transport, None
        self.learner.call("close_weight_transport")
        if dead is not None:
            self.unclosed += [n for n in names if n != dead]
            return
        self._shutdown_engine_side(names, timeout_s)

    def _shutdown_engine_side(self, names: list[str], timeout_s: float | None = None) -> None:
        # (an NCCL backend holds a communicator and buffers on each engine's GPU until then)
        self._get([self.engines[n].shutdown_weight_transfer_engine.remote() for n in names], names,
                  "shutdown_weight_transfer_engine", timeout_s)

    # ---------------------------------------------------------------- publishing
    def _probe(self, names: list[str], version: int, learned: torch.Tensor) -> float:
        """The largest logprob gap between the learner's probe logprobs `learned` and the engines
        `names`."""
        served = self._get([self.engines[n].sequence_logprobs.remote(self.probe_ids) for n in names], names,
                           "sequence_logprobs")
        return max(probe_gap(s, learned, self.tolerance, n, version) for s, n in zip(served, names))

    def publish(self, version: int) -> dict[str, float]:
        if self.before_update is not None:
            self.before_update()
        if self.transport != list(self.engines):
            self.close_transport()
            unclosed, self.unclosed = [n for n in dict.fromkeys(self.unclosed) if n in self.engines], []
            if unclosed:  # survivors of a transport that lost an engine; idle now
                self._shutdown_engine_side(unclosed)
            self.open_transport()
        metrics = self.learner.call("send_weights")[0]  # rank 0's figures
        names = list(self.engines)
        self._get([self.engines[n].set_policy_version.remote(version) for n in names], names, "set_policy_version")
        self.version = version
        if self.probe_ids is not None:
            self.published_probe = self.learner.sequence_logprobs(self.probe_ids)
            metrics["sync/logprob_gap"] = self._probe(names, version, self.published_probe)
        return metrics

    # ---------------------------------------------------------------- faults
    def replace_engine(self, name: str, reason: str, push_follows: bool = False):
        """A new engine in the place of `name` (dead or stuck: `reason`), serving the published
        version before anything can be sampled from it; its handle. `push_follows`: a weight push
        comes next and nothing waits for this engine before it, so the push gives it the weights.
        A replacement that does not come up counts as another failure. Past `max_restarts` for
        this engine: an error naming it and how often it failed."""
        start = time.perf_counter()
        while True:
            failures = self.restarts.get(name, 0) + 1
            self.ray.kill(self.engines[name])  # dead, or stuck: nothing more is asked of it
            if self.transport is not None and name in self.transport:
                self.close_transport(dead=name)
            if failures > self.max_restarts:
                raise RuntimeError(
                    f"{name} {reason}: it failed {failures} times, more than ray_max_engine_restarts="
                    f"{self.max_restarts}; the run stops (resume from the last checkpoint with "
                    "--resume_from_checkpoint true)")
            logger.warning("%s %s: starting a replacement (restart %d of at most %d)", name, reason, failures,
                           self.max_restarts)
            self.restarts[name] = failures
            # the same resources (colocated: the same bundle), name, place in `engines` and seeds
            self.engines[name] = self.start_engine(name, list(self.engines).index(name), failures)
            try:
                self._get([self.engines[name].ping.remote()], [name], "ping")  # vLLM is up
                break
            except (ActorDied, TimeoutError) as err:
                reason = f"(its replacement) did not come up: {err}"
        if not push_follows:
            self._sync_replacement(name)
        lost = time.perf_counter() - start
        self.faults["faults/engine_restarts"] = float(sum(self.restarts.values()))
        self.faults["faults/seconds_lost"] = self.faults.get("faults/seconds_lost", 0.0) + lost
        logger.warning("%s replaced in %.1fs%s", name, lost,
                       "" if push_follows else f"; it serves policy version {self.version}")
        return self.engines[name]

    def _sync_replacement(self, name: str) -> None:
        """An engine that has not been synced serves nothing: send it the published version alone
        (the other engines keep sampling), then probe it as every push is probed. The batches it
        inherits were scheduled for that version; with async_steps >= 1 the learners may have
        stepped past it already, so rank 0 sends the copy it kept. (Otherwise nothing is in
        flight while the learners step: the live weights are the published ones whenever a batch
        is inherited.)"""
        engine = self.engines[name]
        self.open_transport([name])
        self.learner.call("send_weights", self.keep_published)
        self.close_transport()
        self._get([engine.set_policy_version.remote(self.version)], [name], "set_policy_version")
        if self.probe_ids is not None:  # against the learner's logprobs at the published version
            self._probe([name], self.version, self.published_probe)

    def close(self) -> None:
        try:  # briefly: after a failure an engine may be stuck, and everything is killed next
            self.close_transport(timeout_s=min(self.timeout_s, 10.0))
        except Exception as err:  # closing after a failure must not hide the failure
            logger.debug("weight publisher: closing the transport failed: %s", err)
