"""Weight publishers: the one owner of the weights' way to the engines.

A publisher holds the engines it serves, the transport, the policy version the engines serve and
the sync probe. `publish(version)` makes every attached engine serve the learner's weights after
`version` optimizer steps and proves it: the engine's logprobs of a fixed probe sequence are
compared with the learner's (`sync/logprob_gap`), since a silent sync failure otherwise looks
like training. Learners only expose their weights; engines only load what they are sent.

- `LocalWeightPublisher`: learner and engine in this process (vLLM `reload_weights`, or the
  transformers sampler that shares the learner's model and needs nothing moved).
- `RayWeightPublisher`: engine actors fed by DeepSpeed ranks over vLLM's weight-transfer engines
  (NCCL, CUDA IPC or our gloo backend). Engines can be detached and attached again (a restarted
  engine), and the transport closed and reopened (on a fresh port).
"""

from __future__ import annotations

import logging

import torch

from .roles import wait_for
from .weights import LearnerWeights

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
    """Engine actors fed by a `LearnerGroup`: rank 0 sends (ZeRO-3: every rank joins the gathers)."""

    def __init__(self, learner_group, engines: dict, backend: str, probe_ids: list[int] | None,
                 tolerance: float | None, dtype: torch.dtype, timeout_s: float, workers_per_engine: int = 1,
                 bucket_bytes: int = 256 << 20, before_update=None):
        """`engines`: name -> actor handle, shared with the generator that samples from them (this
        publisher is the one that changes it). `before_update()`: called before each push, so an
        engine finishes the batch it is sampling with the previous version first."""
        import ray

        self.ray, self.learner, self.engines = ray, learner_group, engines
        self.backend, self.probe_ids, self.timeout_s = backend, probe_ids, timeout_s
        self.tolerance = default_tolerance(tolerance, dtype)
        self.workers_per_engine, self.bucket_bytes = workers_per_engine, bucket_bytes
        self.before_update = before_update
        self.version = -1
        self.transport_open = False

    def _get(self, refs: list, names: list[str], call: str) -> list:
        return wait_for(refs, names, self.timeout_s, "weight publisher", call)

    # ---------------------------------------------------------------- transport lifecycle
    def open_transport(self) -> None:
        names = list(self.engines)
        info = {"backend": self.backend, "master_address": self.learner.master_addr,
                "master_port": self.learner.free_port_on_rank0(),
                "world_size": 1 + len(names) * self.workers_per_engine, "bucket_bytes": self.bucket_bytes,
                "timeout_s": self.timeout_s, "engine_name": ", ".join(names)}
        self.learner.call("open_weight_transport", [self.engines[n] for n in names], info)
        self.transport_open = True

    def close_transport(self) -> None:
        if not self.transport_open:
            return
        self.transport_open = False
        self.learner.call("close_weight_transport")
        names = list(self.engines)
        self._get([self.engines[n].shutdown_weight_transfer_engine.remote() for n in names], names,
                  "shutdown_weight_transfer_engine")

    def attach(self, name: str, engine) -> None:
        """Add an engine (e.g. a restarted one). It serves nothing until the next `publish`."""
        self.close_transport()
        self.engines[name] = engine

    def detach(self, name: str) -> None:
        """Stop serving `name` (dead or being replaced); the transport reopens without it."""
        self.engines.pop(name, None)
        self.transport_open = False  # a dead peer cannot take part in an orderly shutdown
        self.learner.call("close_weight_transport")

    # ---------------------------------------------------------------- publishing
    def publish(self, version: int) -> dict[str, float]:
        if self.before_update is not None:
            self.before_update()
        if not self.transport_open:
            self.open_transport()
        metrics = self.learner.call("send_weights")[0]  # rank 0's figures
        names = list(self.engines)
        self._get([self.engines[n].set_policy_version.remote(version) for n in names], names, "set_policy_version")
        self.version = version
        if self.probe_ids is not None:
            served = self._get([self.engines[names[0]].sequence_logprobs.remote(self.probe_ids)], names[:1],
                               "sequence_logprobs")[0]
            metrics["sync/logprob_gap"] = probe_gap(served, self.learner.sequence_logprobs(self.probe_ids),
                                                    self.tolerance, names[0], version)
        return metrics

    def close(self) -> None:
        try:
            self.close_transport()
        except Exception as err:  # closing after a failure must not hide the failure
            logger.debug("weight publisher: closing the transport failed: %s", err)
