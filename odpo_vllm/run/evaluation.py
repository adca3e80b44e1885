"""Evaluation: the training step's sample -> score -> pair, then the loss and metrics of those
pairs under the current policy, without a weight update. Eval prompts are sampled with seeds of
their own (`EVAL_SEED_SALT`), so an evaluation never shifts the training run's samples."""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from transformers.trainer_utils import EvalPrediction

from odpo_vllm.core.objective import rlhf_reward
from odpo_vllm.data import PromptBatches
from odpo_vllm.sampling.pairing import media_argument, pair_rollouts
from odpo_vllm.sampling.pipeline import step_seed

EVAL_SEED_SALT = 1


@torch.no_grad()
def evaluate_prompts(dataset, roles, tokenizer, args, beta: float, rows_of, compute_metrics=None,
                     prefix: str = "eval") -> dict[str, float]:
    """The metrics of one encoded eval dataset, averaged over its prompts and named `{prefix}_*`,
    with `{prefix}_runtime` and `{prefix}_samples_per_second`. `rows_of`: the trainer's row
    preparation (the data collator, pixel inputs)."""
    batches = PromptBatches(dataset, args.per_device_eval_batch_size * args.gradient_accumulation_steps,
                            args.seed, shuffle=False)
    sums, total = defaultdict(float), 0
    start = time.perf_counter()
    for index in range(len(batches)):
        _, rows = batches.next()
        rows = rows_of(rows)
        rollouts = roles.generator.generate([row["prompt_ids"] for row in rows], args.num_samples,
                                            step_seed(args.seed, index, EVAL_SEED_SALT), **media_argument(rows))
        pairs = pair_rollouts(rows, rollouts, roles.rewards, tokenizer, args.num_samples)
        metrics = roles.learner.evaluate(pairs.batch, beta)
        metrics.update(pairs.metrics)
        metrics["objective/rlhf_reward"] = rlhf_reward(pairs.pair_scores, metrics["objective/non_score_reward"])
        if compute_metrics is not None:
            metrics.update(compute_metrics(EvalPrediction(predictions=pairs.pair_scores.numpy(), label_ids=None)))
        for key, value in metrics.items():
            sums[key] += value * len(rows)
        total += len(rows)
    results = {f"{prefix}_{key}": value / total for key, value in sums.items() if not key.startswith("time/")}
    results[f"{prefix}_runtime"] = time.perf_counter() - start
    results[f"{prefix}_samples_per_second"] = total * args.num_samples / results[f"{prefix}_runtime"]
    return results
