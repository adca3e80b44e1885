"""Stops of a real run on the command line (a dedicated Ray run: a vLLM engine actor and a
DeepSpeed rank, async_steps=1, its own Ray cluster):
- SIGTERM to the driver finishes the step, writes a checkpoint at the step reached, stops every
  process of the run and exits 143; `--resume_from_checkpoint auto` then ends with the weights of
  the uninterrupted run;
- SIGKILL of the learner rank stops the run within ray_timeout_s + 30 s, naming the rank, with
  nothing left running; `--resume_from_checkpoint true` continues from the last checkpoint to the
  uninterrupted weights;
- SIGKILL of the driver: the watchdog removes every process of the run's cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from odpo_vllm import toy

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def command(model_path, prompts, out, *extra) -> list[str]:
    return [sys.executable, "-m", "odpo_vllm.train", "--placement", "dedicated", "--ray_learner_ranks", "1",
            "--ray_cpus_per_actor", "0.5", "--ray_num_cpus", "2", "--model_name_or_path", str(model_path),
            "--dataset_name", str(prompts), "--reward_funcs", "odpo_vllm.toy:sentiment_reward",
            "--output_dir", str(out), "--max_steps", "14", "--per_device_train_batch_size", "4",
            "--max_new_tokens", "8", "--learning_rate", "3e-3", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", "0", "--async_steps", "1", "--gradient_checkpointing", "false",
            "--plot_at_end", "false", "--ray_timeout_s", "120", *extra]


def run_env(ray_tmp: str) -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "RAY_TMPDIR": ray_tmp}


def processes_of(ray_tmp: str) -> list[str]:
    """Processes whose command line or environment names the run's Ray folder."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if ray_tmp.encode() in text:
            found.append(pid)
    return found


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [row["step"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


def wait_for_step(driver, out: Path, step: int) -> None:
    deadline = time.time() + 300
    while max(logged_steps(out), default=0) < step and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert driver.poll() is None, "the run ended before the fault"


def wait_until_gone(ray_tmp: str, within_s: float) -> list[str]:
    deadline = time.time() + within_s
    while processes_of(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    return processes_of(ray_tmp)


def same_weights(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert set(a) == set(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def full_run(model_path, tmp_path_factory):
    """The uninterrupted run (14 steps) every stopped run is compared with."""
    base = tmp_path_factory.mktemp("stops")
    prompts = toy.write_prompts(base / "prompts.jsonl", n=24)
    ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
    full = subprocess.run(command(model_path, prompts, base / "full"), env=run_env(ray_tmp), capture_output=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    return prompts, base / "full"


def test_sigterm_checkpoints_stops_everything_and_resumes_exactly(model_path, tmp_path, full_run):
    prompts, full = full_run
    ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
    env = run_env(ray_tmp)

    out = tmp_path / "preempted"
    driver = subprocess.Popen(command(model_path, prompts, out), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    wait_for_step(driver, out, 3)
    driver.send_signal(signal.SIGTERM)
    sent = time.time()
    _, stderr = driver.communicate(timeout=120)
    stopped_after = time.time() - sent
    stderr = stderr.decode(errors="replace")
    assert driver.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stopped_after < 60
    step = max(logged_steps(out))
    assert 3 <= step < 14
    assert f"stopped by SIGTERM after step {step}" in stderr
    assert (out / f"checkpoint-{step}" / "trainer_state.json").exists()
    time.sleep(2)
    assert processes_of(ray_tmp) == [], "processes of the preempted run are still alive"

    resumed = subprocess.run(command(model_path, prompts, out, "--resume_from_checkpoint", "auto"), env=env,
                             capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out)[-1] == 14
    assert same_weights(full, out) < 1e-5
    trained = load_file(out / "model.safetensors")["model.norm.weight"]
    assert not torch.equal(trained, load_file(Path(model_path) / "model.safetensors")["model.norm.weight"])


def test_killed_learner_rank_stops_the_run_naming_it_and_resume_continues(model_path, tmp_path, full_run):
    prompts, full = full_run
    ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
    env, out = run_env(ray_tmp), tmp_path / "rank_lost"
    saving = ("--save_strategy", "steps", "--save_steps", "3")
    driver = subprocess.Popen(command(model_path, prompts, out, *saving), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    wait_for_step(driver, out, 5)
    ranks = [pid for pid in processes_of(ray_tmp)
             if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RankActor")]
    assert len(ranks) == 1
    os.kill(int(ranks[0]), signal.SIGKILL)
    killed = time.time()
    _, stderr = driver.communicate(timeout=300)
    stopped_after = time.time() - killed
    stderr = stderr.decode(errors="replace")
    assert driver.returncode == 1, stderr[-3000:]
    assert stopped_after < 120 + 30  # ray_timeout_s + 30
    assert "learner group: learner-rank0 died during" in stderr
    assert wait_until_gone(ray_tmp, 10) == [], "processes of the stopped run are still alive"
    complete = [int(p.name.split("-")[1]) for p in out.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name)]
    assert complete and max(complete) >= 3  # (a save the kill interrupted is left as checkpoint-N.incomplete)

    resumed = subprocess.run(command(model_path, prompts, out, *saving, "--resume_from_checkpoint", "true"),
                             env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out)[-1] == 14
    assert same_weights(full, out) < 1e-5


def test_killed_driver_leaves_no_process_of_its_cluster(model_path, tmp_path, full_run):
    prompts, _ = full_run
    ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
    out = tmp_path / "driver_lost"
    driver = subprocess.Popen(command(model_path, prompts, out), env=run_env(ray_tmp), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_for_step(driver, out, 3)
    driver.kill()
    driver.wait()
    # Ray's own agents lingered 45-90 s after their GCS died; the watchdog kills them at once
    assert wait_until_gone(ray_tmp, 15) == [], "processes of the killed driver's cluster are still alive"


@pytest.fixture(scope="module")
def full_sync_run(model_path, full_run):
    """The uninterrupted run with async_steps=0."""
    prompts, full = full_run
    out = full.parent / "full_sync"
    ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
    done = subprocess.run(command(model_path, prompts, out, "--async_steps", "0"), env=run_env(ray_tmp),
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_sigterm_to_the_process_group_with_a_hung_engine_checkpoints_within_the_grace_period(
        model_path, tmp_path, full_run, full_sync_run):
    """A scheduler's SIGTERM goes to the whole process group (`kill -- -PGID`, scancel, systemd),
    here while the engine is stopped (SIGSTOP: alive, silent). The run's own Ray cluster is in a
    session of its own, so only the driver gets the signal; the driver does not wait for the hung
    engine (it pings it for a few seconds, then kills it) and exits 143 with a checkpoint well
    within the grace period. The resumed run ends with the weights of the uninterrupted one."""
    prompts, _ = full_run
    ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
    env, out, grace = run_env(ray_tmp), tmp_path / "hung", 20
    sync = ("--async_steps", "0", "--preemption_grace_s", str(grace))
    driver = subprocess.Popen(command(model_path, prompts, out, *sync), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True)  # its own group, as under a scheduler
    wait_for_step(driver, out, 3)
    engines = [pid for pid in processes_of(ray_tmp)
               if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::VLLMGenerator")]
    assert len(engines) == 1
    os.kill(int(engines[0]), signal.SIGSTOP)
    os.killpg(driver.pid, signal.SIGTERM)
    sent = time.time()
    _, stderr = driver.communicate(timeout=300)
    stopped_after = time.time() - sent
    stderr = stderr.decode(errors="replace")
    assert driver.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    print(f"exited {stopped_after:.1f}s after SIGTERM (grace {grace}s)")
    assert stopped_after < grace + 15, stderr[-3000:]  # + the roles' close and Ray's shutdown on loaded cores
    step = int(re.search(r"stopped by SIGTERM after step (\d+)", stderr).group(1))
    assert 3 <= step < 14
    assert (out / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert "learner-rank0 died" not in stderr
    assert wait_until_gone(ray_tmp, 15) == [], "processes of the preempted run are still alive"

    resumed = subprocess.run(command(model_path, prompts, out, *sync, "--resume_from_checkpoint", "auto"), env=env,
                             capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out) == list(range(1, 15))  # each step once: the log was cut back to the checkpoint
    assert same_weights(full_sync_run, out) < 1e-5
