"""The mathematics of Online DPO as pure functions of tensors.

Nothing here does I/O, touches a process group or holds state: every function maps tensors (or
plain lists) to tensors, so the whole algorithm can be checked by hand in `tests/test_objective.py`.

Conventions
- Completions of one step are in *block layout*: with B prompts and k samples each, row
  ``j * B + i`` is sample ``j`` of prompt ``i``.
- Token tensors are right-padded; a mask of 1 marks a real completion token. Padding never
  enters a sum or a mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


# --------------------------------------------------------------------------------------------
# Completions
# --------------------------------------------------------------------------------------------
def truncate_after_eos(completion_ids: list[int], eos_token_ids: set[int]) -> tuple[list[int], bool]:
    """Cut a sampled completion just after its first EOS token.

    Returns the kept tokens (EOS included) and whether an EOS was found. Samplers may keep
    going after EOS (a batched `generate` pads, some engines stop); both end up the same here.
    """
    for position, token in enumerate(completion_ids):
        if token in eos_token_ids:
            return list(completion_ids[: position + 1]), True
    return list(completion_ids), False


def apply_missing_eos_penalty(scores: torch.Tensor, contains_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of every completion that did not emit EOS."""
    if penalty is None:
        return scores
    return scores - penalty * (~contains_eos.bool()).to(scores.dtype)


def beta_for_epoch(beta: float | list[float], epoch: float) -> float:
    """A list of betas gives one value per epoch (0-based), the last one for every later epoch."""
    if isinstance(beta, (int, float)):
        return float(beta)
    index = min(int(epoch), len(beta) - 1)
    return float(beta[index])


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------
def select_pairs(scores: torch.Tensor, num_prompts: int, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick chosen and rejected rows from block-layout scores of shape (num_samples * num_prompts,).

    Chosen is the best sample of its prompt, rejected the worst. Ties go to the earlier sample for
    chosen and the later sample for rejected, so with k=2 a tie chooses sample 0 over sample 1 (as
    the reference does) and chosen and rejected are never the same row.
    Returns row indices (into the block layout) of shape (num_prompts,) each.
    """
    if scores.numel() != num_prompts * num_samples:
        raise ValueError(f"expected {num_prompts * num_samples} scores, got {scores.numel()}")
    if num_samples < 2:
        raise ValueError("pairing needs at least two samples per prompt")
    per_prompt = scores.reshape(num_samples, num_prompts).t()  # (B, k)
    best = per_prompt.max(dim=1, keepdim=True).values
    worst = per_prompt.min(dim=1, keepdim=True).values
    sample_index = torch.arange(num_samples, device=scores.device).expand_as(per_prompt)
    big = num_samples + 1
    # first sample reaching the max; last sample reaching the min
    chosen_sample = torch.where(per_prompt == best, sample_index, big).min(dim=1).values
    rejected_sample = torch.where(per_prompt == worst, sample_index, -1).max(dim=1).values
    # all samples equal: first vs last
    same = chosen_sample == rejected_sample
    rejected_sample = torch.where(same, torch.full_like(rejected_sample, num_samples - 1), rejected_sample)
    chosen_sample = torch.where(same, torch.zeros_like(chosen_sample), chosen_sample)
    prompt_index = torch.arange(num_prompts, device=scores.device)
    return chosen_sample * num_prompts + prompt_index, rejected_sample * num_prompts + prompt_index


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Per-pair loss from sequence logprobs (sums over completion tokens), shape (N,).

    sigmoid (DPO): -log sigmoid(beta * h);  ipo: (h - 1 / (2 beta))^2,
    with h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected).
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def policy_metrics(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    num_pairs: int,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Metrics of the implicit reward and the policy, from per-token logprobs of the pairs.

    Rows are [chosen_0..chosen_{N-1}, rejected_0..rejected_{N-1}]; `mask` zeroes padding, which
    therefore never counts toward KL, entropy or logps. Returns sums over pairs (not means), so
    that callers can add micro-batches and divide once; keys match the reference's metric names.
    """
    mask = mask.to(policy_logps.dtype)
    seq_policy = (policy_logps * mask).sum(1)
    seq_ref = (ref_logps * mask).sum(1)
    kl = seq_policy - seq_ref  # per sequence, sum over real tokens of log pi - log ref
    chosen_policy, rejected_policy = seq_policy[:num_pairs], seq_policy[num_pairs:]
    chosen_ref, rejected_ref = seq_ref[:num_pairs], seq_ref[num_pairs:]
    chosen_rewards = beta * (chosen_policy - chosen_ref)
    rejected_rewards = beta * (rejected_policy - rejected_ref)
    # per pair: average over its two sequences
    kl_pair = (kl[:num_pairs] + kl[num_pairs:]) / 2
    entropy_pair = -(seq_policy[:num_pairs] + seq_policy[num_pairs:]) / 2
    return {
        "objective/kl": kl_pair.sum(),
        "objective/entropy": entropy_pair.sum(),
        "objective/non_score_reward": non_score_reward(kl_pair, beta).sum(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen_policy.sum(),
        "logps/rejected": rejected_policy.sum(),
    }


def sample_logprob_gap(policy_logps: torch.Tensor, mask: torch.Tensor, sampler_logps: list[list[float]],
                       num_pairs: int) -> torch.Tensor:
    """How far the sampler's logprobs of its own tokens are from the learner's, as a sum over pairs
    (callers divide by the pairs, as for `policy_metrics`): per completion, the mean over its tokens
    of |learner - sampler| (both from raw logits, no temperature); per pair, the mean of its two.

    Meaningful only when the learner holds the weights that sampled the batch: then it is the
    numerical distance between the two implementations (~1e-6 in fp32, ~1e-2 in bf16), and a large
    value means the engine samples from another policy than the one being trained (stale or wrong
    weights on the decode path, which the probe's prefill does not run). Tokens the learner does
    not see (a completion cut by `max_length`) are left out; a completion without tokens counts 0."""
    rows = []
    for row, values in enumerate(sampler_logps):
        count = min(len(values), int(mask[row].sum()))
        if count == 0:
            rows.append(policy_logps.new_zeros(()))
            continue
        sampler = torch.tensor(values[:count], dtype=policy_logps.dtype, device=policy_logps.device)
        rows.append((policy_logps[row, :count].detach() - sampler).abs().mean())
    per_row = torch.stack(rows)
    return ((per_row[:num_pairs] + per_row[num_pairs:]) / 2).sum()


def non_score_reward(kl: torch.Tensor, beta: float) -> torch.Tensor:
    """The KL penalty as a reward, with the reference's sign: -beta * KL (negative while the policy
    moves away from the reference)."""
    return -beta * kl


def rlhf_reward(scores: torch.Tensor, mean_non_score_reward: float) -> float:
    """The RLHF objective as the reference logs it: mean score + mean non-score reward, i.e.
    score - beta * KL. `scores` are those of the completions the KL is measured on (the pairs)."""
    return scores.float().mean().item() + float(mean_non_score_reward)


def score_metrics(
    scores: torch.Tensor, chosen_rows: torch.Tensor, rejected_rows: torch.Tensor, contains_eos: torch.Tensor
) -> dict[str, float]:
    """Metrics of the external reward: means over all sampled completions and over pairs."""
    return {
        "objective/scores": scores.float().mean().item(),
        "objective/scores_margin": (scores[chosen_rows] - scores[rejected_rows]).float().mean().item(),
        "val/contain_eos_token": contains_eos.float().mean().item(),
    }
