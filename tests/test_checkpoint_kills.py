"""A run SIGKILLed while it writes a checkpoint, at several points of the save (real processes, the
command line, in process): every `checkpoint-*` folder left behind is complete and resumes, and
`--resume_from_checkpoint auto` ends with the weights of the run that was never killed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from odpo_vllm import toy
from odpo_vllm.run import checkpoint

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]

# Runs the command line with the save's own calls wrapped: at the chosen point of the save of
# checkpoint-3 the process SIGKILLs itself (exactly there, unlike a kill from outside).
KILLING_DRIVER = r"""
import os, shutil, signal, sys, torch
from odpo_vllm import train
point, target = sys.argv[1], "checkpoint-3"
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
save, replace, rmtree = torch.save, os.replace, shutil.rmtree

def saving(obj, f, *args, **kwargs):
    save(obj, f, *args, **kwargs)
    if point.startswith("after:") and str(f).endswith(os.path.join(target + ".incomplete", point[6:])):
        die()

def replacing(src, dst, *args, **kwargs):
    if point == "rename" and str(dst).endswith(target):
        die()
    return replace(src, dst, *args, **kwargs)

def removing(path, *args, **kwargs):
    if point == "rotate" and str(path).endswith(".deleting") and os.path.isdir(path):
        os.remove(os.path.join(path, "trainer_state.json"))  # part of the folder is gone
        die()
    return rmtree(path, *args, **kwargs)

torch.save, os.replace, shutil.rmtree = saving, replacing, removing
train.main(sys.argv[2:])
"""


def command(model_path, prompts, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(model_path), "--dataset_name", str(prompts),
            "--reward_funcs", "odpo_vllm.toy:sentiment_reward", "--output_dir", str(out), "--max_steps", "5",
            "--per_device_train_batch_size", "2", "--max_new_tokens", "8", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2",
            "--async_steps", "1", "--use_vllm", "false", "--report_to", "none", "--seed", "0",
            "--gradient_checkpointing", "false", "--plot_at_end", "false", "--disable_tqdm", "true", *extra]


def env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="module")
def uninterrupted(model_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("kills")
    prompts = toy.write_prompts(base / "prompts.jsonl", n=16)
    done = subprocess.run([sys.executable, "-m", "odpo_vllm.train", *command(model_path, prompts, base / "full")],
                          env=env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return prompts, load_file(base / "full" / "model.safetensors")


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name))


@pytest.mark.parametrize("point", ["after:rollouts.pt", "after:optimizer.pt", "rename", "rotate"])
def test_kill_during_a_save_leaves_only_checkpoints_that_resume(model_path, tmp_path, uninterrupted, point):
    prompts, expected = uninterrupted
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLING_DRIVER, point, *command(model_path, prompts, out)],
                            env=env(), capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]

    # what the kill left: complete checkpoints only (the unfinished one under another name)
    left = checkpoints(out)
    assert left == (["checkpoint-2", "checkpoint-3"] if point == "rotate" else ["checkpoint-1", "checkpoint-2"])
    for name in left:
        checkpoint.verify(str(out / name), (checkpoint.STATE_FILE, checkpoint.RUN_FILE, checkpoint.RNG_FILE,
                                            checkpoint.ROLLOUTS_FILE, "optimizer.pt", "scheduler.pt"))
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint") and p.name not in left)
    assert leftovers == (["checkpoint-1.deleting"] if point == "rotate" else ["checkpoint-3.incomplete"])

    resumed = subprocess.run([sys.executable, "-m", "odpo_vllm.train",
                              *command(model_path, prompts, out, "--resume_from_checkpoint", "auto")],
                             env=env(), capture_output=True, timeout=300)
    stderr = resumed.stderr.decode(errors="replace")
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"skipping {out / leftovers[0]}" in stderr
    assert not (out / leftovers[0]).exists()  # cleaned up by the resumed run's saves
    got = load_file(out / "model.safetensors")
    assert max((got[n] - expected[n]).abs().max().item() for n in expected) <= 1e-6
