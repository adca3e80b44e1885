"""`ray job submit` against a Ray head started on 127.0.0.1: a short dedicated-placement run goes
to completion and its exit status comes back; a job with a bad flag comes back as a failure."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ray_job_submit
from odpo_vllm import toy

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]


def submit(address: str, flags: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return ray_job_submit(address, [], ["python", "-m", "odpo_vllm.train", *flags], timeout)


def test_ray_job_submit_trains_and_returns_exit_status(ray_head, model_path, tmp_path):
    prompts = toy.write_prompts(str(tmp_path / "prompts.jsonl"), n=32)
    out = tmp_path / "job"
    flags = ["--model_name_or_path", str(model_path), "--dataset_name", prompts,
             "--reward_funcs", "odpo_vllm.toy:sentiment_reward", "--output_dir", str(out),
             "--placement", "dedicated", "--ray_learner_ranks", "2", "--ray_cpus_per_actor", "0.5",
             "--ray_timeout_s", "300", "--max_steps", "3", "--per_device_train_batch_size", "2",
             "--gradient_accumulation_steps", "1", "--max_new_tokens", "8", "--learning_rate", "1e-2",
             "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
    done = submit(ray_head.dashboard, flags)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout.lower()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["sync/logprob_gap"] < 1e-4 for r in steps)  # the job's engine served the learners' weights
    assert (out / "model.safetensors").exists()

    # a bad value fails in the job's driver before any actor starts, and the CLI reports it
    failed = submit(ray_head.dashboard, flags + ["--loss_type", "hinge"], timeout=300)
    assert failed.returncode != 0
    assert "OnlineDPOConfig.loss_type" in failed.stdout + failed.stderr
