"""The engine pool: the one owner of a run's vLLM engine actors.

It holds each engine's handle and place (its index; colocated: its learner rank's bundle), pings
them, replaces one that died or hung (same name, same resources, same place), counts restarts
against `ray_max_engine_restarts`, and kills them all at close. Two roles use it and neither
calls the other for it:

- the generator (`sampling/remote_generator.py`) samples from `pool.engines` and asks for a
  replacement when a part it waits for is lost;
- the weight publisher (`runtime/publisher.py`) pushes to `pool.engines`, replaces engines that
  died while idle (found before a push) or during a push, its probe or a replacement's sync, and
  gives a replacement the published weights before it serves (`pool.stale` says which engines
  still need them).

An engine is HEALTHY, or STALE (replaced, alive, not yet given the published weights: it serves
nothing until the publisher syncs it), or dead (found by a failed call, then replaced at once).

Pings go to the engine's `control` concurrency group (its own thread, see `ENGINE_CONCURRENCY`), so
an engine busy sampling or blocked in a weight transfer still answers: only a dead process, or a
stopped or hung one, fails a ping. That is how a failed push or probe tells which engine was at fault.

Each engine writes the files vLLM starts from (the model's config, the tokenizer) to a folder of
its own, `<tmp>/odpo_vllm_engines_<run>/<name>.<attempt>`, which the pool removes: the engine
cannot, as `ray.kill` and a SIGKILL end its process without running any of its code. A replaced
engine's folder goes in `replace`, the run's folder in `close`. The pool runs in the driver, so
this reaches the folders on the driver's node only: on a one-node cluster all of them. On a
multi-node cluster the folders of engines on other nodes stay in those nodes' temporary folders
(a few MB each: config and tokenizer); being named by run, they can be deleted once it is over.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from odpo_vllm.primitives.preemption import StopWaiting
from odpo_vllm.primitives.waits import Notice, engine_lost, wait_all

logger = logging.getLogger(__name__)

# `ray.remote(**ENGINE_CONCURRENCY)(VLLMGenerator)`: sampling and weight updates run one at a time in
# the default group; `ping` and `pid` in a thread of their own (they only read attributes).
ENGINE_CONCURRENCY = {"concurrency_groups": {"control": 1}}
DIAGNOSE_S = 60.0  # a ping to the control thread answers in milliseconds unless the process is stopped or gone
ENGINE_FILES_PREFIX = "odpo_vllm_engines_"


class EnginePool:
    """`start_engine(name, index, attempt, files_dir) -> actor handle`: a new engine for place
    `index` (the placement's recipe: resources, bundle, constructor arguments); `attempt` 0 is
    the first start, a replacement gets a fresh Ray name from it; `files_dir` is the folder the
    engine writes its start-up files to (see above). `faults` is where the restart count and
    the seconds they cost are kept (the run logs them)."""

    def __init__(self, start_engine: Callable[[str, int, int, str], Any], count: int, timeout_s: float,
                 max_restarts: int, faults: dict | None = None, start_timeout_s: float | None = None):
        import ray

        # how long an engine may take to come up (first start or replacement): a vLLM start
        # loads the model, which a short `timeout_s` for calls must not cut off
        self.start_timeout_s = timeout_s if start_timeout_s is None else start_timeout_s

        self.ray, self.start_engine, self.timeout_s, self.max_restarts = ray, start_engine, timeout_s, max_restarts
        self.faults = faults if faults is not None else {}
        self.engines: dict[str, Any] = {}
        self.restarts: dict[str, int] = {}  # failures, against max_restarts
        self.incarnations: dict[str, int] = {}  # replacements, failed or not (each gets a fresh Ray name)
        self.stale: set[str] = set()
        self.files_root = tempfile.mkdtemp(prefix=ENGINE_FILES_PREFIX)  # this run's, on the driver's node
        try:
            for index in range(count):
                name = f"vllm-engine-{index}"
                self.engines[name] = start_engine(name, index, 0, self.files_dir(name, 0))
        except BaseException:  # nobody holds the pool yet to close it
            self.close()
            raise

    def wait_started(self) -> None:
        """Until every engine answers a ping (vLLM is up), with a log line saying so; an engine
        still silent after `start_timeout_s` fails the start naming it. An engine whose start failed is
        left to the first weight push, which replaces it (`replace`)."""
        names = self.names
        refs = [self.ping(name) for name in names]
        pending = wait_all(refs, self.start_timeout_s, Notice(
            f"{len(names)} vLLM engine(s) to start ({', '.join(names)})", self.start_timeout_s, "ray_start_timeout_s"))
        if pending:
            late = ", ".join(names[refs.index(ref)] for ref in pending)
            raise TimeoutError(f"engine pool: {late} did not start (answer ping()) within "
                               f"{self.start_timeout_s:.0f}s (ray_start_timeout_s)")

    @property
    def names(self) -> list[str]:
        return list(self.engines)

    def incarnation(self, name: str) -> int:
        """How often `name` was replaced (a transport opened to an earlier incarnation is stale)."""
        return self.incarnations.get(name, 0)

    def files_dir(self, name: str, attempt: int) -> str:
        """The folder of engine `name`'s start number `attempt` (0: the first)."""
        return os.path.join(self.files_root, f"{name}.{attempt}")

    # ---------------------------------------------------------------- health
    def ping(self, name: str):
        """A ping of engine `name` on its control thread (answered even while it samples or
        receives weights); the Ray reference."""
        return self.engines[name].ping.options(concurrency_group="control").remote()

    def find_dead(self, names: list[str] | None = None, timeout_s: float | None = None,
                  stop: list | None = None) -> dict[str, str]:
        """Each engine of `names` (default: all) that does not answer a ping within `timeout_s`
        (default `ray_timeout_s`), or whose process is gone: name -> why. A stop signal in `stop`
        ends the wait (`StopWaiting`)."""
        names = self.names if names is None else names
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        refs = [self.ping(name) for name in names]
        pending, deadline = refs, time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            if stop:
                raise StopWaiting()
            left = max(deadline - time.monotonic(), 0.0)
            wait_s = left if stop is None else min(left, 0.2)  # with a stop to watch: look at it again soon
            _, pending = self.ray.wait(pending, num_returns=len(pending), timeout=wait_s)
        dead = {}
        for name, ref in zip(names, refs):
            if ref in pending:
                dead[name] = f"did not answer ping() within {timeout_s:.0f}s"
                continue
            try:
                self.ray.get(ref)
            except Exception as err:
                if not engine_lost(err):
                    raise
                dead[name] = f"died ({type(err).__name__})"
        return dead

    # ---------------------------------------------------------------- replacement
    def replace(self, name: str, reason: str, charged: bool = True):
        """A new engine in the place of `name` (dead or stuck: `reason`), up and answering, STALE
        until the publisher syncs it; its handle. A replacement that does not come up counts as
        another failure. Past `max_restarts` for this engine: an error naming it and how often it
        failed. `charged` False: a live engine replaced because a peer's failure left it in an
        unknown state (a weight update cut short); it does not count against its budget."""
        start = time.perf_counter()
        while True:
            failures = self.restarts.get(name, 0) + charged
            self.ray.kill(self.engines[name])  # dead, or stuck: nothing more is asked of it
            shutil.rmtree(self.files_dir(name, self.incarnation(name)), ignore_errors=True)
            if failures > self.max_restarts:
                raise RuntimeError(
                    f"{name} {reason}: it failed {failures} times, more than ray_max_engine_restarts="
                    f"{self.max_restarts}; the run stops (resume from the last checkpoint with "
                    "--resume_from_checkpoint true)")
            logger.warning("%s %s: starting a replacement (%s)", name, reason,
                           f"restart {failures} of at most {self.max_restarts}" if charged else
                           "not counted against its restarts")
            self.restarts[name] = failures
            self.incarnations[name] = attempt = self.incarnation(name) + 1
            self.engines[name] = self.start_engine(name, self.names.index(name), attempt,
                                                   self.files_dir(name, attempt))
            self.stale.add(name)
            ping = self.ping(name)
            ready, _ = self.ray.wait([ping], timeout=self.start_timeout_s)
            try:
                if not ready:
                    raise TimeoutError(f"did not start (answer ping()) within {self.start_timeout_s:.0f}s "
                                       "(ray_start_timeout_s)")
                self.ray.get(ping)  # vLLM is up
                break
            except Exception as err:
                if not (isinstance(err, TimeoutError) or engine_lost(err)):
                    raise
                reason, charged = f"(its replacement) did not come up: {err}", True
        self.count_fault(time.perf_counter() - start)
        return self.engines[name]

    def count_fault(self, seconds: float) -> None:
        """Add `seconds` lost to faults; the restart count is the pool's."""
        self.faults["faults/engine_restarts"] = float(sum(self.restarts.values()))
        self.faults["faults/seconds_lost"] = self.faults.get("faults/seconds_lost", 0.0) + seconds

    def close(self) -> None:
        for engine in self.engines.values():
            self.ray.kill(engine)
        self.engines.clear()
        shutil.rmtree(self.files_root, ignore_errors=True)
