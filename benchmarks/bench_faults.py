"""What each fault costs, measured with real processes killed (CPU, the demo's tiny model).

    python benchmarks/bench_faults.py [--out benchmarks/results/faults_cpu.md] [--steps 16]

Rows (each a fresh `python -m odpo_vllm.train` on the dedicated placement, its own Ray cluster,
1 learner rank + `engines` vLLM engines at 0.5 CPU each, async_steps=1, 8 prompts x 2 x 8 tokens a step):
- engine SIGKILL at step 5: `faults/seconds_lost` (replacing it: start, sync, probe), the run's
  extra wall-clock time against the same run without the fault (detection and the lost batch's
  resampling included), and whether the final weights equal the clean run's;
- learner rank SIGKILL at step 5: seconds from the kill to the driver's exit, and its status;
- driver SIGKILL at step 5: seconds until no process of the run's cluster is left (the watchdog),
  against Ray's own agents without it (measured before the watchdog existed: still alive 42 s
  after the kill, gone by 87 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def command(model, prompts, out, steps, engines, *extra) -> list[str]:
    return [sys.executable, "-m", "odpo_vllm.train", "--placement", "dedicated", "--ray_learner_ranks", "1",
            "--ray_num_engines", str(engines), "--ray_cpus_per_actor", "0.5", "--ray_num_cpus", "2",
            "--model_name_or_path", str(model), "--dataset_name", str(prompts),
            "--reward_funcs", "odpo_vllm.toy:sentiment_reward", "--output_dir", str(out), "--max_steps", str(steps),
            "--per_device_train_batch_size", "8", "--max_new_tokens", "8", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--async_steps", "1", "--gradient_checkpointing", "false", "--plot_at_end", "false",
            "--ray_timeout_s", "120", *extra]


def processes_of(ray_tmp: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if ray_tmp.encode() in text:
            found.append(int(pid))
    return found


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(driver, out: Path, step: int) -> None:
    while max((r["step"] for r in rows(out) if "loss" in r), default=0) < step:
        if driver.poll() is not None:
            raise RuntimeError(f"the run ended before step {step}: {driver.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)


def start(model, prompts, out, steps, engines, ray_tmp):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    return subprocess.Popen(command(model, prompts, out, steps, engines), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def pid_of(ray_tmp: str, title: bytes) -> int:
    for pid in processes_of(ray_tmp):
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
            return pid
    raise RuntimeError(f"no {title!r} process")


def runtime(out: Path) -> float:
    return next(r["train_runtime"] for r in rows(out) if "train_runtime" in r)


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max((x[n] - y[n]).abs().max().item() for n in x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults_cpu.md"))
    parser.add_argument("--steps", type=int, default=16)
    cli = parser.parse_args()
    from odpo_vllm import toy

    tmp = Path(tempfile.mkdtemp(prefix="bench_faults_"))
    model = toy.build_model(tmp / "policy")
    prompts = toy.write_prompts(tmp / "prompts.jsonl", n=64)
    table = []

    for engines in (1, 2):
        ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
        clean = tmp / f"clean{engines}"
        driver = start(model, prompts, clean, cli.steps, engines, ray_tmp)
        assert driver.wait() == 0, driver.stderr.read().decode()[-2000:]
        faulty = tmp / f"faulty{engines}"
        driver = start(model, prompts, faulty, cli.steps, engines, ray_tmp)
        wait_for_step(driver, faulty, 5)
        victims = [pid for pid in processes_of(ray_tmp)
                   if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::VLLMGenerator")]
        os.kill(victims[-1], signal.SIGKILL)
        status = driver.wait()
        assert status == 0, driver.stderr.read().decode()[-2000:]
        last = [r for r in rows(faulty) if "loss" in r][-1]
        table.append((f"engine SIGKILL at step 5, {engines} engine(s)",
                      f"faults/seconds_lost {last['faults/seconds_lost']:.1f} s; run {runtime(faulty):.1f} s vs "
                      f"{runtime(clean):.1f} s clean (+{runtime(faulty) - runtime(clean):.1f} s); "
                      f"restarts {last['faults/engine_restarts']:.0f}; final weights vs clean: max abs difference "
                      f"{max_weight_diff(clean, faulty):.1e}"))
        print(table[-1], flush=True)

    def started_run(name: str):
        """A run of its own cluster that has logged step 5: (driver, its Ray folder)."""
        ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
        driver = start(model, prompts, tmp / name, cli.steps, 1, ray_tmp)
        wait_for_step(driver, tmp / name, 5)
        return driver, ray_tmp

    driver, ray_tmp = started_run("rank")
    os.kill(pid_of(ray_tmp, b"ray::RankActor"), signal.SIGKILL)
    killed = time.time()
    status = driver.wait()
    stopped = time.time() - killed
    stderr = driver.stderr.read().decode()
    named = "learner-rank0 died" in stderr
    while processes_of(ray_tmp):
        time.sleep(0.1)
    table.append(("learner rank SIGKILL at step 5",
                  f"driver exited {stopped:.1f} s after the kill (status {status}, error names the rank: {named}); "
                  f"no process left {time.time() - killed:.1f} s after the kill"))
    print(table[-1], flush=True)

    driver, ray_tmp = started_run("driver")
    driver.kill()
    killed = time.time()
    driver.wait()
    while processes_of(ray_tmp) and time.time() - killed < 180:
        time.sleep(0.1)
    table.append(("driver SIGKILL at step 5",
                  f"no process of its cluster left {time.time() - killed:.1f} s after the kill "
                  f"({len(processes_of(ray_tmp))} left)"))
    print(table[-1], flush=True)

    lines = ["# Faults on the dedicated placement (CPU, 2 cores)", "",
             f"`python benchmarks/bench_faults.py` ({cli.steps} steps, async_steps=1, 8 prompts x 2 x 8 tokens a step, "
             "the demo's tiny model, ray_cpus_per_actor=0.5).", "", "| fault | what it cost |", "|---|---|"]
    lines += [f"| {fault} | {cost} |" for fault, cost in table]
    Path(cli.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
