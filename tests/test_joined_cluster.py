"""Relative paths on a cluster the run joins. A Ray worker runs in its raylet's working directory
(where `ray start` ran), not the driver's, so every user-given path is made absolute in the driver
before a role receives it (`validation.resolve_paths`, `validation.absolute_if_local`):
- the resolving functions (fast tier);
- the paths an in-process trainer hands its placement and loads a checkpoint from (fast tier);
- a head started by `ray start` in another folder, a command line run from a third with relative
  model, dataset and output paths: it trains, its checkpoints hold the rank's DeepSpeed files in
  the driver's output_dir, nothing lands in the head's folder, and a run stopped at a checkpoint
  and resumed with `--resume_from_checkpoint auto` ends with the uninterrupted run's weights; a
  `ray job submit --working-dir` job takes the same paths relative to its working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from conftest import make_args, ray_env, ray_head_process, ray_job_submit
from odpo_vllm import toy
from odpo_vllm.validation import absolute_if_local, resolve_paths


# ---------------------------------------------------------------------------------------- fast
def test_absolute_if_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m" / "policy").mkdir(parents=True)
    (tmp_path / "prompts.jsonl").write_text("")
    assert absolute_if_local("m/policy") == str(tmp_path / "m" / "policy")  # local, though it looks like a hub id
    assert absolute_if_local("./m/policy/") == str(tmp_path / "m" / "policy")
    assert absolute_if_local(Path("prompts.jsonl")) == str(tmp_path / "prompts.jsonl")
    assert absolute_if_local(str(tmp_path / "m")) == str(tmp_path / "m")
    assert absolute_if_local("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"  # not here: a hub id, left to the hub
    for other in (None, "", toy.sentiment_reward, 3):
        assert absolute_if_local(other) is other


def test_resolve_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m" / "policy").mkdir(parents=True)
    (tmp_path / "m" / "reward").mkdir()
    args = SimpleNamespace(output_dir="runs/out", reward_model_path="m/reward")
    model, ref_model, funcs = resolve_paths("m/policy", None, ["m/reward", toy.sentiment_reward, "org/rm"], args)
    assert model == str(tmp_path / "m" / "policy") and ref_model is None
    assert funcs == [str(tmp_path / "m" / "reward"), toy.sentiment_reward, "org/rm"]
    assert args.output_dir == str(tmp_path / "runs" / "out")  # absolute even before it exists
    assert args.reward_model_path == str(tmp_path / "m" / "reward")
    args = SimpleNamespace(output_dir="~/out", reward_model_path=None)
    assert resolve_paths("org/policy", "m/policy", "m/reward", args) == (
        "org/policy", str(tmp_path / "m" / "policy"), str(tmp_path / "m" / "reward"))
    assert args.output_dir == os.path.expanduser("~/out") and args.reward_model_path is None


def test_trainer_hands_its_roles_absolute_paths(model_path, reward_model_path, tmp_path, monkeypatch):
    """What the placement receives (RunSpec) and the checkpoint folder the learner loads from are
    absolute, for relative strings given to the API."""
    from odpo_vllm import OnlineDPOTrainer
    from odpo_vllm.run import checkpoint
    from odpo_vllm.runtime import placement

    models = Path(model_path).parent
    monkeypatch.chdir(models.parent)
    relative = f"{models.name}/{Path(model_path).name}"  # "models0/policy": shaped like a hub id
    specs = []
    build = placement.BUILDERS["in_process"]
    monkeypatch.setitem(placement.BUILDERS, "in_process", lambda spec: specs.append(spec) or build(spec))
    args = make_args(tmp_path, output_dir="out")
    trainer = OnlineDPOTrainer(relative, reward_funcs=[f"{models.name}/{Path(reward_model_path).name}",
                                                       toy.sentiment_reward],
                               args=args, train_dataset=toy.prompt_dataset(8))
    (spec,) = specs
    assert spec.model == str(model_path)
    assert spec.reward_funcs == [str(reward_model_path), toy.sentiment_reward]
    assert args.output_dir == str(models.parent / "out") and os.path.isdir(args.output_dir)

    class Loading(Exception):
        pass

    def load(trainer, directory):
        raise Loading(directory)

    monkeypatch.setattr(checkpoint, "load", load)
    (models.parent / "out" / "checkpoint-1").mkdir()
    with trainer, pytest.raises(Loading) as loading:
        trainer.train(resume_from_checkpoint="out/checkpoint-1")
    assert loading.value.args == (str(models.parent / "out" / "checkpoint-1"),)


# ---------------------------------------------------------------------------------------- a joined cluster
def command(output_dir: str, max_steps: int, *extra: str) -> list[str]:
    """The issue's command line, every path relative to the driver's working directory."""
    return [sys.executable, "-m", "odpo_vllm.train", "--placement", "dedicated", "--ray_learner_ranks", "1",
            "--ray_num_engines", "1", "--ray_cpus_per_actor", "0.5", "--model_name_or_path", "m/policy",
            "--dataset_name", "data/prompts.jsonl", "--reward_funcs", "odpo_vllm.toy:sentiment_reward",
            "--output_dir", output_dir, "--max_steps", str(max_steps), "--save_strategy", "steps",
            "--save_steps", "2", "--per_device_train_batch_size", "2", "--max_new_tokens", "8",
            "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",  # the same steps whatever max_steps
            "--logging_steps", "1", "--report_to", "none", "--seed", "0", "--gradient_checkpointing", "false",
            "--plot_at_end", "false", "--disable_tqdm", "true", "--ray_timeout_s", "180", *extra]


def logged_steps(out: Path) -> list[int]:
    return [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_relative_paths_on_a_cluster_started_elsewhere(tmp_path):
    head_dir, work, job = tmp_path / "head", tmp_path / "work", tmp_path / "job"  # raylet's, driver's, a job's
    head_dir.mkdir()
    toy.build_model(work / "m" / "policy")
    toy.write_prompts(work / "data" / "prompts.jsonl", n=16)
    shutil.copytree(work, job)
    with ray_head_process(cwd=head_dir) as head:
        def run(*flags) -> None:
            done = subprocess.run(command(*flags, "--ray_address", head.address), cwd=work, env=ray_env(),
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        run("full", 4)
        for step in (2, 4):  # the rank wrote its DeepSpeed files into the driver's output_dir
            assert os.listdir(work / "full" / f"checkpoint-{step}" / "deepspeed"), step
        assert logged_steps(work / "full") == [1, 2, 3, 4]
        assert files_under(head_dir) == []  # nothing resolved against the raylet's folder

        run("part", 2)  # stopped at its checkpoint, then resumed from it to the full run's end
        run("part", 4, "--resume_from_checkpoint", "auto")

        # `ray job submit --working-dir`: the same paths, relative to the job's working directory
        submitted = ray_job_submit(head.dashboard, ["--working-dir", str(job)], command("out", 2))
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        (copy,) = Path(head.temp_dir).glob("session_[0-9]*/runtime_resources/working_dir_files/*/out")
        assert os.listdir(copy / "checkpoint-2" / "deepspeed") and (copy / "model.safetensors").exists()
    assert logged_steps(work / "part") == [1, 2, 3, 4]
    assert os.listdir(work / "part" / "checkpoint-4" / "deepspeed")
    assert files_under(head_dir) == []
    full, resumed = load_file(work / "full" / "model.safetensors"), load_file(work / "part" / "model.safetensors")
    assert set(full) == set(resumed)
    assert max((full[name] - resumed[name]).abs().max().item() for name in full) < 1e-6
    initial = load_file(work / "m" / "policy" / "model.safetensors")
    assert any(not (initial[name] == full[name]).all() for name in full)  # it did train
