"""Preemption: SIGTERM (a scheduler taking the node back) or SIGINT (Ctrl-C) during `train()`
finishes the current step, writes a checkpoint at the step reached, closes every role and ends
with `Preempted`, whose exit code (128 + signal) a scheduler can read. A second signal stops at
once."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    def __init__(self, signum: int, step: int, checkpoint_dir: str):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint_dir} "
                         "(resume with resume_from_checkpoint=True, or --resume_from_checkpoint auto)")


@contextlib.contextmanager
def stop_signals():
    """Yields a list that receives the number of a stop signal; handlers are ours only inside."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield received
        return

    def handler(signum, frame):
        if received:  # asked twice: stop now
            for sig, old in previous.items():
                signal.signal(sig, old)
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        received.append(signum)
        logger.warning("%s received: finishing this step, then writing a checkpoint and stopping",
                       signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
