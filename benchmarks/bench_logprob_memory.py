"""Peak memory of the logprob pass at a large vocabulary: prints a markdown table, writes it to a file.

    python benchmarks/bench_logprob_memory.py [--out benchmarks/results/logprob_memory_cpu.md] [--quick]

A Qwen2-shaped model (vocabulary 150,000, hidden 256, 2 layers, fp32, random init) scores
4 sequences of 16 prompt + 1,008 completion tokens (1,024 in all) three ways:

- `full logits + log_softmax`: the model's logits, then one fp32 log-softmax over the completion
  slice, as TRL's `OnlineDPOTrainer._forward` does;
- `full logits + gathered log-softmax`: the model's logits, then `logprobs_from_logits`: an fp32
  log-softmax on 256 completion positions at a time (odpo_vllm's fallback where the output layer
  alone does not give the logits, and under ZeRO-3);
- `hidden states + chunked lm_head`: `Learner.completion_logprobs` as it is now: the forward stops
  at the final hidden states and `logprobs_from_hidden` projects completion tokens a chunk at a
  time (checkpointed under autograd), so no (N, T, V) tensor exists.

Each pass runs in a fresh process, twice: as the reference pass (no grad) and as the policy pass
(forward + backward of the summed logprobs). Peak = the process's resident-set high-water mark
during the pass minus its resident set just before (`/proc/self/clear_refs` resets the mark), so
weights, inputs and the interpreter are not counted.
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

METHODS = {
    "full": "full logits + log_softmax (TRL `_forward`)",
    "gathered": "full logits + log-softmax on completion positions (`logprobs_from_logits`)",
    "hidden": "hidden states + chunked lm_head (`Learner.completion_logprobs`)",
}
MODES = ("reference (no grad)", "policy (forward + backward)")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def worker(method: str, grad: bool, vocab: int, prompt_len: int, completion_len: int, rows: int, hidden: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from odpo_vllm import OnlineDPOConfig
    from odpo_vllm.core.sequences import logprobs_from_logits, separate_sequences
    from odpo_vllm.learning.learner import Learner

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=True,
                         max_position_embeddings=prompt_len + completion_len, pad_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config).train()
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, vocab, (rows, prompt_len), generator=generator).tolist()
    completions = torch.randint(2, vocab, (rows, completion_len), generator=generator).tolist()
    layout = separate_sequences(prompts, [[c] for c in completions], prompt_len + completion_len, pad_token_id=0)
    args = OnlineDPOConfig(output_dir="/tmp/odpo_bench_memory", report_to="none", gradient_checkpointing=False,
                           max_length=prompt_len + completion_len, max_new_tokens=completion_len)
    learner = Learner(model, None, args, 0, 1)

    def run():
        if method == "hidden":
            logps, _ = learner.completion_logprobs(model, layout)
        elif method == "gathered":
            logps, _ = logprobs_from_logits(model(**layout.model_inputs(), use_cache=False).logits, layout)
        else:  # TRL's _forward: logits of the completion slice, one log_softmax over the vocabulary
            logits = model(**layout.model_inputs(), use_cache=False).logits[:, prompt_len - 1 : -1]
            completion = layout.input_ids[:, prompt_len:]
            logps = torch.take_along_dim(logits.log_softmax(dim=-1), completion.unsqueeze(-1), dim=2).squeeze(-1)
        if grad:
            logps.sum().backward()
        return float(logps.detach().sum())

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        total = run()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"method": method, "grad": grad, "peak_mib": (peak - before) / 1024, "seconds": seconds, "sum": total,
            "full_logits_mib": rows * (prompt_len + completion_len) * vocab * 4 / 2**20,
            "used_hidden_path": learner._hidden_path.get(id(model)) if method == "hidden" else None}


def _available_mib() -> float:
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def run_memory_bench(vocab=150_000, prompt_len=16, completion_len=1008, rows=4, hidden=256, repeats=1,
                     log=print) -> dict:
    """Every (mode, method) in a fresh subprocess; `repeats` rounds, methods alternated."""
    results: dict = {}
    full_mib = rows * (prompt_len + completion_len) * vocab * 4 / 2**20
    for r in range(repeats):
        for grad in (False, True):
            for method in METHODS:
                need = full_mib * (4.5 if grad else 2.5) + 1024
                if _available_mib() < need:  # a machine shared with other work: say so, do not swap
                    log(f"memory bench: skipped {method} grad={grad}: needs ~{need:.0f} MiB, "
                        f"{_available_mib():.0f} available")
                    continue
                command = [sys.executable, os.path.abspath(__file__), "--worker",
                           json.dumps([method, grad, vocab, prompt_len, completion_len, rows, hidden])]
                done = subprocess.run(command, capture_output=True, text=True, timeout=900)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    log(f"memory bench: {method} grad={grad} failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                result = json.loads(lines[-1][len("RESULT "):])
                results.setdefault((grad, method), []).append(result)
                log(f"memory bench: {method:6s} grad={grad!s:5s} peak {result['peak_mib']:8.0f} MiB "
                    f"{result['seconds']:6.2f} s (sum {result['sum']:.3f})")
    return {"results": results, "vocab": vocab, "prompt_len": prompt_len, "completion_len": completion_len,
            "rows": rows, "hidden": hidden, "full_mib": full_mib, "repeats": repeats}


def memory_table(bench: dict) -> list[str]:
    res = bench["results"]
    lines = [
        f"## Logprob pass memory: vocabulary {bench['vocab']:,}, {bench['rows']} sequences x "
        f"{bench['prompt_len'] + bench['completion_len']:,} tokens ({bench['completion_len']:,} completion), fp32",
        "",
        f"Hidden {bench['hidden']}, 2 layers. Full fp32 logits of the batch: {bench['full_mib']:,.0f} MiB. Peak = "
        f"resident-set high-water mark during the pass minus the resident set before it, fresh process per pass"
        + ("." if bench["repeats"] == 1 else f", median of {bench['repeats']}."),
        "",
        "| pass | method | peak MiB | seconds | unchunked peak / this peak |",
        "|---|---|---|---|---|",
    ]
    for grad, mode in zip((False, True), MODES):
        base = res.get((grad, "full"))
        base_peak = statistics.median(r["peak_mib"] for r in base) if base else None
        for method, label in METHODS.items():
            runs = res.get((grad, method))
            if not runs:
                lines.append(f"| {mode} | {label} | did not run | | |")
                continue
            peak = statistics.median(r["peak_mib"] for r in runs)
            seconds = statistics.median(r["seconds"] for r in runs)
            ratio = f"{base_peak / peak:.1f}x" if base_peak else "n/a"
            lines.append(f"| {mode} | {label} | {peak:,.0f} | {seconds:.2f} | {ratio} |")
    sums = {(g, m): runs[0]["sum"] for (g, m), runs in res.items()}
    spread = max((abs(sums[(g, m)] - sums[(g, "full")]) for g, m in sums if (g, "full") in sums), default=0.0)
    lines += ["", f"All methods give the same logprobs: largest difference of the summed logprobs from the "
                  f"unchunked pass {spread:.2e} (sums are about {abs(next(iter(sums.values()))):,.0f})."]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/logprob_memory_cpu.md; --quick: /tmp/logprob_memory_quick.md")
    parser.add_argument("--quick", action="store_true", help="vocabulary 32k, 4 x 256 tokens")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        print("RESULT " + json.dumps(worker(*json.loads(options.worker))), flush=True)
        return
    import torch

    bench = run_memory_bench(vocab=32_000, completion_len=240) if options.quick else run_memory_bench()
    lines = [f"# Logprob-pass memory ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__})", ""] + memory_table(bench)
    table = "\n".join(lines) + "\n"
    print(table)
    out = options.out or ("/tmp/logprob_memory_quick.md" if options.quick
                          else "benchmarks/results/logprob_memory_cpu.md")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(table)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
