"""One learner step (reference pass + policy forward/backward) at real prompt lengths: odpo_vllm
with separate padded sequences (before), with shared-prompt packed rows (after), and TRL's
`OnlineDPOTrainer` on the same pairs. Prints a markdown table and writes it to a file.

    python benchmarks/bench_learner.py [--out benchmarks/results/learner_cpu.md] [--repeats 3]
                                       [--models 21m,qwen05] [--shapes tldr,ultrafeedback,short]
                                       [--systems before,after,trl] [--device cpu|cuda] [--bf16]

Models (random init): `smollm2` has SmolLM2-135M-Instruct's config (the real demo's model);
`21m` is bench_vs_trl.py's large toy model (Qwen2-shaped, hidden 512, 8 layers, vocabulary 320);
`qwen05` has Qwen2-0.5B's shape (hidden 896, MLP 4864, 14 heads, 2 KV
heads, vocabulary 151,936, tied embeddings) with `--qwen_layers` layers (default 2) instead of 24,
so that it runs on 2 CPU cores in reasonable time.
Shapes (token ids drawn at random, the same pairs for every system): TL;DR-like (prompt 400,
completions 24-53), UltraFeedback-like (prompt 200, completions 64-256), short (prompt 32,
completions 128), chat (prompt 45, completions 16-64: the real task's requests); `--pairs` pairs
per step in one micro-batch.

A step is what each trainer does per micro-batch once the completions are there:
- odpo_vllm: `Learner._pair_pass` (reference logprobs without grad, policy logprobs, loss) and
  `backward`, with `shared_prompt_passes` False (before) or True (after);
- TRL 1.16: `OnlineDPOTrainer.training_step` with `_generate` replaced by one that returns the
  fixed completions (right-padded to the longest, as its generation does), as
  benchmarks/tests/test_trl_parity.py drives it; the reward is a callable returning fixed scores.
No optimizer step on either side; gradient checkpointing off on both. Per (model, shape), one
process times all systems: a warm-up step each, then `--repeats` rounds in which every system
takes one step, in a rotated order, so that load from other work on a shared machine hits all
systems alike; reported: the median seconds, and tokens/s = tokens of the step's separate
prompt+completion sequences (the same for every system) / seconds. Peak memory comes from a
fresh process per system taking one step: the resident-set high-water mark during the step minus
the resident set before it (weights and inputs not counted).
"""

from __future__ import annotations

import odpo_vllm  # noqa: F401  (sets OMP_WAIT_POLICY before torch starts its thread pool)

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

SHAPES = {  # prompt length, completion length range
    "tldr": ("TL;DR-like", 400, (24, 53)),
    "ultrafeedback": ("UltraFeedback-like", 200, (64, 256)),
    "short": ("short prompt", 32, (128, 128)),
    "chat": ("short chat prompt", 45, (16, 64)),  # the real task's requests with SmolLM2's chat template
}
MODELS = {"21m": "21M (hidden 512, 8 layers, vocab 320)", "qwen05": "Qwen2-0.5B-shaped ({layers} layers, vocab 152k)",
          "smollm2": "SmolLM2-135M-shaped (30 layers, vocab 49k)"}
SYSTEMS = {"before": "odpo_vllm, separate sequences", "after": "odpo_vllm, shared-prompt rows", "trl": "TRL 1.16"}
BETA = 0.1


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current resident set
    return _status_kib("VmRSS")


def model_config(name: str, qwen_layers: int):
    from transformers import LlamaConfig, Qwen2Config

    if name == "smollm2":  # SmolLM2-135M-Instruct's config (random weights: a device has no package data)
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                           pad_token_id=1, eos_token_id=0, bos_token_id=None)
    if name == "21m":
        return Qwen2Config(vocab_size=320, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                           tie_word_embeddings=True, pad_token_id=1, eos_token_id=0, bos_token_id=None)
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=qwen_layers,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, pad_token_id=1, eos_token_id=0, bos_token_id=None)


def make_pairs(shape: str, pairs: int, vocab: int, seed: int = 0):
    import torch

    _, prompt_len, (low, high) = SHAPES[shape]
    generator = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    length = lambda: int(torch.randint(low, high + 1, (1,), generator=generator))  # noqa: E731
    prompts = [tokens(prompt_len) for _ in range(pairs)]
    return prompts, [tokens(length()) for _ in range(pairs)], [tokens(length()) for _ in range(pairs)]


def worker(mode: str, systems: list[str], model_name: str, shape: str, pairs: int, repeats: int, qwen_layers: int,
           device: str, bf16: bool) -> dict:
    """mode "time": every system's step in this process, `repeats` rounds, each round running the
    systems one after the other in a rotated order (drift on a shared machine hits all alike);
    mode "memory": one system, one step in this fresh process, its peak memory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = model_config(model_name, qwen_layers)
    policy = AutoModelForCausalLM.from_config(config).to(device).train()
    reference = AutoModelForCausalLM.from_config(config).to(device).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    with torch.no_grad():  # a policy one step away from its reference, so the loss is not log 2
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    prompts, chosen, rejected = make_pairs(shape, pairs, config.vocab_size)
    steps = {system: (_trl_step if system == "trl" else _our_step)(system, policy, reference, prompts, chosen,
                                                                  rejected, pairs, device, bf16)
             for system in systems}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
    result = {"tokens": tokens, "params": sum(p.numel() for p in policy.parameters()),
              "threads": torch.get_num_threads(), "seconds": {s: [] for s in systems}, "loss": {}}

    def timed(system):
        policy.zero_grad(set_to_none=True)
        start = time.perf_counter()
        result["loss"][system] = steps[system]()
        sync()
        return time.perf_counter() - start

    if mode == "memory":
        (system,) = systems
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _reset_peak()
        result["seconds"][system].append(timed(system))  # a first step: its one-time costs included
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20 if device == "cuda" else \
            (_status_kib("VmHWM") - before) / 1024
        return result
    for system in systems:  # warm-up
        timed(system)
    for r in range(repeats):
        for system in systems[r % len(systems):] + systems[: r % len(systems)]:
            result["seconds"][system].append(timed(system))
    return result


def _our_step(system, policy, reference, prompts, chosen, rejected, pairs, device, bf16):
    from odpo_vllm import OnlineDPOConfig
    from odpo_vllm.core.batches import PairBatch
    from odpo_vllm.learning.learner import Learner

    args = OnlineDPOConfig(output_dir="/tmp/odpo_bench_learner", report_to="none", gradient_checkpointing=False,
                           per_device_train_batch_size=pairs, max_length=1024, max_new_tokens=256, beta=BETA,
                           shared_prompt_passes=system == "after", bf16=bf16, use_cpu=device == "cpu")
    learner = Learner(policy, reference, args, pad_token_id=1, num_training_steps=1)
    batch = PairBatch(prompts, chosen, rejected)

    def step():
        loss, _, _ = learner._pair_pass(batch, BETA, len(batch), train=True)
        loss.backward()
        return float(loss.detach())

    return step


def _trl_step(system, policy, reference, prompts, chosen, rejected, pairs, device, bf16):
    import datasets
    import torch
    from transformers import PreTrainedTokenizerFast
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from odpo_vllm import toy

    tokenizer = toy.build_tokenizer()  # only decodes for the reward callable; ids come from the pairs
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    width = max(len(c) for c in chosen + rejected)
    args = OnlineDPOConfig(output_dir="/tmp/odpo_bench_learner_trl", report_to="none", bf16=bf16,
                           use_cpu=device == "cpu", per_device_train_batch_size=pairs, gradient_checkpointing=False,
                           beta=[BETA], max_length=1024, max_new_tokens=width, save_strategy="no",
                           disable_dropout=True)
    scores = [1.0] * pairs + [0.0] * pairs  # sample 0 (chosen) wins every pair

    def reward(prompts, completions, completion_ids, **kwargs):
        return list(scores)

    trainer = OnlineDPOTrainer(model=policy, ref_model=reference, reward_funcs=reward, args=args,
                               processing_class=tokenizer,
                               train_dataset=datasets.Dataset.from_list([{"prompt": "x"}] * pairs))
    pad = 1
    prompt_ids = torch.tensor(prompts + prompts, device=device)  # block layout: all prompts, twice
    rows = chosen + rejected
    completion_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows], device=device)
    completion_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows], device=device)
    trainer._generate = lambda model, prompts, images=None: (
        prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask, None)
    model = trainer.model
    inputs = {"prompt": ["x"] * pairs}

    def step():
        return float(trainer.training_step(model, inputs))

    return step


# ============================================================================================
def run(options, log=print) -> dict:
    """Per (model, shape): one timing process (all systems interleaved), then one fresh process per
    system for its peak memory. Returns {(model, shape, system): {"seconds", "peak_mib", "loss", "tokens"}}."""
    results = {}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))

    def call(mode, systems, model, shape):
        spec = [mode, systems, model, shape, options.pairs, options.repeats, options.qwen_layers, options.device,
                options.bf16]
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            log(f"{mode} {systems} {model} {shape}: failed: {done.stderr.strip().splitlines()[-3:]}")
            return None
        return json.loads(lines[-1][len("RESULT "):])

    for model in options.models:
        for shape in options.shapes:
            timing = call("time", options.systems, model, shape)
            if timing is None:
                continue
            for system in options.systems:
                memory = call("memory", [system], model, shape)
                seconds = timing["seconds"][system]
                results[(model, shape, system)] = {
                    "seconds": seconds, "loss": timing["loss"][system], "tokens": timing["tokens"],
                    "peak_mib": memory["peak_mib"] if memory else float("nan"),
                    "first_step_s": memory["seconds"][system][0] if memory else float("nan")}
                log(f"{model:7s} {shape:14s} {system:7s} median {statistics.median(seconds):7.2f} s "
                    f"(runs {', '.join(f'{s:.2f}' for s in seconds)}) peak "
                    f"{results[(model, shape, system)]['peak_mib']:7.0f} MiB loss {timing['loss'][system]:.6f}")
    return results


def table(results: dict, options) -> list[str]:
    precision = "bf16" if options.bf16 else "fp32"
    lines = [
        f"Pairs per step: {options.pairs} (one micro-batch), {precision}, gradient checkpointing off, "
        f"median of {options.repeats} rounds after a warm-up (systems interleaved in one process; peak "
        "memory: one step in a fresh process per system). tokens/s = tokens of "
        "the step's separate prompt+completion sequences / seconds (the same work for every column).",
        "",
        "| model | shape | before: tok/s | s | peak MiB | after: tok/s | s | peak MiB | TRL: tok/s | s | peak MiB "
        "| after / before | after / TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in options.models:
        label = MODELS[model].format(layers=options.qwen_layers)
        for shape in options.shapes:
            name, prompt, (low, high) = SHAPES[shape]
            completions = f"{low}" if low == high else f"{low}-{high}"
            cells, seconds = [], {}
            for system in ("before", "after", "trl"):
                result = results.get((model, shape, system))
                if result is None:
                    cells.append("n/a | n/a | n/a")
                    continue
                seconds[system] = statistics.median(result["seconds"])
                cells.append(f"{result['tokens'] / seconds[system]:,.0f} | {seconds[system]:.2f} | "
                             f"{result['peak_mib']:,.0f}")
            ratio = lambda a, b: f"{seconds[b] / seconds[a]:.2f}x" if a in seconds and b in seconds else "n/a"  # noqa
            lines.append(f"| {label} | {name} (prompt {prompt}, completions {completions}) | " + " | ".join(cells)
                         + f" | {ratio('after', 'before')} | {ratio('after', 'trl')} |")
    losses = {key: r["loss"] for key, r in results.items()}
    gaps = [abs(losses[(m, s, "after")] - losses[(m, s, other)]) for (m, s, system) in losses if system == "after"
            for other in ("before", "trl") if (m, s, other) in losses]
    if gaps:
        lines += ["", f"Same pairs, same loss: largest difference of a step's loss from the after column "
                      f"{max(gaps):.1e}."]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/learner_cpu.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--qwen_layers", type=int, default=2)
    parser.add_argument("--models", default="21m,qwen05")
    parser.add_argument("--shapes", default="tldr,ultrafeedback,short")
    parser.add_argument("--systems", default="before,after,trl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        print("RESULT " + json.dumps(worker(*json.loads(options.worker))), flush=True)
        return
    for name in ("models", "shapes", "systems"):
        setattr(options, name, [x for x in getattr(options, name).split(",") if x])
    import torch
    import transformers

    start = time.perf_counter()
    results = run(options)
    header = [f"# Learner step: shared-prompt rows vs separate sequences vs TRL ({time.strftime('%Y-%m-%d')}, "
              f"{options.device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, transformers "
              f"{transformers.__version__})", ""]
    text = "\n".join(header + table(results, options)
                     + ["", f"Benchmark wall time {time.perf_counter() - start:.0f} s."]) + "\n"
    print(text)
    os.makedirs(os.path.dirname(options.out) or ".", exist_ok=True)
    with open(options.out, "w") as f:
        f.write(text)
    print(f"written to {options.out}")


if __name__ == "__main__":
    main()
