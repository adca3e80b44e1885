"""The one way the driver waits for Ray actors: a deadline, an error that names who did not
answer, and, for the waits at start-up, log lines that say what the run waits for.

A start-up wait (`Notice`) logs at INFO when it begins ("waiting for ... (at most 900s,
ray_start_timeout_s)"), and a WARNING, which the default console shows, once it lasted a quarter
of its deadline (at least `NOTICE_S`) and every `REPEAT_S` after; a run that waits is never
silent for long."""

from __future__ import annotations

import logging
import time

from odpo_vllm.primitives.preemption import StopWaiting

logger = logging.getLogger(__name__)

NOTICE_S = 60.0  # a start-up wait longer than this is worth a warning (a vLLM engine on 2 loaded cores: ~30 s)
REPEAT_S = 120.0
STOP_LOOK_S = 0.2  # a wait that watches for a stop signal looks at it this often


class ActorDied(RuntimeError):
    """An actor's process is gone (the error names it)."""


def engine_lost(err: BaseException) -> bool:
    """Whether a failed engine call means the engine is gone (its actor process died, or vLLM's
    engine core inside a live actor did, or its node: the call's result was lost with it, or the
    node was reported dead), rather than a bug in the call."""
    import ray

    exceptions = ray.exceptions
    if isinstance(err, (exceptions.RayActorError, exceptions.ObjectLostError, exceptions.NodeDiedError)):
        return True  # ObjectLostError covers OwnerDiedError and ObjectReconstructionFailedError
    return isinstance(err, ray.exceptions.RayTaskError) and "EngineDeadError" in str(err)


class Notice:
    """The log lines of one wait for `what`, which gives up after `timeout_s` (set by `flag`): one
    at `level` now, a WARNING once it lasted `notice_s`, then every `REPEAT_S`. A wait loop calls
    `tick()` (and waits at most `slice(left)` between calls); `done()` says when a wait that was
    warned about ended."""

    def __init__(self, what: str, timeout_s: float, flag: str = "ray_timeout_s", notice_s: float | None = None,
                 level: int = logging.INFO):
        self.what, self.timeout_s, self.flag = what, timeout_s, flag
        self.start = time.monotonic()
        # default: a quarter of the deadline, at least NOTICE_S (a start that takes 90 s on a
        # loaded machine is normal, and the console stays quiet for it)
        self.next = self.start + (max(NOTICE_S, timeout_s / 4) if notice_s is None else notice_s)
        self.warned = level >= logging.WARNING
        logger.log(level, "waiting for %s (at most %.0fs, %s)", what, timeout_s, flag)

    def slice(self, left: float) -> float:
        """How long the caller may block before the next `tick()`, with `left` seconds to its deadline."""
        return max(min(left, self.next - time.monotonic()), 0.0)

    def tick(self, detail: str = "") -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + REPEAT_S
        self.warned = True
        logger.warning("still waiting for %s after %.0fs%s (gives up after %.0fs, %s)", self.what, now - self.start,
                       f"; {detail}" if detail else "", self.timeout_s, self.flag)

    def done(self) -> None:
        if self.warned:
            logger.warning("done waiting for %s after %.0fs", self.what, time.monotonic() - self.start)


def wait_all(refs: list, timeout_s: float, notice: Notice | None = None, stop: list | None = None) -> list:
    """`ray.wait` for every one of `refs` up to `timeout_s`, ticking `notice`; the refs still
    pending. A stop signal in `stop` ends the wait (`StopWaiting`)."""
    import ray

    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if stop is not None:
            if stop:
                raise StopWaiting()
            left = min(left, STOP_LOOK_S)
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=notice.slice(left) if notice else left)
        if notice is not None and pending:
            notice.tick()
    if notice is not None and not pending:
        notice.done()
    return pending


def wait_for(refs: list, names: list[str], timeout_s: float, who: str, call: str, waiting_for: str | None = None,
             stop: list | None = None) -> list:
    """The results of Ray calls `refs` (made to the actors `names`, in order), or an error that
    names the actors which did not answer `call` within `timeout_s` (TimeoutError) or died.
    `waiting_for`: a start-up wait (`timeout_s` is then `ray_start_timeout_s`), logged as what it
    waits for (`Notice`). A stop signal in `stop` ends the wait (`StopWaiting`)."""
    import ray

    notice = Notice(waiting_for, timeout_s, "ray_start_timeout_s") if waiting_for else None
    pending = wait_all(refs, timeout_s, notice, stop)
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
