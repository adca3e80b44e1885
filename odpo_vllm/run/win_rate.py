"""Win rate against the reference, as the seed's benchmark reports it (TRL's `WinRateCallback`,
removed from TRL in 1.1, with its signature).

At the start of training the run's engines serve version 0, which is the reference whenever the
trainer made its own (`ref_model=None`: a frozen copy of the starting policy, or a LoRA policy's
base, which the zero-initialised adapter leaves unchanged). The reference's completions of the
evaluation prompts are sampled then, once (kept in `output_dir`, so a resumed run reuses them);
each evaluation samples the current policy's completions of the same prompts with the same seed
(two evaluations of the same weights give the same rate), and a judge compares each pair. Cost:
one extra sampling pass over the chosen evaluation prompts per evaluation (and one at the start),
plus the judge; no second engine and no reference weights in the driver.
"""

from __future__ import annotations

import json
import os
import random

import torch
from transformers import TrainerCallback

from odpo_vllm.run.engine_policy import generation_conflicts
from odpo_vllm.sampling.pipeline import step_seed

WIN_RATE_SEED_SALT = 3  # evaluation uses 1, completions for callbacks 2
REFERENCE_FILE = "win_rate_reference.json"


def win_rate(outcomes: list[float]) -> float:
    """The mean of per-prompt outcomes: 1 the policy won, 0 it lost, 0.5 a tie."""
    return sum(outcomes) / len(outcomes)


def outcomes_from_scores(policy: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Higher score wins; equal scores tie."""
    return [1.0 if p > r else 0.0 if p < r else 0.5 for p, r in zip(policy.tolist(), reference.tolist())]


def outcomes_from_judge(judge, prompts: list[str], policy: list[str], reference: list[str],
                        shuffle_order: bool, seed: int) -> list[float]:
    """A pairwise judge (`.judge(prompts, [[a, b], ...]) -> [index of the better, ...]`, -1 a tie)
    sees each pair in a random order when `shuffle_order` (seeded: the same evaluation judges alike)."""
    rng = random.Random(seed)
    swapped = [shuffle_order and rng.random() < 0.5 for _ in prompts]
    pairs = [[r, p] if s else [p, r] for p, r, s in zip(policy, reference, swapped)]
    verdicts = judge.judge(prompts, pairs)
    outcomes = []
    for i, (verdict, s) in enumerate(zip(verdicts, swapped)):
        if verdict not in (0, 1, -1):
            raise ValueError(f"WinRateCallback: the judge returned {verdict!r} for pair {i}; expected 0 or 1 (the "
                             "better one) or -1 (a tie)")
        outcomes.append(0.5 if verdict == -1 else float((verdict == 1) == s))
    return outcomes


class WinRateCallback(TrainerCallback):
    """Logs `eval_win_rate` at every evaluation: the share of evaluation prompts whose completion by
    the current policy the judge prefers to the reference's (ties count half).

    `judge`: a pairwise judge (an object with `.judge(prompts, pairs)`), a reward callable
    `f(prompts, completions, **columns) -> scores` (higher wins), or None for the run's own reward
    functions. `num_prompts`: the first n evaluation prompts (default all). `generation_config`:
    must describe the run's own sampling (the engines sample with it), or None.
    """

    def __init__(self, judge, trainer, generation_config=None, num_prompts: int | None = None,
                 shuffle_order: bool = True):
        eval_rows = getattr(trainer, "_eval_encoded", None)
        if eval_rows is None or isinstance(eval_rows, dict):
            raise ValueError("WinRateCallback: the trainer needs one eval_dataset (not a dict of them) with the "
                             "prompts to compare on")
        if getattr(trainer, "separate_reference", False):
            raise ValueError("WinRateCallback: the reference here is the starting policy, sampled by the run's "
                             "engines before the first update; with a ref_model of its own that is another model. "
                             "Leave ref_model=None to compare against the starting policy")
        conflicts = generation_conflicts(generation_config, trainer.args.sampling_settings())
        if conflicts:
            raise ValueError(f"WinRateCallback: completions come from the run's engines, which sample with the run's "
                             f"settings; the generation_config asks for {'; '.join(conflicts)}. Set those on "
                             "OnlineDPOConfig or pass generation_config=None")
        count = len(eval_rows) if num_prompts is None else min(num_prompts, len(eval_rows))
        self.trainer, self.judge, self.shuffle_order = trainer, judge, shuffle_order
        self.rows = [eval_rows[i] for i in range(count)]
        self.reference: list[list[int]] | None = None
        self.seed = step_seed(trainer.args.seed, 0, WIN_RATE_SEED_SALT)

    # ------------------------------------------------------------------ sampling
    def _sample(self) -> list[list[int]]:
        trainer = self.trainer
        trainer.sync_engines()  # the current policy, also between two pushes of weight_sync_steps
        rollouts = trainer.generator.generate([row["prompt_ids"] for row in self.rows], 1, self.seed)
        return rollouts.completion_ids

    def on_train_begin(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, REFERENCE_FILE)
        if os.path.exists(path):  # written at the start of this run (a resumed run reuses it)
            with open(path) as f:
                saved = json.load(f)
            if saved["prompt_ids"] == [row["prompt_ids"] for row in self.rows] and saved["seed"] == self.seed:
                self.reference = saved["completion_ids"]
                return
        if state.global_step != 0 or self.trainer.publisher.version != 0:
            raise RuntimeError(f"WinRateCallback: the run starts at step {state.global_step} without the reference "
                               f"completions of its start ({path}); add the callback from the first step")
        self.reference = self._sample()
        os.makedirs(args.output_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"seed": self.seed, "prompt_ids": [row["prompt_ids"] for row in self.rows],
                       "completion_ids": self.reference}, f)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        rate = self.evaluate()
        if metrics is not None:
            metrics["eval_win_rate"] = rate
        self.trainer.log({"eval_win_rate": rate})

    # ------------------------------------------------------------------ judging
    def evaluate(self) -> float:
        """The current policy's win rate over the reference's completions."""
        if self.reference is None:
            raise RuntimeError("WinRateCallback: no reference completions yet (they are sampled when training begins)")
        trainer = self.trainer
        policy = self._sample()
        decode = trainer.tokenizer.batch_decode
        policy_text, reference_text = decode(policy, skip_special_tokens=True), decode(self.reference,
                                                                                        skip_special_tokens=True)
        prompts = [row["prompt"] for row in self.rows]
        shown = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        if hasattr(self.judge, "judge"):
            return win_rate(outcomes_from_judge(self.judge, shown, policy_text, reference_text, self.shuffle_order,
                                                self.seed))
        if self.judge is not None:  # a reward callable used as a judge
            scores = self.judge(prompts=prompts + prompts, completions=policy_text + reference_text,
                                completion_ids=policy + self.reference)
            scores = torch.tensor(scores, dtype=torch.float32)
            return win_rate(outcomes_from_scores(scores[: len(prompts)], scores[len(prompts):]))
        columns = {key: [row[key] for row in self.rows] * 2 for key in self.rows[0]
                   if key not in ("prompt", "prompt_ids")}
        eos = set(trainer.eos_token_ids)
        contains_eos = torch.tensor([bool(ids) and ids[-1] in eos for ids in policy + self.reference])
        scores, _ = trainer.rewards.score(prompts + prompts, policy_text + reference_text, policy + self.reference,
                                          columns, contains_eos)
        return win_rate(outcomes_from_scores(scores[: len(prompts)], scores[len(prompts):]))
