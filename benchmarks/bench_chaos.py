"""Faults at random moments in one long run, real processes killed, stopped and preempted.

    python benchmarks/bench_chaos.py [--steps 40] [--faults 6] [--seed 0] [--out benchmarks/results/chaos_cpu.md]

Each row is one `python -m odpo_vllm.train` run on the dedicated placement (its own Ray cluster:
1 learner rank, 2 vLLM engines, a reward worker with a reward model, async_steps=1, the demo's tiny
model), started in a session of its own as a scheduler would. A fault-free run gives the reference
weights and wall-clock time. A chaos run draws, from `--seed`, the steps at which faults come and a
delay into that step, and cycles through four kinds:

- engine SIGKILL (one of the engines, drawn);
- engine SIGSTOP (alive and silent: found by a timeout, `--ray_timeout_s 30` here);
- reward-worker SIGKILL;
- SIGTERM to the run's process group, then `--resume_from_checkpoint auto` (a preemption).

The "loaded" row repeats the chaos run with a busy loop on every core. The table: faults injected,
whether the run finished, seconds lost against the fault-free run, `faults/*` as logged, and the
largest difference of the final weights from the fault-free run's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("engine SIGKILL", "engine SIGSTOP", "reward worker SIGKILL", "SIGTERM + resume")


def command(model, reward, prompts, out, steps, *extra) -> list[str]:
    return [sys.executable, "-m", "odpo_vllm.train", "--placement", "dedicated", "--ray_learner_ranks", "1",
            "--ray_num_engines", "2", "--ray_cpus_per_actor", "0.5", "--ray_num_cpus", "2",
            "--model_name_or_path", str(model), "--reward_model_path", str(reward), "--dataset_name", str(prompts),
            "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "8",
            "--max_new_tokens", "8", "--learning_rate", "3e-3", "--logging_steps", "1", "--save_strategy", "steps",
            "--save_steps", "5", "--report_to", "none", "--seed", "0", "--async_steps", "1",
            "--gradient_checkpointing", "false", "--plot_at_end", "false", "--ray_timeout_s", "30",
            "--ray_max_engine_restarts", "10", *extra]


def logged(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row being written
            pass
    return rows


def last_step(out: Path) -> int:
    return max((row["step"] for row in logged(out) if "loss" in row), default=0)


def actor_pids(ray_tmp: str, actor: str) -> list[int]:
    """Pids of the run's processes of Ray actor class `actor` (their command line starts `ray::<actor>`)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(f"ray::{actor}".encode()) and ray_tmp.encode() in environ:
            found.append(int(pid))
    return found


def final_weights(out: Path):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def run(model, reward, prompts, out: Path, steps: int, schedule: list[tuple[int, float, str]], seed: int) -> dict:
    """One run with the faults of `schedule` ((step, delay_s, kind) each); its figures."""
    rng = random.Random(seed)
    ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start, injected, resumes, pending = time.time(), [], 0, list(schedule)
    totals: dict[str, float] = {}  # faults/* summed over the attempts (each process counts its own)
    replaced = {"engines": 0, "reward workers": 0}  # from the console's warnings: a restart after the last
    # logged row of an attempt (a preemption right after a fault) is in no row's faults/*
    extra: tuple[str, ...] = ()
    while True:
        log = tempfile.TemporaryFile()  # not a pipe: a run's console output may outgrow a pipe's buffer
        driver = subprocess.Popen(command(model, reward, prompts, out, steps, *extra), env=env,
                                  stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        preempted = False
        while driver.poll() is None:
            time.sleep(0.2)
            if not pending or last_step(out) < pending[0][0]:
                continue
            step, delay, kind = pending.pop(0)
            time.sleep(delay)
            if driver.poll() is not None:
                break
            if kind == "SIGTERM + resume" and last_step(out) >= steps - 1:
                continue  # the run is ending: a signal now would land after training, not within it
            if kind == "SIGTERM + resume":
                os.killpg(driver.pid, signal.SIGTERM)
                preempted = True
            else:
                actor = "RewardWorker" if kind.startswith("reward") else "VLLMGenerator"
                pids = actor_pids(ray_tmp, actor)
                if not pids:
                    continue
                os.kill(rng.choice(pids), signal.SIGKILL if kind.endswith("SIGKILL") else signal.SIGSTOP)
            injected.append((step, kind))
        log.seek(0)
        stderr = log.read().decode(errors="replace")
        log.close()
        replaced["engines"] += stderr.count(": starting a replacement (")
        replaced["reward workers"] += stderr.count(": starting a replacement for reward-worker")
        attempt = [row for row in logged(out) if "loss" in row]
        for key, value in (attempt[-1] if attempt else {}).items():
            if key.startswith("faults/"):
                totals[key] = totals.get(key, 0.0) + value
        if preempted and driver.returncode == 128 + signal.SIGTERM:
            resumes += 1
            extra = ("--resume_from_checkpoint", "auto")
            continue
        break
    metrics = [row for row in logged(out) if "loss" in row]
    faults = totals
    return {"returncode": driver.returncode, "seconds": time.time() - start, "injected": injected, "replaced": replaced,
            "resumes": resumes, "faults": faults, "steps": [row["step"] for row in metrics],
            "error": "" if driver.returncode == 0 else stderr[-600:]}


def busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--faults", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chaos_cpu.md"))
    parser.add_argument("--no-loaded", action="store_true", help="skip the run with busy loops on every core")
    options = parser.parse_args()

    from odpo_vllm import toy

    work = Path(tempfile.mkdtemp(prefix="odpo_chaos_"))
    model, reward = toy.build_model(work / "policy"), toy.build_model(work / "reward", seed=1, reward_model=True)
    prompts = toy.write_prompts(work / "prompts.jsonl", n=64)

    rng = random.Random(options.seed)
    fault_steps = sorted(rng.sample(range(2, options.steps - 6), options.faults))
    schedule = [(step, round(rng.uniform(0.0, 1.5), 2), KINDS[i % len(KINDS)]) for i, step in enumerate(fault_steps)]
    print("schedule (step, delay into it, kind):", schedule, flush=True)

    clean = run(model, reward, prompts, work / "clean", options.steps, [], options.seed)
    assert clean["returncode"] == 0, clean["error"]
    reference = final_weights(work / "clean")
    results = [("fault-free", clean, 0.0)]
    cases = [("chaos", work / "chaos", False)] + ([] if options.no_loaded else [("chaos, cores loaded", work / "loaded", True)])
    for label, out, loaded in cases:
        busy = busy_loops(os.cpu_count() or 1) if loaded else []
        try:
            result = run(model, reward, prompts, out, options.steps, schedule, options.seed)
        finally:
            for process in busy:
                process.kill()
        diff = float("nan")
        if result["returncode"] == 0:
            weights = final_weights(out)
            diff = max((weights[name] - reference[name]).abs().max().item() for name in reference)
        results.append((label, result, diff))
        print(label, json.dumps(result), "max |w - w_clean|", diff, flush=True)

    lines = [f"# Chaos: faults at random moments (seed {options.seed}, {options.steps} steps)", "",
             "`python benchmarks/bench_chaos.py` on a 2-core CPU machine (other work on the cores), dedicated "
             "placement: 1 learner rank, 2 vLLM engines, a reward worker, async_steps=1, the demo's tiny model, "
             "ray_timeout_s 30, a checkpoint every 5 steps.", "",
             "Schedule (step, seconds into it, fault): " + ", ".join(f"({s}, {d}, {k})" for s, d, k in schedule), "",
             "| run | faults injected | finished | steps logged once each | wall s | lost s vs fault-free | "
             "engines replaced | reward workers replaced | faults/seconds_lost (logged) | resumes | "
             "max abs weight diff vs fault-free |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, result, diff in results:
        faults = result["faults"]
        steps_ok = result["steps"] == list(range(1, options.steps + 1))
        lines.append(f"| {label} | {len(result['injected'])} | {'yes' if result['returncode'] == 0 else 'no'} | "
                     f"{'yes' if steps_ok else 'no'} | {result['seconds']:.0f} | "
                     f"{result['seconds'] - clean['seconds']:.0f} | {result['replaced']['engines']} | "
                     f"{result['replaced']['reward workers']} | {faults.get('faults/seconds_lost', 0):.1f} | "
                     f"{result['resumes']} | {diff:.2g} |")
    for label, result, _ in results[1:]:
        if result["error"]:
            lines += ["", f"{label}: exited {result['returncode']}: `{result['error'][-400:]}`"]
    Path(options.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
