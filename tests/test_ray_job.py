"""`ray job submit` against a Ray head started on 127.0.0.1: a short dedicated-placement run goes
to completion and its exit status comes back; a job with a bad flag comes back as a failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from odpo_vllm import toy

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    # Ray 2.60 heads default to token auth while the CLI reads RAY_AUTH_MODE: one mode for both.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", GLOO_SOCKET_IFNAME="lo",
               OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in a child process: terminating it stops the whole head, and
    nothing else of the user's Ray processes on the machine (unlike `ray stop`)."""
    temp_dir = tempfile.mkdtemp(prefix="odpo_rayjob_")  # short: Ray's socket paths are length-limited
    dashboard = free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=2", f"--object-store-memory={256 << 20}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    try:
        while True:  # the job server answers once the dashboard is up
            probe = subprocess.run(["ray", "job", "list", "--address", address], env=ray_env(),
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head at {address} did not come up within 180s: {probe.stderr[-2000:]}")
            time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, flags: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "job", "submit", "--address", address, "--", "python", "-m", "odpo_vllm.train",
                           *flags], env=ray_env(), capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_trains_and_returns_exit_status(ray_head, model_path, tmp_path):
    prompts = toy.write_prompts(str(tmp_path / "prompts.jsonl"), n=32)
    out = tmp_path / "job"
    flags = ["--model_name_or_path", str(model_path), "--dataset_name", prompts,
             "--reward_funcs", "odpo_vllm.toy:sentiment_reward", "--output_dir", str(out),
             "--placement", "dedicated", "--ray_learner_ranks", "2", "--ray_cpus_per_actor", "0.5",
             "--ray_timeout_s", "300", "--max_steps", "3", "--per_device_train_batch_size", "2",
             "--gradient_accumulation_steps", "1", "--max_new_tokens", "8", "--learning_rate", "1e-2",
             "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]
    done = submit(ray_head, flags)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout.lower()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["sync/logprob_gap"] < 1e-4 for r in steps)  # the job's engine served the learners' weights
    assert (out / "model.safetensors").exists()

    # a bad value fails in the job's driver before any actor starts, and the CLI reports it
    failed = submit(ray_head, flags + ["--loss_type", "hinge"], timeout=300)
    assert failed.returncode != 0
    assert "OnlineDPOConfig.loss_type" in failed.stdout + failed.stderr
