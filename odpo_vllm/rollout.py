"""Sample, score, pair: turn a batch of prompt rows into preference pairs.

Placement-agnostic: `generator` may be the transformers sampler in this process or a vLLM
engine elsewhere, `rewards` a local scorer or a remote one; the steps and their order stay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .learner import PairBatch
from .objective import score_metrics, select_pairs


@dataclass
class Pairs:
    batch: PairBatch
    metrics: dict[str, float]
    log_rows: list[dict] = field(default_factory=list)  # for the completions log
    pair_scores: torch.Tensor | None = None  # (2N,) chosen then rejected


def collect_pairs(rows: list[dict], generator, rewards, tokenizer, num_samples: int, seed: int) -> Pairs:
    prompt_ids = [row["prompt_ids"] for row in rows]
    timings = {}

    start = time.perf_counter()
    rollouts = generator.generate(prompt_ids, num_samples, seed)  # sample
    timings["time/generate"] = time.perf_counter() - start

    start = time.perf_counter()
    completions = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    repeated = [row for _ in range(num_samples) for row in rows]  # block layout
    columns = {
        key: [row[key] for row in repeated] for key in rows[0] if key not in ("prompt", "prompt_ids")
    }
    prompts = [row["prompt"] for row in repeated]
    scores, per_function = rewards.score(  # score
        prompts, completions, rollouts.completion_ids, columns, rollouts.contains_eos
    )
    timings["time/reward"] = time.perf_counter() - start

    chosen, rejected = select_pairs(scores, len(rows), num_samples)  # pair
    batch = PairBatch(
        prompt_ids=prompt_ids,
        chosen_ids=[rollouts.completion_ids[i] for i in chosen.tolist()],
        rejected_ids=[rollouts.completion_ids[i] for i in rejected.tolist()],
    )
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
    return Pairs(batch, metrics, log_rows, pair_scores)
