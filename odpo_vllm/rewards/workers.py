"""Reward models in Ray actors: under a Ray placement the driver (often a CPU-only head node under
`ray job submit`) never loads a reward model. Callables and judges still run in the driver."""

from __future__ import annotations

import torch

from odpo_vllm.rewards.scorer import Rewards
from odpo_vllm.runtime.waits import wait_for


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


class RemoteRewards:
    """The `Scorer` of a Ray placement: reward models in `RewardWorker` actors (a step's rows split
    across them), callables and judges here, combined exactly as `Rewards.score` does in process."""

    def __init__(self, local: Rewards, workers: list, names: list[str], timeout_s: float):
        import ray

        self.ray, self.local, self.workers, self.names, self.timeout_s = ray, local, workers, names, timeout_s

    def _get(self, refs: list, names: list[str], call: str, waiting_for: str | None = None) -> list:
        return wait_for(refs, names, self.timeout_s, "rewards", call, waiting_for)

    def wait_ready(self) -> None:
        """Until every worker has loaded its reward models (a bad model fails here, before training)."""
        self._get([worker.ready.remote() for worker in self.workers], self.names, "ready",
                  f"{len(self.workers)} reward worker(s) to load the reward models ({', '.join(self.names)})")

    def score(self, prompts, completions, completion_ids, columns, contains_eos):
        table = None
        if self.local.model_indices:
            count = len(self.workers)
            size = -(-len(completions) // count)
            parts = [(w, a, min(a + size, len(completions))) for w, a in zip(range(count), range(0, len(completions), size))]
            refs = [self.workers[w].model_table.remote(prompts[a:b], completions[a:b]) for w, a, b in parts]
            table = torch.cat(self._get(refs, [self.names[w] for w, _, _ in parts], "model_table"))
        return self.local.score(prompts, completions, completion_ids, columns, contains_eos, model_table=table)

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers = []
