"""The batch types that travel through one step: rollouts (sampled), scored pairs, and the
learner's pair batch (token ids only). Plain data, no behaviour beyond building and slicing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from odpo_vllm.core.objective import truncate_after_eos


@dataclass
class Rollouts:
    """Completions of one batch of prompts, in block layout (row j*B + i = sample j of prompt i)."""

    prompt_ids: list[list[int]]  # B prompts
    completion_ids: list[list[int]]  # k*B completions, cut after the first EOS (kept)
    contains_eos: torch.Tensor  # (k*B,) bool
    num_samples: int
    policy_version: int  # the optimizer step whose weights sampled them
    engine_idle_s: float = 0.0  # how long the engine(s) waited for this request (for a new version)
    sample_s: float = 0.0  # how long the engine(s) sampled (the slowest, when several share a batch)
    # the sampler's own logprob of each kept token (raw logits, before temperature), where the
    # sampler reports them (the vLLM engine): what `sync/sample_logprob_gap` checks the learner against
    sample_logprobs: list[list[float]] | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)


def finish_rollouts(raw_completions, prompt_ids, num_samples, eos_token_ids, policy_version,
                    raw_logprobs: list[list[float]] | None = None) -> Rollouts:
    """Every sampler's last step: cut each completion at its first EOS, record which ended.
    `raw_logprobs`: the sampler's logprob of each sampled token, cut the same way."""
    completions, ended = [], []
    for ids in raw_completions:
        kept, has_eos = truncate_after_eos(ids, eos_token_ids)
        completions.append(kept)
        ended.append(has_eos)
    logprobs = None
    if raw_logprobs is not None:
        logprobs = [list(values[: len(kept)]) for values, kept in zip(raw_logprobs, completions)]
    return Rollouts(prompt_ids, completions, torch.tensor(ended, dtype=torch.bool), num_samples, policy_version,
                    sample_logprobs=logprobs)


class ReadyRollouts:
    """The handle of rollouts sampled at submit time (the in-process samplers)."""

    def __init__(self, rollouts: Rollouts):
        self.rollouts = rollouts

    def result(self) -> Rollouts:
        return self.rollouts


@dataclass
class PairBatch:
    """Chosen and rejected completions of the same prompts (token ids): what a learner trains on."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    # a vision-language batch: each prompt's pixel inputs (the processor's, batch dimension 1)
    pixel_inputs: list[dict[str, torch.Tensor]] | None = None
    # the sampler's logprobs of the chosen and rejected tokens, only when the learners hold the very
    # weights that sampled them (the trainer strips them otherwise): `sync/sample_logprob_gap`
    chosen_logprobs: list[list[float]] | None = None
    rejected_logprobs: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def slice(self, start: int, stop: int) -> "PairBatch":
        def part(values):
            return values[start:stop] if values is not None else None

        return PairBatch(self.prompt_ids[start:stop], self.chosen_ids[start:stop], self.rejected_ids[start:stop],
                         part(self.pixel_inputs), part(self.chosen_logprobs), part(self.rejected_logprobs))

    def for_learners(self, learners_version: int, sampled_version: int) -> "PairBatch":
        """The batch as the learners get it: the sampler's logprobs only if the learners hold the
        weights that sampled it (else comparing them says nothing about the engine)."""
        if learners_version == sampled_version or self.chosen_logprobs is None:
            return self
        return PairBatch(self.prompt_ids, self.chosen_ids, self.rejected_ids, self.pixel_inputs)

    def sampler_logprobs(self) -> list[list[float]] | None:
        """The sampler's logprobs in the learner's row order (chosen, then rejected), or None."""
        if self.chosen_logprobs is None or self.rejected_logprobs is None:
            return None
        return list(self.chosen_logprobs) + list(self.rejected_logprobs)


@dataclass
class ScoredPairs:
    """One batch's pairs, scored, with the policy version that sampled them (a checkpoint stores
    those of steps not yet trained)."""

    batch: PairBatch
    metrics: dict[str, float]
    log_rows: list[dict] = field(default_factory=list)  # for the completions log
    pair_scores: torch.Tensor | None = None  # (2N,) chosen then rejected
    policy_version: int = 0
