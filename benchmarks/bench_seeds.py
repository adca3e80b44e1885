"""Learning per sample across seeds: TRL's OnlineDPOTrainer and odpo_vllm side by side on one task.

The task (our own, built here, no download): a random-init Qwen2-shaped model (hidden 64, 2 layers)
with the toy byte-level BPE tokenizer (320 tokens) and an embedding padded to 384 rows, so that 64
ids exist that the tokenizer cannot decode (as in most real checkpoints, whose embedding is padded
past the tokenizer); plain "Review the film:" prompts; the reward is `odpo_vllm.toy.sentiment_reward`
on the decoded completion. Every system gets the same model folder, the same prompts in the same
order (TRL reads them sequentially in odpo_vllm's order), the same reward and the same settings:
8 prompts x 2 completions per step, learning rate 5e-3 (linear decay, TRL's default schedule),
temperature 1.0, beta 0.1, up to 24 new tokens, gradient checkpointing off. Only the seed changes
between the runs of one system.

The figure per run is the mean of `objective/scores` (the reward of the sampled completions) over
the last fifth of the steps; the table gives its mean and worst over the seeds for each system,
and the share of completions that ended with EOS over the same steps (the drift seen in issue 19
was towards ending early). Every run is a fresh process (`worker_launch.run_worker`); every number
is in the .json beside the markdown.

    python benchmarks/bench_seeds.py                       # 5 seeds x (TRL, ours K=0/1/2), 120 steps
    python benchmarks/bench_seeds.py --seeds 0,1 --steps 30 --systems trl,ours-k0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from worker_launch import WORKER_ENV, run_worker, write_worker_result  # this folder is the script's

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = {**WORKER_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB: without it vLLM asks for most of the RAM
SETTINGS = dict(per_device_train_batch_size=8, learning_rate=5e-3, temperature=1.0, beta=0.1, max_new_tokens=24)
MAX_LENGTH = 256
VOCAB_ROWS = 384  # embedding rows; the tokenizer has 320
PROMPTS = 256
SYSTEMS = {
    "trl": "TRL 1.16 OnlineDPOTrainer (transformers generate)",
    "ours-k0": "odpo_vllm in process, vLLM engine, async_steps=0",
    "ours-k1": "odpo_vllm in process, vLLM engine, async_steps=1",
    "ours-k2": "odpo_vllm in process, vLLM engine, async_steps=2",
    "ours-hf": "odpo_vllm in process, transformers sampler, async_steps=0",
}
LOGGED = ("objective/scores", "val/contain_eos_token", "objective/entropy", "objective/kl", "loss")


# ============================================================================================
# Worker side: one training run, one process
# ============================================================================================
def _rows_of(log_rows: list[dict]) -> dict[str, list[float]]:
    return {key: [float(row[key]) for row in log_rows if key in row] for key in LOGGED}


def run_ours(cfg: dict) -> dict:
    import odpo_vllm  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch, as for any user)
    from odpo_vllm import OnlineDPOConfig, OnlineDPOTrainer, toy

    args = OnlineDPOConfig(
        **SETTINGS, seed=cfg["seed"], max_steps=cfg["steps"], output_dir=cfg["output_dir"], max_length=MAX_LENGTH,
        use_vllm=cfg["use_vllm"], async_steps=cfg["async_steps"], gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, plot_at_end=False)
    trainer = OnlineDPOTrainer(model=cfg["model_path"], reward_funcs=toy.sentiment_reward, args=args,
                               train_dataset=toy.prompt_dataset(PROMPTS))
    with trainer:
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"logged": _rows_of(rows), "train_s": train_s}


def run_trl(cfg: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from odpo_vllm import toy

    rows = toy.prompts(PROMPTS)
    ordered = [rows[i] for i in cfg["order"]]  # the batches odpo_vllm draws, flattened
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    args = OnlineDPOConfig(
        **SETTINGS, seed=cfg["seed"], max_steps=cfg["steps"], output_dir=cfg["output_dir"], max_length=MAX_LENGTH,
        gradient_accumulation_steps=1, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        gradient_checkpointing=False, bf16=False, use_cpu=True, train_sampling_strategy="sequential",
        dataloader_num_workers=0)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=toy.sentiment_reward, args=args, processing_class=tokenizer,
                               train_dataset=Dataset.from_list(ordered))
    start = time.perf_counter()
    trainer.train()
    return {"logged": _rows_of(trainer.state.log_history), "train_s": time.perf_counter() - start}


def worker_main(cfg: dict) -> None:
    write_worker_result(run_trl if cfg["system"] == "trl" else run_ours, cfg)


# ============================================================================================
# Driver side
# ============================================================================================
def build_task(folder: str) -> str:
    from odpo_vllm import toy

    return toy.build_model(os.path.join(folder, "model"), seed=0, vocab_size=VOCAB_ROWS)


def our_order(seed: int, steps: int) -> list[int]:
    """The prompt rows of every step, flattened, as odpo_vllm's trainer draws them with `seed`."""
    from odpo_vllm.data import PromptBatches

    batches = PromptBatches(list(range(PROMPTS)), SETTINGS["per_device_train_batch_size"], seed)
    return [row for _ in range(steps) for row in batches.next()[0]]


def launch(system: str, seed: int, args, model_path: str, run_dir: str) -> dict:
    name = f"{system}_s{seed}"
    result_path = os.path.join(run_dir, name + ".json")
    if os.path.exists(result_path):  # a finished run is reused, so a stopped benchmark goes on where it was
        with open(result_path) as f:
            result = json.load(f)
        if result.get("ok") and result.get("steps") == args.steps:
            return dict(result, reused=True)
    cfg = {"system": system, "seed": seed, "steps": args.steps, "model_path": model_path, "result": result_path,
           "output_dir": os.path.join(run_dir, name), "use_vllm": system != "ours-hf",
           "async_steps": int(system[-1]) if system.startswith("ours-k") else 0}
    if system == "trl":
        cfg["order"] = our_order(seed, args.steps)
    env = {**os.environ, **ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = run_worker(__file__, cfg, os.path.join(run_dir, name + ".log"), env, ROOT, args.timeout_s)
    result["steps"] = args.steps
    with open(result_path, "w") as f:
        json.dump(result, f)
    return result


def last_fifth(values: list[float]) -> float:
    tail = values[len(values) - max(1, len(values) // 5):]
    return statistics.fmean(tail) if tail else float("nan")


def report(data: dict) -> list[str]:
    meta = data["meta"]
    lines = [
        f"# Learning across seeds: odpo_vllm vs TRL {meta['trl']} on one task ({meta['date']}, {meta['cpus']} CPUs)", "",
        f"`{meta['command']}`: {len(meta['seeds'])} seeds x {meta['steps']} steps per system; "
        f"total wall time {meta['total_s']:.0f} s. The task and settings are in the script's docstring: a "
        f"random-init 0.1M Qwen2 with {VOCAB_ROWS} embedding rows for a 320-token BPE, the toy sentiment reward, "
        f"{SETTINGS['per_device_train_batch_size']} prompts x 2 completions per step, lr {SETTINGS['learning_rate']}, "
        f"temperature {SETTINGS['temperature']}, beta {SETTINGS['beta']}, up to {SETTINGS['max_new_tokens']} new tokens. "
        "Reward = mean `objective/scores` over the last fifth of the steps; EOS = the share of completions that "
        "ended with EOS over the same steps.", "",
        "| system | mean reward | worst seed | best seed | per seed | EOS share (mean) | train s per run (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for system in meta["systems"]:
        runs = [data["runs"].get(f"{system}_s{seed}") for seed in meta["seeds"]]
        done = [r for r in runs if r and r.get("ok")]
        if not done:
            errors = "; ".join(sorted({r.get("error", "?") for r in runs if r})) or "not run"
            lines.append(f"| {SYSTEMS[system]} | did not run: {errors} | | | | | |")
            continue
        rewards = [last_fifth(r["logged"]["objective/scores"]) for r in done]
        eos = [last_fifth(r["logged"]["val/contain_eos_token"]) for r in done]
        per_seed = " / ".join(f"{last_fifth(r['logged']['objective/scores']):.3f}" if r and r.get("ok") else "failed"
                              for r in runs)
        lines.append(f"| {SYSTEMS[system]} | {statistics.fmean(rewards):.3f} | {min(rewards):.3f} | "
                     f"{max(rewards):.3f} | {per_seed} | {statistics.fmean(eos):.2f} | "
                     f"{statistics.median(r['train_s'] for r in done):.0f} |")
    lines += ["", f"Seeds: {', '.join(map(str, meta['seeds']))}."]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--systems", default="trl,ours-k0,ours-k1,ours-k2", help=f"from: {', '.join(SYSTEMS)}")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/seeds_cpu.md, "
                                                    "or one in the run folder for fewer than 120 steps or 5 seeds)")
    parser.add_argument("--run_dir", default=None, help="runs and logs (default: a new temp folder); "
                                                        "finished runs found there are reused")
    parser.add_argument("--timeout_s", type=int, default=1800, help="per run")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="odpo_bench_seeds_")
    os.makedirs(run_dir, exist_ok=True)
    full = args.steps >= 120 and len(seeds) >= 5
    out = args.out or (os.path.join(HERE, "results", "seeds_cpu.md") if full else os.path.join(run_dir, "seeds.md"))
    import torch
    import trl

    started = time.perf_counter()
    model_path = build_task(run_dir)
    print(f"runs and logs under {run_dir}; results to {out} (+ .json)", flush=True)
    data = {"meta": {"command": "python benchmarks/bench_seeds.py " + " ".join(sys.argv[1:]), "seeds": seeds,
                     "steps": args.steps, "systems": systems, "settings": SETTINGS, "vocab_rows": VOCAB_ROWS,
                     "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch": torch.__version__,
                     "trl": trl.__version__}, "runs": {}}
    for seed in seeds:  # seeds outermost: a stopped run still compares the systems on the seeds it finished
        for system in systems:
            result = launch(system, seed, args, model_path, run_dir)
            data["runs"][f"{system}_s{seed}"] = result
            state = (f"last-fifth reward {last_fifth(result['logged']['objective/scores']):.3f}, EOS "
                     f"{last_fifth(result['logged']['val/contain_eos_token']):.2f}" if result.get("ok")
                     else f"failed: {result.get('error')}")
            print(f"[{time.perf_counter() - started:6.0f}s] {system} seed {seed}: {state}"
                  f"{' (reused)' if result.get('reused') else ''}", flush=True)
            data["meta"]["total_s"] = time.perf_counter() - started
            with open(os.path.splitext(out)[0] + ".json", "w") as f:
                json.dump(data, f)
            with open(out, "w") as f:
                f.write("\n".join(report(data)) + "\n")
    print("\n".join(report(data)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        main()
