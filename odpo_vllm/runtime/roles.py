"""The roles of a run.

A placement (`placement.py`) builds one `Roles`: who samples (generator: `submit`, `generate`,
`drain`, `recover`), who learns (learner: `step`, `evaluate`, `sequence_logprobs`, `save`,
`load`), who scores (rewards: `score`), who moves the weights (publisher: `publish`, `version`)
and, under Ray, the engine pool the generator and the publisher share. The training loop only
uses these calls, so it never asks which placement it runs in. Every role that starts something
(an engine, actors, a Ray cluster) stops it in `close()`; `Roles.close()` closes them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)


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
    engine_pool: Any = None  # Ray placements: the engine actors, shared by generator and publisher
    # Faults survived so far (`faults/engine_restarts`, `faults/reward_worker_restarts`,
    # `faults/seconds_lost`), logged by the loop.
    faults: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        """Close every role (publisher first: the transport needs live peers); idempotent."""
        parts = [self.publisher, self.generator, self.engine_pool, self.rewards, self.learner]
        closers = [getattr(part, "close", None) for part in parts] + list(reversed(self.closers))
        self.closers = []
        self.publisher = self.generator = self.engine_pool = self.rewards = self.learner = None
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
