"""Do the vLLM engine and transformers sample the same distribution at trained weights?

    python benchmarks/bench_sampler_agreement.py [--steps 24] [--prompts 64] [--k 16] [--out FILE]

Issue 28's open question: on `smollm2-lora` (bench_seeds.py) the reward of the samples ours' vLLM
engine drew during training sat below TRL's (transformers generate) on every seed, while ours'
final policies scored at least as high as TRL's on held-out prompts. At the starting weights the
two samplers agree; this checks them at trained weights. In one process: ours trains the seeds
benchmark's smollm2-lora run (same settings, seed, prompts; K=0, vLLM engine), pushes the final
weights to its engine, then the same training prompts are sampled `k` times each by

- `vllm`: the trainer's own engine (what training samples with), and
- `transformers`: `generate` on the learner's model in eval mode (the common held-out sampler of
  bench_real_learning, with the training temperature and length),

and every completion is scored by the task's reward and by the learner: its sequence logprob under
the policy, which does not depend on the reward's noise. Same weights, same prompts; if the two
samplers draw from one distribution, every row of the table agrees within its standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5


def completion_logprobs(model, prompt_ids: list[list[int]], completions: list[list[int]], pad: int) -> list[float]:
    """Sum of log p(completion | prompt) under `model` (eval mode), one number per completion."""
    import torch

    from odpo_vllm.core.sequences import token_logprobs

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(completions), 16):
            rows = [p + c for p, c in zip(prompt_ids[start:start + 16], completions[start:start + 16])]
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logprobs = token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)  # [b, width - 1]
            for row, (p, c) in enumerate(zip(prompt_ids[start:start + 16], completions[start:start + 16])):
                out.append(float(logprobs[row, len(p) - 1: len(p) - 1 + len(c)].sum()))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=64, help="training prompts sampled (the first of the set)")
    parser.add_argument("--k", type=int, default=16, help="samples per prompt and sampler")
    parser.add_argument("--out", default=None, help="a markdown table (+ .json)")
    options = parser.parse_args()

    import odpo_vllm  # noqa: F401
    import torch
    from datasets import Dataset
    from transformers import GenerationConfig

    import bench_seeds
    from odpo_vllm import OnlineDPOConfig, OnlineDPOTrainer, real_task

    task = bench_seeds.TASKS["smollm2-lora"]
    model_path = bench_seeds.build_task("smollm2-lora", tempfile.mkdtemp())
    output_dir = tempfile.mkdtemp(prefix="odpo_sampler_agreement_")
    args = OnlineDPOConfig(
        **task["settings"], seed=options.seed, max_steps=options.steps, output_dir=output_dir,
        max_length=bench_seeds.MAX_LENGTH, use_vllm=True, gradient_checkpointing=False, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, plot_at_end=False)
    rows = task["prompts"]()[:options.prompts]
    k, started = options.k, time.perf_counter()
    trainer = OnlineDPOTrainer(model=model_path, reward_funcs=task["reward"], args=args,
                               train_dataset=Dataset.from_list(task["prompts"]()), peft_config=bench_seeds.lora_config())
    with trainer:
        if options.steps:
            trainer.train()
        trainer.sync_engines()  # the engine serves the final weights
        tokenizer = trainer.processing_class
        prompt_ids = [trainer.encoder.encode(row, i) for i, row in enumerate(rows)]
        eos = set(trainer.eos_token_ids) if hasattr(trainer, "eos_token_ids") else {tokenizer.eos_token_id}
        samples: dict[str, list[list[int]]] = {}

        # vLLM: block layout (sample j of prompt i at j * n + i), as training samples
        rollouts = trainer.generator.generate(prompt_ids, k, 20261206)
        n = len(rows)
        samples["vllm"] = [list(rollouts.completion_ids[j * n + i]) for i in range(n) for j in range(k)]

        # transformers: the learner's model, eval mode, the same prompt ids (left-padded), k per prompt
        model = trainer.model
        model.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generation = GenerationConfig(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                                      max_new_tokens=args.max_new_tokens, num_return_sequences=k,
                                      eos_token_id=sorted(eos), pad_token_id=pad)
        torch.manual_seed(20261206)
        hf: list[list[int]] = []
        for start in range(0, n, 8):
            batch = prompt_ids[start:start + 8]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
            for row in out[:, width:].tolist():
                cut = next((t + 1 for t, token in enumerate(row) if token in eos), len(row))
                hf.append(row[:cut])
        samples["transformers"] = hf

        table = {}
        repeated = [p for p in prompt_ids for _ in range(k)]
        for name, completions in samples.items():
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            scores = real_task.vader_scores(texts)
            logprobs = completion_logprobs(model, repeated, completions, pad)
            lengths = [len(c) for c in completions]
            table[name] = {
                "reward": mean_se(scores), "per_prompt": [statistics.fmean(scores[i * k:(i + 1) * k]) for i in range(n)],
                "seq_logprob": mean_se(logprobs), "per_token_logprob": mean_se(
                    [lp / max(1, length) for lp, length in zip(logprobs, lengths)]),
                "length": mean_se([float(x) for x in lengths]),
                "eos": mean_se([float(bool(c) and c[-1] in eos) for c in completions]),
            }
    diffs = [a - b for a, b in zip(table["vllm"]["per_prompt"], table["transformers"]["per_prompt"])]
    lines = [f"# The two samplers at trained weights ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs)", "",
             f"`python benchmarks/bench_sampler_agreement.py --steps {options.steps} --seed {options.seed} "
             f"--prompts {options.prompts} --k {k}`: ours trained smollm2-lora (bench_seeds.py's settings) for "
             f"{options.steps} steps, then {n} training prompts x {k} samples per sampler at the final weights "
             f"(temperature {args.temperature}, up to {args.max_new_tokens} tokens); mean ± standard error over "
             f"completions; {time.perf_counter() - started:.0f} s in all.", "",
             "| sampler | reward (VADER) | sequence logprob | logprob per token | tokens | ends with EOS |",
             "|---|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[key][0]:.3f} ± {row[key][1]:.3f}" for key in (
            "reward", "seq_logprob", "per_token_logprob", "length", "eos")) + " |")
    d_mean, d_se = mean_se(diffs)
    lines += ["", f"vLLM - transformers reward, paired over the {n} prompts: {d_mean:+.3f} ± {d_se:.3f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if options.out:
        with open(options.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(options.out)[0] + ".json", "w") as f:
            json.dump({"options": vars(options), "table": table, "paired": [d_mean, d_se]}, f, indent=1)


if __name__ == "__main__":
    main()
