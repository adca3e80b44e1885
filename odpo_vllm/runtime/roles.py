"""The roles of a run and their contracts.

A placement (`placement.py`) builds one `Roles`: who samples (generator), who learns (learner),
who scores (rewards), who moves the weights (publisher). The training loop only uses these
contracts, so it never asks which placement it runs in. Every role that starts something
(an engine, actors, a Ray cluster) stops it in `close()`; `Roles.close()` closes them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from odpo_vllm.core.batches import PairBatch, Rollouts

logger = logging.getLogger(__name__)


class RolloutHandle(Protocol):
    def result(self) -> Rollouts: ...


class Generator(Protocol):
    """Samples k completions per prompt in block layout with the weights it serves."""

    def submit(self, prompt_ids: list[list[int]], num_samples: int, seed: int) -> RolloutHandle:
        """Start sampling now (the order of submits and weight updates is the schedule)."""

    def generate(self, prompt_ids: list[list[int]], num_samples: int, seed: int) -> Rollouts: ...

    def close(self) -> None: ...


class Learner(Protocol):
    """Policy, reference and optimizer: one optimizer step per `step` call."""

    def step(self, batch: PairBatch, beta: float) -> dict[str, float]: ...

    def evaluate(self, batch: PairBatch, beta: float) -> dict[str, float]: ...

    def sequence_logprobs(self, token_ids: list[int]) -> torch.Tensor: ...

    def save(self, directory: str) -> None: ...

    def load(self, directory: str) -> None: ...


class Scorer(Protocol):
    """Scores k*B completions (block layout): combined scores and each function's mean."""

    def score(self, prompts: list, completions: list[str], completion_ids: list[list[int]],
              columns: dict[str, list], contains_eos: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]: ...


class WeightPublisher(Protocol):
    """Makes the engines serve the learner's weights of a given policy version (optimizer step)."""

    version: int

    def publish(self, version: int) -> dict[str, float]: ...

    def close(self) -> None: ...


class ActorDied(RuntimeError):
    """An actor's process is gone (the error names it)."""


def wait_for(refs: list, names: list[str], timeout_s: float, who: str, call: str) -> list:
    """The results of Ray calls `refs` (made to the actors `names`, in order), or an error that
    names the actors which did not answer `call` within `timeout_s` (TimeoutError) or died."""
    import ray

    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [names[refs.index(ref)] for ref in pending]
        raise TimeoutError(f"{who}: {', '.join(late)} did not answer {call}() within {timeout_s:.0f}s")
    results = []
    for name, ref in zip(names, refs):
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayActorError as err:
            raise ActorDied(f"{who}: {name} died during {call}() ({type(err).__name__})") from err
    return results


class Done:
    """The handle of work already finished (an in-process generator samples at submit time)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


@dataclass
class Roles:
    generator: Any
    learner: Any
    rewards: Any
    publisher: Any
    # Ray placements sample and score in the background while the learners train; in one
    # process the roles share the model and the cores, so the pipeline runs them in turn.
    background_sampling: bool = False
    closers: list[Callable[[], None]] = field(default_factory=list)  # run in reverse order by close()
    # Called by whoever waits for rollouts in the main thread: replaces engines that died
    # (Ray placements; nothing to do in one process).
    recover: Callable[[], None] = lambda: None
    # Faults survived so far (`faults/engine_restarts`, `faults/seconds_lost`), logged by the loop.
    faults: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        """Close every role (publisher first: the transport needs live peers); idempotent."""
        parts = [self.publisher, self.generator, self.rewards, self.learner]
        closers = [getattr(part, "close", None) for part in parts] + list(reversed(self.closers))
        self.closers = []
        self.publisher = self.generator = self.rewards = self.learner = None
        errors = []
        for close in closers:
            if close is None:
                continue
            try:
                close()
            except Exception as err:  # close the rest; report the first failure afterwards
                logger.debug("closing a role failed: %s", err)
                errors.append(err)
        if errors:
            raise errors[0]
