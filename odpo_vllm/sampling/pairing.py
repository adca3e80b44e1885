"""Score and pair: turn a batch of prompt rows and their sampled completions into preference pairs.

Placement-agnostic: the rollouts may come from the transformers sampler in this process or from
vLLM engines elsewhere, `rewards` may score here or in reward-worker actors.
"""

from __future__ import annotations

import time

import torch

from odpo_vllm.core.batches import PairBatch, ScoredPairs, Rollouts
from odpo_vllm.core.objective import score_metrics, select_pairs
from odpo_vllm.multimodal import MEDIA_KEY, batch_media


def media_argument(rows: list[dict]) -> dict:
    """The samplers' `media` keyword for a batch with images; nothing for a text batch (so the
    samplers, the remote one included, are called as before)."""
    media = batch_media(rows)
    return {} if media is None else {"media": media}


def pair_rollouts(rows: list[dict], rollouts: Rollouts, rewards, tokenizer, num_samples: int) -> ScoredPairs:
    """Score every completion, pick chosen and rejected per prompt, and compute the score metrics."""
    timings = {"time/wait_weights": rollouts.engine_idle_s}
    start = time.perf_counter()
    completions = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    repeated = [row for _ in range(num_samples) for row in rows]  # block layout
    columns = {
        key: [row[key] for row in repeated] for key in rows[0] if key not in ("prompt", "prompt_ids", MEDIA_KEY)
    }
    prompts = [row["prompt"] for row in repeated]
    scores, per_function = rewards.score(  # score
        prompts, completions, rollouts.completion_ids, columns, rollouts.contains_eos
    )
    timings["time/reward"] = time.perf_counter() - start

    chosen, rejected = select_pairs(scores, len(rows), num_samples)  # pair
    media = batch_media(rows)
    batch = PairBatch(
        prompt_ids=rollouts.prompt_ids,
        chosen_ids=[rollouts.completion_ids[i] for i in chosen.tolist()],
        rejected_ids=[rollouts.completion_ids[i] for i in rejected.tolist()],
        pixel_inputs=[m.pixel_inputs for m in media] if media is not None else None,
    )
    if rollouts.sample_logprobs is not None:
        batch.chosen_logprobs = [rollouts.sample_logprobs[i] for i in chosen.tolist()]
        batch.rejected_logprobs = [rollouts.sample_logprobs[i] for i in rejected.tolist()]
    metrics = score_metrics(scores, chosen, rejected, rollouts.contains_eos)
    metrics.update(per_function)
    metrics.update(timings)
    log_rows = [
        {
            "prompt": rows[i]["prompt"],
            "chosen": completions[c],
            "rejected": completions[r],
            "chosen_score": scores[c].item(),
            "rejected_score": scores[r].item(),
        }
        for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))
    ]
    pair_scores = torch.cat([scores[chosen], scores[rejected]])
    return ScoredPairs(batch, metrics, log_rows, pair_scores, policy_version=rollouts.policy_version)
