"""The asynchronous actor/learner pipeline on CPU: how much of sampling and learning overlap.

    python benchmarks/bench_async.py [--out benchmarks/results/async_cpu.md] [--new_tokens 32,96]
                                     [--rounds N] [--steps N] [--quick] [--systems ded-k0,ded-k1]

The dedicated Ray placement with one DeepSpeed learner rank and one vLLM engine, one CPU each
(`ray_cpus_per_actor=1` on a 2-CPU local cluster), at `async_steps` K = 0, 1, 2; beside it, on the
same model, prompts, reward and batch, in the same rounds: odpo_vllm in one process (K = 0, vLLM
engine) and TRL's `OnlineDPOTrainer` in its best CPU configuration (`gradient_checkpointing=False`,
which keeps its sampler's KV cache; its default is True). Every system runs with gradient
checkpointing off (TRL's best; ours then does the same compute). Runs go through
`bench_vs_trl.py`'s worker (a fresh subprocess each, rounds alternating the systems).

Per system: samples/s (2 x prompts / median step seconds), the median step, the step's parts
(sample + score: `time/generate` + `time/reward`; train + sync: `time/train` + `sync/seconds`),
the overlap limit max(sample + score, train + sync), step / limit (1.0: perfect overlap; the
synchronous step is their sum) and step - limit (the seconds each step spends on neither), and
the async metrics (`time/wait_rollouts`, `time/wait_weights`, `async/staleness`). One table per
completion length (`--new_tokens`): the default 32 and a length at which sampling costs about what
learning does.
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

SYSTEMS = {  # name -> (bench_vs_trl worker system, extra cfg)
    "TRL best (gradient_checkpointing=False)": ("trl-nockpt", {}),
    "odpo_vllm in process, K=0": ("ours-vllm", {}),
    "dedicated 1 rank + 1 engine, K=0": ("ray-ded-z2", {"async_steps": 0}),
    "dedicated 1 rank + 1 engine, K=1": ("ray-ded-z2", {"async_steps": 1}),
    "dedicated 1 rank + 1 engine, K=2": ("ray-ded-z2", {"async_steps": 2}),
    # the rank may use the core the engine leaves idle while it waits for a version
    "dedicated, K=1, rank with 2 threads": ("ray-ded-z2", {"async_steps": 1, "threads": 2}),
}
SHORT = dict(zip(("trl", "local-k0", "ded-k0", "ded-k1", "ded-k2", "ded-k1-2t"), SYSTEMS))  # --systems


def median(values):
    return statistics.median(values) if values else 0.0


def summarize(runs: list[dict], warmup: int, prompts: int) -> dict | None:
    good = [r for r in runs if r.get("ok")]
    if not good:
        return None
    pooled: dict = {}
    for run in good:
        for key in ("steps", "generate", "reward", "train", "sync", "wait_rollouts", "wait_weights", "staleness"):
            values = run.get(key) or []
            pooled.setdefault(key, []).extend(values[warmup:] or values)
    for run in good:  # the driver's calls per step (bench_vs_trl._time_phases)
        for key, values in (run.get("phases") or {}).items():
            pooled.setdefault("phase " + key, []).extend(values[warmup:] or values)
    out = {key: median(values) for key, values in pooled.items() if values}
    out["sample_score"] = out["generate"] + out["reward"]
    out["train_sync"] = out["train"] + out["sync"]
    out["limit"] = max(out["sample_score"], out["train_sync"])
    out["samples_per_s"] = 2 * prompts / out["steps"]
    out["tokens"] = statistics.mean(t for r in good for t in r.get("tokens", [])) if any(
        r.get("tokens") for r in good) else 0.0
    return out


def table(new_tokens: int, summaries: dict, errors: dict) -> list[str]:
    lines = [f"### up to {new_tokens} new tokens per completion", "",
             "| system | samples/s | step s | sample + score s | train + sync s | step / max(both) | "
             "step - max(both) s | wait rollouts s | wait weights s | staleness | tokens/completion |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, summary in summaries.items():
        if summary is None:
            lines.append(f"| {name} | did not run: {errors.get(name, '?')} ||||||||||")
            continue
        async_cols = (f"{summary['wait_rollouts']:.3f} | {summary['wait_weights']:.3f} | {summary['staleness']:.0f}"
                      if "wait_rollouts" in summary else "- | - | -")
        lines.append(f"| {name} | {summary['samples_per_s']:.1f} | {summary['steps']:.3f} | "
                     f"{summary['sample_score']:.3f} | {summary['train_sync']:.3f} | "
                     f"{summary['steps'] / summary['limit']:.2f} | {summary['steps'] - summary['limit']:.3f} | "
                     f"{async_cols} | {summary['tokens']:.1f} |")
    phased = {name: summary for name, summary in summaries.items()
              if summary is not None and any(key.startswith("phase ") for key in summary)}
    if phased:
        keys = [key for key in next(iter(phased.values())) if key.startswith("phase ")]
        lines += ["", "Where the driver's step goes (median seconds per call; `rest`: step minus their sum):", "",
                  "| system | " + " | ".join(key[6:] for key in keys) + " | rest |",
                  "|---|" + "---|" * (len(keys) + 1)]
        for name, summary in phased.items():
            parts = [summary.get(key, 0.0) for key in keys]
            lines.append(f"| {name} | " + " | ".join(f"{p:.3f}" for p in parts) +
                         f" | {summary['steps'] - sum(parts):.3f} |")
    return lines


def targets(new_tokens: int, summaries: dict) -> list[str]:
    k0, k1 = summaries.get("dedicated 1 rank + 1 engine, K=0"), summaries.get("dedicated 1 rank + 1 engine, K=1")
    local, trl = summaries.get("odpo_vllm in process, K=0"), summaries.get("TRL best (gradient_checkpointing=False)")
    lines = []
    if k1:
        ratio = k1["steps"] / k1["limit"]
        lines.append(f"- {new_tokens} tokens: K=1 step / overlap limit = {ratio:.2f} (target <= 1.15): "
                     f"{'met' if ratio <= 1.15 else 'NOT met'}")
    if k0 and k1:
        speedup = k1["samples_per_s"] / k0["samples_per_s"]
        balance = k0["sample_score"] / k0["train_sync"]
        lines.append(f"- {new_tokens} tokens: K=1 / K=0 samples/s = {speedup:.2f}x at sample/learn balance "
                     f"{balance:.2f} (target >= 1.6x where they cost about the same)")
    for mine, mine_label in ((k1, "dedicated K=1"), (summaries.get("dedicated, K=1, rank with 2 threads"),
                                                     "dedicated K=1 (2-thread rank)")):
        for other, label in ((local, "in process K=0"), (trl, "TRL best")):
            if mine and other:
                ratio = mine["samples_per_s"] / other["samples_per_s"]
                verdict = "faster" if ratio > 1.02 else "NOT faster" if ratio < 0.98 else "about equal"
                lines.append(f"- {new_tokens} tokens: {mine_label} / {label} = {ratio:.2f}x ({verdict})")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/async_cpu.md")
    parser.add_argument("--new_tokens", default="32,96", help="comma-separated completion lengths, one table each")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    parser.add_argument("--size", default="large", help="tiny or large (21M, as bench_vs_trl.py)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps, 16 tokens")
    parser.add_argument("--timeout_s", type=int, default=900)
    parser.add_argument("--systems", default=",".join(SHORT), help=f"some of: {', '.join(SHORT)}")
    options = parser.parse_args()
    chosen = [name.strip() for name in options.systems.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SHORT]
    if unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {', '.join(SHORT)}")
    systems = {SHORT[name]: SYSTEMS[SHORT[name]] for name in chosen}
    if options.quick:
        options.size, options.steps, options.warmup, options.new_tokens = "tiny", 4, 1, "16"
    import bench_vs_trl as vs

    sys.path.insert(0, ROOT)
    from odpo_vllm import toy

    root = tempfile.mkdtemp(prefix="odpo_bench_async_")
    log_dir = os.path.join(root, "runs")
    os.makedirs(log_dir)
    spec = vs.SIZES[options.size]
    path = toy.build_model(os.path.join(root, "model"), hidden_size=spec["hidden_size"], layers=spec["layers"],
                           heads=spec["heads"], max_position_embeddings=512)
    label = f"{vs.params_m(path):.2f}M params (hidden {spec['hidden_size']}, {spec['layers']} layers)"
    print(f"model {label}; logs under {root}", flush=True)
    started = time.perf_counter()
    sections, target_lines, raw = [], [], {}
    for new_tokens in [int(n) for n in options.new_tokens.split(",")]:
        runs: dict = {name: [] for name in systems}
        errors: dict = {}
        for r in range(options.rounds):
            for name, (system, extra) in systems.items():
                index = list(SYSTEMS).index(name)
                settings = dict(extra)
                overrides = {"gradient_checkpointing": False}
                if "threads" in settings:
                    overrides["ray_threads_per_actor"] = settings.pop("threads")
                cfg = dict(system=system, size=f"t{new_tokens}-s{index}", round=r, model_path=path,
                           prompts=options.prompts, new_tokens=new_tokens, steps=options.steps, max_length=512,
                           learning_rate=1e-5, seed=0, ranks=1, cpus_per_actor=1, overrides=overrides, **settings)
                result = vs.launch(cfg, log_dir, options.timeout_s)
                runs[name].append(result)
                if result.get("ok"):
                    step = median(result["steps"][options.warmup:] or result["steps"])
                    print(f"[{time.perf_counter() - started:5.0f}s] {new_tokens} tokens, {name}: step {step:.3f}s",
                          flush=True)
                else:
                    errors[name] = result["error"]
                    print(f"[{time.perf_counter() - started:5.0f}s] {name}: did not run: {result['error']}", flush=True)
        summaries = {name: summarize(runs[name], options.warmup, options.prompts) for name in systems}
        sections += table(new_tokens, summaries, errors) + [""]
        target_lines += targets(new_tokens, summaries)
        raw[new_tokens] = {name: [{k: v for k, v in r.items() if k != "traceback"} for r in rs]
                           for name, rs in runs.items()}

    import torch
    import vllm

    lines = [f"# Asynchronous pipeline on CPU ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, fp32, "
             f"torch {torch.__version__}, vllm {vllm.__version__})", "",
             f"`python benchmarks/bench_async.py{' --quick' if options.quick else ''}`: {label}, "
             f"{options.prompts} prompts x 2 completions per step, {options.steps} steps per run, the first "
             f"{options.warmup} left out, {options.rounds} round(s); medians over the measured steps. Dedicated: "
             "1 learner rank + 1 engine actor, 1 CPU each. Gradient checkpointing off everywhere. "
             f"Total wall time {time.perf_counter() - started:.0f} s.", ""]
    lines += sections + ["Targets:", ""] + target_lines
    text = "\n".join(lines) + "\n"
    print(text)
    out = options.out or (os.path.join(root, "async_quick.md") if options.quick else
                          os.path.join(HERE, "results", "async_cpu.md"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(raw, f, indent=1, default=str)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
