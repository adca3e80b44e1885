"""Preemption of a real run: SIGTERM to the driver of a dedicated Ray run (a vLLM engine actor and
a DeepSpeed rank, async_steps=1) finishes the step, writes a checkpoint at the step reached, stops
every process of the run and exits 143; `--resume_from_checkpoint auto` then ends with the weights
of the uninterrupted run."""

from __future__ import annotations

import json
import os
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

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray, pytest.mark.vllm]
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


def test_sigterm_checkpoints_stops_everything_and_resumes_exactly(model_path, tmp_path):
    prompts = toy.write_prompts(tmp_path / "prompts.jsonl", n=24)
    ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")
    env = run_env(ray_tmp)

    full = subprocess.run(command(model_path, prompts, tmp_path / "full"), env=env, capture_output=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "preempted"
    driver = subprocess.Popen(command(model_path, prompts, out), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while max(logged_steps(out), default=0) < 3 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert driver.poll() is None, "the run ended before it could be preempted"
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
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b)
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-5
    assert not torch.equal(a["model.norm.weight"], load_file(Path(model_path) / "model.safetensors")["model.norm.weight"])
