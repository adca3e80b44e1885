"""The batch types that travel through one step: rollouts (sampled), pairs (scored and paired),
and the learner's pair batch (token ids only). Plain data, no behaviour beyond slicing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollouts:
    """Completions of one batch of prompts, in block layout (row j*B + i = sample j of prompt i)."""

    prompt_ids: list[list[int]]  # B prompts
    completion_ids: list[list[int]]  # k*B completions, cut after the first EOS (kept)
    contains_eos: torch.Tensor  # (k*B,) bool
    num_samples: int
    policy_version: int  # the optimizer step whose weights sampled them
    sampling_logprobs: list[list[float]] | None = None  # per completion token, where the backend gives them
    engine_idle_s: float = 0.0  # how long the engine(s) waited for this request (for a new version)
    sample_s: float = 0.0  # how long the engine(s) sampled (the slowest, when several share a batch)

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)


@dataclass
class PairBatch:
    """Chosen and rejected completions of the same prompts (token ids): what a learner trains on."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def slice(self, start: int, stop: int) -> "PairBatch":
        return PairBatch(self.prompt_ids[start:stop], self.chosen_ids[start:stop], self.rejected_ids[start:stop])


@dataclass
class Pairs:
    """One step's scored pairs with where they came from: the policy version that sampled them and
    the data position of their prompts (a checkpoint stores the pairs of steps not yet trained)."""

    batch: PairBatch
    metrics: dict[str, float]
    log_rows: list[dict] = field(default_factory=list)  # for the completions log
    pair_scores: torch.Tensor | None = None  # (2N,) chosen then rejected
    policy_version: int = 0
    step: int = 0  # the training step these pairs are for
    epoch: int = 0  # the epoch of the prompts (beta follows it)
    position: int | None = None  # batches taken in that epoch after this one (None: streaming data)
