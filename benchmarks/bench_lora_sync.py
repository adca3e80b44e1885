"""What a LoRA push costs, merged against adapter (`lora_sync`), and what serving an adapter costs
the engine's sampling: SmolLM2-135M-Instruct (the real demo's model and task), a LoRA adapter r 16
on q_proj and v_proj (`--targets all-linear`: every linear layer but the output), the vLLM engine,
8 prompts x 2 completions of up to 40 tokens per step, `--steps` steps per run; in process
(default), or (`--placement dedicated`) one DeepSpeed rank and one vLLM engine actor on a local
2-CPU Ray cluster, one CPU each, `--async_steps` K (the adapter then goes over the odpo_gloo weight
transport). The modes alternate (`--repeats` runs each, merged first) so that a machine's changing
load falls on both alike. Per mode: the median over runs of the per-run medians (steps after the
first) of `sync/bytes`, `sync/seconds` (the push: merge + load, or adapter write +
load), `time/generate` (the engine's sampling) and `time/step`.

    python benchmarks/bench_lora_sync.py [--steps 6] [--repeats 2]
    python benchmarks/bench_lora_sync.py --placement dedicated --async_steps 1
    python benchmarks/bench_lora_sync.py --targets all-linear
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from worker_launch import WORKER_ENV, run_worker, save_results, write_worker_result  # this folder is the script's

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}
KEYS = ("sync/bytes", "sync/seconds", "time/generate", "time/step", "sync/logprob_gap", "sync/sample_logprob_gap")


def run(cfg: dict) -> dict:
    import odpo_vllm  # noqa: F401  (OMP_WAIT_POLICY before torch)
    from datasets import Dataset
    from peft import LoraConfig

    from odpo_vllm import OnlineDPOConfig, OnlineDPOTrainer, real_task
    from odpo_vllm.models.packaged import smollm2

    placement = {} if cfg.get("placement", "in_process") == "in_process" else dict(
        placement=cfg["placement"], ray_learner_ranks=1, ray_num_engines=1, ray_cpus_per_actor=1,
        async_steps=cfg["async_steps"], ray_timeout_s=600)
    args = OnlineDPOConfig(
        output_dir=cfg["output_dir"], per_device_train_batch_size=8, learning_rate=2e-4, lr_scheduler_type="constant",
        max_new_tokens=40, temperature=0.9, beta=0.1, max_steps=cfg["steps"], use_vllm=True,
        lora_sync=cfg["mode"], gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, plot_at_end=False, **placement)
    trainer = OnlineDPOTrainer(model=smollm2(), reward_funcs=real_task.vader_reward, args=args,
                               train_dataset=Dataset.from_list(real_task.train_prompts()),
                               peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                      target_modules=TARGETS[cfg.get("targets", "q,v")]))
    with trainer:
        trainer.train()
    with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"rows": [{k: r[k] for k in KEYS if k in r} for r in rows if "loss" in r]}


def summary(runs: list[dict]) -> dict[str, float]:
    """Median over runs of each run's median over its steps after the first (nan where no step has
    the key: with async_steps >= 1 `sync/sample_logprob_gap` is logged on the first step only)."""
    def median(values):
        values = [v for v in values if v == v]  # a key missing from every step (nan) stays missing
        return statistics.median(values) if values else float("nan")

    per_run = [{k: median(r[k] for r in run["rows"][1:] if k in r) for k in KEYS} for run in runs]
    return {k: median(p[k] for p in per_run) for k in KEYS}


def report(data: dict) -> list[str]:
    meta = data["meta"]
    lines = [f"# LoRA pushes: merged vs adapter, {meta.get('where', 'in process')}, LoRA on "
             f"{meta.get('targets', 'q,v')} ({meta['date']}, {meta['cpus']} CPUs, vLLM {meta['vllm']})", "",
             f"`{meta['command']}`; {meta['wall_s']:.0f} s in all. See the script's docstring for the task and "
             "what each column is; the machine was shared (other benchmarks ran), so seconds are indicative and "
             "the two modes alternated.", "",
             "| lora_sync | runs | sync/bytes | sync/seconds | time/generate | time/step | sync/logprob_gap | "
             "sync/sample_logprob_gap |", "|---|---|---|---|---|---|---|---|"]
    for mode in ("merged", "adapter"):
        runs = [r for r in data["runs"] if r["mode"] == mode and r.get("ok")]
        if not runs:
            continue
        s = summary(runs)
        lines.append(f"| {mode} | {len(runs)} | {s['sync/bytes']:.3g} | {s['sync/seconds']:.3f} | "
                     f"{s['time/generate']:.2f} | {s['time/step']:.2f} | {s['sync/logprob_gap']:.1e} | "
                     f"{s['sync/sample_logprob_gap']:.1e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--placement", choices=["in_process", "dedicated"], default="in_process")
    parser.add_argument("--async_steps", type=int, default=1, help="with --placement dedicated")
    parser.add_argument("--targets", choices=list(TARGETS), default="q,v", help="the LoRA's target modules")
    parser.add_argument("--out", default=None, help="default: results/lora_sync_cpu.md, or "
                                                    "results/lora_sync_cpu_dedicated.md with --placement dedicated "
                                                    "(_all_linear before .md with --targets all-linear)")
    options = parser.parse_args()
    options.out = options.out or os.path.join(HERE, "results", "lora_sync_cpu{}{}.md".format(
        "" if options.placement == "in_process" else "_dedicated", "" if options.targets == "q,v" else "_all_linear"))
    import vllm

    folder = tempfile.mkdtemp(prefix="odpo_bench_lora_sync_")
    started = time.perf_counter()
    data = {"meta": {"command": "python benchmarks/bench_lora_sync.py " + " ".join(sys.argv[1:]),
                     "targets": options.targets, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                     "vllm": vllm.__version__,
                     "where": "in process" if options.placement == "in_process" else
                     f"dedicated (1 rank + 1 engine actor), async_steps {options.async_steps}"}, "runs": []}
    env = {**os.environ, **WORKER_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for repeat in range(options.repeats):
        for mode in ("merged", "adapter"):
            name = f"{mode}_{repeat}"
            cfg = {"mode": mode, "steps": options.steps, "output_dir": os.path.join(folder, name), "result":
                   os.path.join(folder, name + ".json"), "placement": options.placement,
                   "async_steps": options.async_steps, "targets": options.targets}
            result = run_worker(__file__, cfg, os.path.join(folder, name + ".log"), env, ROOT, 1800)
            data["runs"].append(dict(result, mode=mode))
            print(f"[{time.perf_counter() - started:5.0f}s] {name}: {'ok' if result.get('ok') else result.get('error')}",
                  flush=True)
            data["meta"]["wall_s"] = time.perf_counter() - started
            save_results(options.out, data, report(data))
    print("\n".join(report(data)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        write_worker_result(run, json.loads(sys.argv[2]))
    else:
        main()
