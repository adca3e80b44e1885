"""vLLM engine actors used as one generator, and what happens when one of them dies.

A batch's prompts are split into parts, one per engine of the engine pool; each part keeps its
engine's name, its prompts and its seed until it is sampled. When an engine's process dies (or a
part waits longer than `timeout_s`), the part is *lost*: the main thread has the pool replace the
engine, has the weight publisher give the replacement the published weights, and re-issues every
unfinished part of that engine there, with the same seeds. Every part in flight was submitted
while the engines served the published version (a push waits until the generator has drained),
so the replacement samples each lost part with the version it was meant for and the run goes on
as if nothing happened.

Threads: parts are waited for in the pipeline's background thread (`RemoteRollouts.result`) and
in the thread that runs the training loop (`drain`, `recover`); only the loop's thread replaces
engines (the background thread waits for it, and gives up when the generator closes).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from odpo_vllm.core.batches import Rollouts
from odpo_vllm.primitives.preemption import StopWaiting
from odpo_vllm.primitives.waits import engine_lost

logger = logging.getLogger(__name__)

POLL_S = 0.1  # how often a waiter looks at a part that is not sampled yet


@dataclass
class _Part:
    """One engine's share of one batch, until it is sampled."""

    engine: str
    prompts: list
    num_samples: int
    seed: int
    ref: Any
    submitted: float = field(default_factory=time.monotonic)
    value: Any = None
    lost: str | None = None  # why the current ref will never give a value
    error: BaseException | None = None  # the run cannot recover this part
    media: list | None = None  # a vision-language batch: each prompt's `multimodal.PromptMedia`

    def call(self, engine):
        """This part's `generate` on `engine` (a text part is called without `media`)."""
        extra = {} if self.media is None else {"media": self.media}
        return engine.generate.remote(self.prompts, self.num_samples, self.seed, **extra)


class RemoteRollouts:
    """Rollouts being sampled by engine actors; `result()` merges their parts into one block layout."""

    def __init__(self, generator: "RemoteGenerator", parts: list[_Part], bounds: list[tuple[int, int]],
                 prompt_ids, num_samples: int):
        self.generator, self.parts, self.bounds = generator, parts, bounds
        self.prompt_ids, self.num_samples = prompt_ids, num_samples

    def result(self, repair: bool = False) -> Rollouts:
        """Wait for every part (re-issued ones included). `repair`: this is the main thread, which
        replaces dead engines itself; a background thread waits for the main thread to do it."""
        parts = [self.generator.wait_part(part, repair) for part in self.parts]
        total, k = len(self.prompt_ids), self.num_samples
        completions: list = [None] * (k * total)
        ended = torch.zeros(k * total, dtype=torch.bool)
        with_logprobs = all(part.sample_logprobs is not None for part in parts)
        logprobs: list | None = [None] * (k * total) if with_logprobs else None
        for (a, b), part in zip(self.bounds, parts):
            local = b - a
            for j in range(k):
                for i in range(local):
                    row, global_row = j * local + i, j * total + a + i
                    completions[global_row] = part.completion_ids[row]
                    ended[global_row] = part.contains_eos[row]
                    if with_logprobs:
                        logprobs[global_row] = part.sample_logprobs[row]
        versions = {part.policy_version for part in parts}
        if len(versions) != 1:
            raise RuntimeError(f"generator: engines sampled one batch with different policy versions {versions}")
        return Rollouts(self.prompt_ids, completions, ended, k, versions.pop(),
                        engine_idle_s=max(part.engine_idle_s for part in parts),
                        sample_s=max(part.sample_s for part in parts), sample_logprobs=logprobs)


class RemoteGenerator:
    """The engine pool's engines used as one generator: prompts split across engines, completions
    merged back into one block layout. `publisher`: the weight publisher, which gives an engine the
    pool replaced the published weights before a lost part is re-issued there."""

    def __init__(self, pool, publisher, timeout_s: float):
        import ray

        self.ray, self.pool, self.publisher, self.timeout_s = ray, pool, publisher, timeout_s
        self.lock = threading.Lock()
        self.parts: list[_Part] = []  # every part not yet known to be sampled, in submission order
        # when each engine last finished a part: a part queued behind others is timed from there
        self.free_since: dict[str, float] = {}

    # ---------------------------------------------------------------- sampling
    def submit(self, prompt_ids: list[list[int]], num_samples: int, seed: int, media=None) -> RemoteRollouts:
        """`media`: one `PromptMedia` per prompt (a vision-language batch); each engine gets its
        prompts' share."""
        names = self.pool.names
        size, extra = divmod(len(prompt_ids), len(names))
        parts, bounds, start = [], [], 0
        for index, name in enumerate(names):
            stop = start + size + (index < extra)
            if stop > start:
                part = _Part(name, prompt_ids[start:stop], num_samples, seed + index * 1_000_003, None,
                             media=media[start:stop] if media is not None else None)
                part.ref = part.call(self.pool.engines[name])
                parts.append(part)
                bounds.append((start, stop))
            start = stop
        with self.lock:
            self.parts += parts
        return RemoteRollouts(self, parts, bounds, prompt_ids, num_samples)

    def generate(self, prompt_ids: list[list[int]], num_samples: int, seed: int, media=None) -> Rollouts:
        return self.submit(prompt_ids, num_samples, seed, media).result(repair=True)

    def _poll(self, part: _Part, timeout: float) -> None:
        """Wait up to `timeout` for the part's current call; record its value or why it is lost."""
        ref = part.ref
        ready, _ = self.ray.wait([ref], timeout=timeout)
        lost = None
        if ready:
            try:
                value = self.ray.get(ref)
            except Exception as err:
                if not engine_lost(err):
                    raise
                lost = f"died ({type(err).__name__})"
            else:
                with self.lock:
                    if part.ref is ref:
                        part.value = value
                        self.free_since[part.engine] = time.monotonic()
                return
        elif time.monotonic() - max(part.submitted, self.free_since.get(part.engine, 0.0)) > self.timeout_s:
            lost = f"did not answer generate() within {self.timeout_s:.0f}s"
        if lost is not None:
            with self.lock:
                if part.ref is ref and part.lost is None:
                    part.lost = lost

    def wait_part(self, part: _Part, repair: bool):
        """The part's rollouts. `repair`: this thread runs the loop and replaces dead engines
        itself; otherwise it waits for that thread to re-issue a lost part (`close()` or a failed
        replacement ends the wait with an error)."""
        while True:
            if part.error is not None:
                raise part.error
            if part.value is not None:
                return part.value
            if part.lost is None:
                self._poll(part, POLL_S)
            elif repair:
                self.recover()
            else:
                time.sleep(POLL_S)  # the main thread re-issues it

    def drain(self, stop: list | None = None) -> None:
        """Before a weight push: wait until every submitted part is sampled (an update must not
        overtake one), replacing engines that die on the way. A stop signal in `stop` ends the
        wait (`StopWaiting`): a preemption's checkpoint does not wait for a hung engine."""
        while True:
            if stop:
                raise StopWaiting()
            with self.lock:
                pending = [part for part in self.parts if part.value is None]
                if not pending:
                    self.parts = []
                    break
            for part in pending:
                if part.error is not None:
                    raise part.error
                if part.lost is None and part.value is None:
                    self._poll(part, POLL_S / len(pending))
            self.recover()

    # ---------------------------------------------------------------- faults
    def recover(self) -> None:
        """(Main thread.) Replace every engine with a lost part and re-issue its unfinished parts
        there, in their order, with their seeds."""
        with self.lock:
            self.parts = [part for part in self.parts if part.value is None]
            dead = {}
            for part in self.parts:
                if part.lost is not None and part.error is None:
                    dead.setdefault(part.engine, part.lost)
        for name, reason in dead.items():
            try:
                self.pool.replace(name, reason)
                self.publisher.sync_replacement(name)  # may replace it again (a replacement lost during its sync)
                engine = self.pool.engines[name]
            except BaseException as err:
                self._fail_all(err)  # the run stops: no waiter may wait for a re-issue
                raise
            with self.lock:
                for part in self.parts:
                    if part.engine == name and part.value is None:
                        part.ref = part.call(engine)
                        part.submitted, part.lost = time.monotonic(), None

    def _fail_all(self, err: BaseException) -> None:
        with self.lock:
            for part in self.parts:
                if part.value is None and part.error is None:
                    part.error = err

    def close(self) -> None:
        """Ends every wait for a part; the engines are the pool's to close."""
        self._fail_all(RuntimeError("generator: closed while this batch was being sampled"))
