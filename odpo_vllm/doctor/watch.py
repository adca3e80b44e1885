"""Timing the trainer's own steps from outside.

The doctor runs the real `OnlineDPOTrainer`, whose constructor starts the learner, the engines
and the first weight push in one call, and whose `train()` samples, learns, pushes and saves in
one loop. To give each of those its own row, `Phases.watching` wraps the methods that do them
(on a class, an instance or a module) for the length of a block and records, per row, the
seconds spent, what each call returned and the first error; the originals come back at the end.
Nothing is re-implemented: the wrapped code is the code a run executes.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Target:
    """`owner.attribute` (a class, an instance or a module) times into row `row`. `after`, if
    given, is called as `after(result, *args)` once the call returned, inside the timing (a
    check of the row's own, e.g. that the engines a start left behind are alive); its error
    fails the row like the call's."""

    owner: Any
    attribute: str
    row: str
    after: Callable[..., None] | None = None


class Phases:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.results: dict[str, list] = defaultdict(list)
        self.errors: dict[str, BaseException] = {}  # each row's first, in the order they happened
        self.called: set[str] = set()

    def ran(self, row: str) -> bool:
        return row in self.called

    def failed_row(self, rows: list[str]) -> str | None:
        """The row of `rows` whose call raised last (errors are kept in the order they happened)."""
        failed = [row for row in self.errors if row in rows]
        return failed[-1] if failed else None

    def _wrap(self, original: Callable, target: Target) -> Callable:
        @functools.wraps(original)
        def timed(*args, **kwargs):
            self.called.add(target.row)
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                if target.after is not None:
                    target.after(result, *args)
            except BaseException as err:
                self.errors.setdefault(target.row, err)
                raise
            finally:
                self.seconds[target.row] += time.perf_counter() - start
            self.results[target.row].append(result)
            return result

        return timed

    @contextlib.contextmanager
    def watching(self, targets: list[Target]):
        saved = []
        try:
            for target in targets:
                own = vars(target.owner)  # an inherited method is restored by deleting the wrapper
                saved.append((target, target.attribute in own, own.get(target.attribute)))
                setattr(target.owner, target.attribute, self._wrap(getattr(target.owner, target.attribute), target))
            yield self
        finally:
            for target, had, original in reversed(saved):
                if had:
                    setattr(target.owner, target.attribute, original)
                else:
                    delattr(target.owner, target.attribute)
