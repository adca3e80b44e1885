"""Reward models in Ray actors: under a Ray placement the driver (often a CPU-only head node under
`ray job submit`) never loads a reward model. Callables and judges still run in the driver."""

from __future__ import annotations

import logging
import os
import time

import torch

from odpo_vllm.rewards.scorer import Rewards
from odpo_vllm.primitives.waits import ActorDied, wait_for

logger = logging.getLogger(__name__)


class RewardWorker:
    """A Ray actor holding the run's reward models (a GPU share on GPU clusters)."""

    def __init__(self, model_specs: list[tuple], model_init_kwargs: dict | None, trust_remote_code: bool,
                 threads: int = 1):
        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.rewards = Rewards([model for model, _ in model_specs], [tok for _, tok in model_specs],
                               model_init_kwargs=model_init_kwargs, trust_remote_code=trust_remote_code, device=device)

    def model_table(self, prompts: list, completions: list[str]) -> torch.Tensor:
        return self.rewards.model_table(prompts, completions)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()


class RemoteRewards:
    """The `Scorer` of a Ray placement: reward models in `RewardWorker` actors (a step's rows split
    across them), callables and judges here, combined exactly as `Rewards.score` does in process.

    `start_worker(name, attempt) -> actor`: the placement's recipe for worker `name` (`attempt` 0
    first, a replacement gets a fresh Ray name from it). A worker holds no state, so one that
    died or did not answer within `timeout_s` is replaced (up to `max_restarts` times each) and
    its rows are scored again; `faults` keeps the count and the seconds lost, as for engines."""

    def __init__(self, local: Rewards, start_worker, count: int, timeout_s: float, max_restarts: int = 0,
                 faults: dict | None = None, start_timeout_s: float | None = None):
        import ray

        self.start_timeout_s = timeout_s if start_timeout_s is None else start_timeout_s  # loading the models

        self.ray, self.local, self.start_worker, self.timeout_s = ray, local, start_worker, timeout_s
        self.max_restarts, self.faults = max_restarts, faults if faults is not None else {}
        self.names = [f"reward-worker-{i}" for i in range(count)]
        self.workers = [start_worker(name, 0) for name in self.names]
        self.restarts = [0] * count

    def _get(self, refs: list, names: list[str], call: str, waiting_for: str | None = None,
             timeout_s: float | None = None) -> list:
        return wait_for(refs, names, timeout_s or self.timeout_s, "rewards", call, waiting_for)

    def wait_ready(self) -> None:
        """Until every worker has loaded its reward models (a bad model fails here, before training)."""
        self._get([worker.ready.remote() for worker in self.workers], self.names, "ready",
                  f"{len(self.workers)} reward worker(s) to load the reward models ({', '.join(self.names)})",
                  self.start_timeout_s)

    def score(self, prompts, completions, completion_ids, columns, contains_eos):
        table = None
        if self.local.model_indices:
            count = len(self.workers)
            size = -(-len(completions) // count)
            parts = [(w, a, min(a + size, len(completions))) for w, a in zip(range(count), range(0, len(completions), size))]
            refs = [self.workers[w].model_table.remote(prompts[a:b], completions[a:b]) for w, a, b in parts]
            tables = []
            for ref, (w, a, b) in zip(refs, parts):
                while True:
                    try:
                        tables.append(self._get([ref], [self.names[w]], "model_table")[0])
                        break
                    except (ActorDied, TimeoutError, self.ray.exceptions.ObjectLostError,
                            self.ray.exceptions.NodeDiedError) as err:  # the worker or its node is gone
                        self._replace(w, str(err) or type(err).__name__)
                        ref = self.workers[w].model_table.remote(prompts[a:b], completions[a:b])
            table = torch.cat(tables)
        return self.local.score(prompts, completions, completion_ids, columns, contains_eos, model_table=table)

    def _replace(self, index: int, reason: str) -> None:
        """A new worker in place of worker `index`, with its models loaded; past `max_restarts`
        an error naming it."""
        start, name = time.perf_counter(), self.names[index]
        while True:
            self.ray.kill(self.workers[index])  # dead, or stuck: nothing more is asked of it
            self.restarts[index] += 1
            if self.restarts[index] > self.max_restarts:
                raise RuntimeError(f"{reason}: {name} failed {self.restarts[index]} times, more than "
                                   f"ray_max_engine_restarts={self.max_restarts} (the budget of engines and reward "
                                   "workers alike); the run stops (resume with --resume_from_checkpoint true)")
            logger.warning("%s: starting a replacement for %s (restart %d of at most %d); its rows are scored again",
                           reason, name, self.restarts[index], self.max_restarts)
            self.workers[index] = self.start_worker(name, self.restarts[index])
            try:
                self._get([self.workers[index].ready.remote()], [name], "ready", timeout_s=self.start_timeout_s)
                break
            except (ActorDied, TimeoutError) as err:
                reason = f"(its replacement) did not come up: {err}"
        self.faults["faults/reward_worker_restarts"] = float(sum(self.restarts))
        self.faults["faults/seconds_lost"] = self.faults.get("faults/seconds_lost", 0.0) + time.perf_counter() - start

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers = []
