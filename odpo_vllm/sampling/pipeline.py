"""The rollout pipeline: which batch is sampled by which policy version, and when.

With `async_steps = K` and `weight_sync_steps = s`, the batch of step t (0-based) is sampled by
policy version s * floor(max(0, t - K) / s) exactly (version v = the weights after v optimizer
steps; the engines receive versions 0, s, 2s, ... only). With s = 1 that is max(0, t - K).
As soon as the engines serve a version (at the start, after a push, after a resume), the loop
requests every batch that version samples: the steps up to t + K with s = 1, the s steps of its
interval (shifted by K) otherwise. Sampling (and, under Ray, scoring) of those runs while the
learners train, and the next push waits until the engines have finished them. K = 0, s = 1 is the
synchronous loop. The schedule does not depend on timing, so a run is reproducible, and a
checkpoint holds the batches already sampled for later steps (token ids, scores, the version that
sampled them) so that a resumed run neither skips nor repeats a prompt; between two pushes those
are every batch up to the next push, so a resume needs no weights but the learners'.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from odpo_vllm.core.batches import ScoredPairs
from odpo_vllm.primitives.preemption import StopWaiting
from odpo_vllm.sampling.pairing import media_argument, pair_rollouts

logger = logging.getLogger(__name__)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """The sampling seed of one step: the same (seed, step) always samples the same completions,
    which is what makes a resumed run repeat the uninterrupted one."""
    return (seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**31 - 1)


def sampling_version(step: int, async_steps: int, weight_sync_steps: int = 1) -> int:
    """The policy version that samples the batch of `step` (0-based)."""
    return max(0, step - async_steps) // weight_sync_steps * weight_sync_steps


def pushes_after(step: int, weight_sync_steps: int) -> bool:
    """Whether the engines receive the learners' weights after `step` (0-based), i.e. version
    step + 1 is one the schedule samples with."""
    return (step + 1) % weight_sync_steps == 0


@dataclass
class _Request:
    step: int
    epoch: int
    position: int | None
    version: int  # the policy version the engines served when it was submitted
    pairs: Future  # -> ScoredPairs
    data_before: dict | None = None  # the prompt order's state before this batch was drawn


class RolloutPipeline:
    def __init__(self, batches, roles, tokenizer, args, rewrite_rows=None):
        """`batches`: the prompt order (`PromptBatches` or `IterablePromptBatches`); `roles`: the
        generator and rewards; `rewrite_rows`: the user's data_collator, applied per batch."""
        self.batches, self.roles, self.tokenizer, self.args = batches, roles, tokenizer, args
        self.async_steps = args.async_steps
        self.weight_sync_steps = args.weight_sync_steps
        self.rewrite_rows = rewrite_rows or (lambda rows: rows)
        self.requests: dict[int, _Request] = {}
        self.next_step = 0  # the first step whose batch has not been requested
        # Ray placements: wait for rollouts and score them in a thread while the learners train.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="rollouts") if roles.background_sampling else None

    def request_ahead(self, step: int, served_version: int, max_steps: int) -> None:
        """Request every batch not requested yet (below `max_steps`) whose sampling version the
        engines serve (`served_version`) or have served; the batch of `step`, the next one the
        loop trains, must be among them."""
        while self.next_step < max_steps and self.version_of(self.next_step) <= served_version:
            wanted = self.version_of(self.next_step)
            if wanted < served_version:  # resumed past the checkpoint's max_steps, or a preemption dropped it
                logger.warning("step %d: sampled by policy version %d instead of %d (the checkpoint holds no "
                               "batch for it)", self.next_step, served_version, wanted)
            self._request(self.next_step, served_version)
            self.next_step += 1
        if step < max_steps and step not in self.requests and step >= self.next_step:
            raise RuntimeError(f"rollout schedule: the batch of step {step} must be sampled by policy version "
                               f"{self.version_of(step)}, but the engines serve version {served_version}")

    def version_of(self, step: int) -> int:
        """The policy version the schedule samples the batch of `step` (0-based) with."""
        return sampling_version(step, self.async_steps, self.weight_sync_steps)

    def _request(self, step: int, version: int) -> None:
        data_before = self.batches.state_dict()
        _, rows = self.batches.next()
        rows = self.rewrite_rows(rows)
        args = self.args
        # submitted now, in this thread: the engines see sampling requests and weight updates in
        # the order of the schedule
        handle = self.roles.generator.submit([row["prompt_ids"] for row in rows], args.num_samples,
                                             step_seed(args.seed, step), **media_argument(rows))

        def finish() -> ScoredPairs:
            rollouts = handle.result()
            pairs = pair_rollouts(rows, rollouts, self.roles.rewards, self.tokenizer, args.num_samples)
            pairs.metrics["time/generate"] = rollouts.sample_s  # the engines' own sampling time
            return pairs

        future: Future = Future()
        if self.executor is None:
            future.set_result(finish())
        else:
            future = self.executor.submit(finish)
        self.requests[step] = _Request(step, self.batches.epoch, getattr(self.batches, "position", None), version,
                                       future, data_before)

    def _wait(self, future: Future, stop: list | None = None) -> ScoredPairs:
        """The future's pairs; meanwhile, replace engines that die (the background thread waits
        for their lost parts to be re-issued, which only this thread does). A stop signal in
        `stop` ends the wait (`StopWaiting`)."""
        while True:
            try:
                return future.result(timeout=0.1)
            except FutureTimeout:
                if stop:
                    raise StopWaiting() from None
                self.roles.generator.recover()

    def position_of(self, step: int) -> tuple[int, int | None]:
        """(epoch, batches taken in that epoch) of the batch of `step` (requested already)."""
        request = self.requests[step]
        return request.epoch, request.position

    def take(self, step: int, stop: list | None = None) -> tuple[ScoredPairs, float]:
        """The scored pairs of `step` and how long the loop waited for them. A stop signal in
        `stop` ends the wait with `StopWaiting`, the batch still requested (the checkpoint decides)."""
        start = time.perf_counter()
        request = self.requests[step]
        pairs = self._wait(request.pairs, stop)
        del self.requests[step]
        waited = time.perf_counter() - start
        if pairs.policy_version != request.version:  # an update overtook the batch: a bug, never timing
            raise RuntimeError(f"rollout schedule: the batch of step {step} was sampled by policy version "
                               f"{pairs.policy_version}, expected {request.version}")
        return pairs, waited

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self, deadline: float | None = None, checkpoint_version: int | None = None) -> dict:
        """The batches requested for later steps, finished first (they are part of the run), and
        `data`: the prompt order's state to resume from.

        `deadline` (time.monotonic; a preemption's grace period): a batch not finished by then is
        not waited for (its engine or reward worker may be dead or hung, and replacing one takes
        longer than a grace period). It and every later batch are dropped; `data` is rewound to
        before it, so a resumed run draws and samples them again, with the checkpoint's weights.
        A dropped batch scheduled for those weights (`checkpoint_version`) is sampled again exactly;
        one of an older version (async_steps >= 1) is then sampled by a newer one, and the warning
        says so."""
        ready, next_step, data = [], self.next_step, self.batches.state_dict()
        for step in sorted(self.requests):
            request = self.requests[step]
            if deadline is None:
                pairs = self._wait(request.pairs)
            else:
                try:
                    pairs = request.pairs.result(timeout=max(deadline - time.monotonic(), 0.0))
                except FutureTimeout:
                    dropped = sorted(s for s in self.requests if s >= step)
                    older = [s for s in dropped if self.requests[s].version != checkpoint_version]
                    logger.warning("checkpoint: the batches of steps %s were not sampled and scored in time; they "
                                   "are sampled again on resume%s", ", ".join(map(str, dropped)),
                                   f" (steps {', '.join(map(str, older))} by the checkpoint's policy version "
                                   f"{checkpoint_version} instead of an older one: the resumed run differs there)"
                                   if older else "")
                    next_step, data = step, request.data_before
                    break
            ready.append({"step": step, "epoch": request.epoch, "position": request.position,
                          "version": request.version, "pairs": pairs})
        return {"async_steps": self.async_steps, "weight_sync_steps": self.weight_sync_steps, "next_step": next_step,
                "ready": ready, "data": data}

    def load_state_dict(self, state: dict) -> None:
        for field in ("async_steps", "weight_sync_steps"):
            written, now = state.get(field, 1 if field == "weight_sync_steps" else None), getattr(self, field)
            if written != now:
                raise ValueError(f"resume_from_checkpoint: the checkpoint was written with {field}={written}; resume "
                                 f"with the same {field} (got {now}) so that the batches it already sampled are "
                                 "trained at their steps and the engines' versions follow one schedule")
        self.requests, self.next_step = {}, state["next_step"]
        for item in state["ready"]:
            future: Future = Future()
            future.set_result(item["pairs"])
            self.requests[item["step"]] = _Request(item["step"], item["epoch"], item["position"], item["version"],
                                                   future)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
