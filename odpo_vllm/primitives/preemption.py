"""Preemption: SIGTERM (a scheduler taking the node back) or SIGINT (Ctrl-C) during `train()`
writes a checkpoint at the step reached, closes every role and ends with `Preempted`, whose exit
code (128 + signal) a scheduler can read. A second signal stops at once.

A scheduler kills the job a grace period after its signal (`preemption_grace_s`), so the
checkpoint waits for no actor that may be dead or hung: a wait for the next batch's rollouts is
cut short (the learners have not moved, so the checkpoint is of the step reached), and batches
still being sampled are waited for only until `BATCH_SHARE` of the grace period has passed; the
rest is dropped and sampled again on resume (see `RolloutPipeline.state_dict`). A weight push in
progress is given up (engines silent for a few seconds are killed, so that rank 0 can save); a
learner step in progress is finished first. Not cut short: an engine replacement already under
way when the signal comes (it waits up to `ray_start_timeout_s`), and a hung learner rank."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
BATCH_SHARE = 0.4  # of the grace period, for batches in flight; the rest is for writing the checkpoint


class StopRequest(list):
    """The stop signals received (their numbers), and `at`: when the first came (time.monotonic)."""

    at: float | None = None

    def deadline(self, grace_s: float) -> float | None:
        """Until when batches in flight may be waited for; None without a signal."""
        return None if self.at is None else self.at + BATCH_SHARE * grace_s


class StopWaiting(Exception):
    """A wait for rollouts cut short by a stop signal."""


class Preempted(Exception):
    def __init__(self, signum: int, step: int, checkpoint_dir: str):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint_dir} "
                         "(resume with resume_from_checkpoint=True, or --resume_from_checkpoint auto)")


@contextlib.contextmanager
def stop_signals():
    """Yields a `StopRequest` that receives the number of a stop signal; handlers are ours only inside."""
    received = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield received
        return

    def handler(signum, frame):
        if received:  # asked twice: stop now
            for sig, old in previous.items():
                signal.signal(sig, old)
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        received.append(signum)
        received.at = time.monotonic()
        logger.warning("%s received: writing a checkpoint at the step reached, then stopping",
                       signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
