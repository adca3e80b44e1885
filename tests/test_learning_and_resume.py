"""Training does what it should over many steps; resuming and gradient accumulation do not
change the run."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import changed, make_args, snapshot, train_rows
from transformers import AutoModelForCausalLM, TrainerCallback

from odpo_vllm import OnlineDPOTrainer, toy


def fresh(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path)


def assert_same_weights(a: dict[str, torch.Tensor], model, atol=1e-6):
    now = dict(model.named_parameters())
    assert set(a) == set(now)
    worst = max((a[name] - now[name].detach()).abs().max().item() for name in a)
    assert worst <= atol, f"largest weight difference {worst}"


# ------------------------------------------------------------------------------------- learning
def test_learns_toy_task(model_path, tmp_path):
    args = make_args(tmp_path, max_steps=40, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                     max_new_tokens=16, logging_steps=5, log_completions=False)
    trainer = OnlineDPOTrainer(fresh(model_path), reward_funcs=toy.sentiment_reward, args=args,
                               train_dataset=toy.prompt_dataset(64))
    trainer.train()
    rows = train_rows(trainer)
    assert [row["step"] for row in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    first = sum(row["objective/scores"] for row in rows[:2]) / 2
    last = sum(row["objective/scores"] for row in rows[-2:]) / 2
    assert last > first + 0.3, [row["objective/scores"] for row in rows]
    # the policy drifted away from the reference while doing so
    assert rows[-1]["objective/kl"] > rows[0]["objective/kl"]
    assert rows[-1]["loss"] < rows[0]["loss"]


# ------------------------------------------------------------------------------------- resume
RESUME_SETTINGS = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
                       gradient_accumulation_steps=1, dataset_size=6)


def _resume_trainer(model_path, output_dir, **overrides):
    settings = dict(RESUME_SETTINGS)
    settings.update(overrides)
    size = settings.pop("dataset_size")
    peft_config = settings.pop("peft_config", None)
    args = make_args(output_dir, output_dir=output_dir, **settings)
    return OnlineDPOTrainer(fresh(model_path), reward_funcs=toy.short_reward, args=args,
                            train_dataset=toy.prompt_dataset(size), peft_config=peft_config)


@pytest.fixture(scope="module")
def run_a(model_path, tmp_path_factory):
    """Uninterrupted run: 4 steps, checkpoints at 2 and 4 (6 prompts, 2 per step: crosses an epoch)."""
    out = tmp_path_factory.mktemp("run_a")
    trainer = _resume_trainer(model_path, out)
    trainer.train()
    return {"dir": out, "weights": snapshot(trainer.model), "rows": train_rows(trainer), "trainer": trainer}


def test_checkpoint_contents(run_a):
    checkpoint = run_a["dir"] / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "odpo_state.json", "rng_state.pth",
                 "model.safetensors", "config.json"):
        assert (checkpoint / name).exists(), name
    assert (run_a["dir"] / "checkpoint-4").exists()
    assert not (run_a["dir"] / "checkpoint-1").exists() and not (run_a["dir"] / "checkpoint-3").exists()


def test_checkpoint_weights_are_the_step_weights(run_a, model_path):
    # checkpoint-4 holds the final weights
    saved = AutoModelForCausalLM.from_pretrained(run_a["dir"] / "checkpoint-4")
    assert_same_weights(run_a["weights"], saved, atol=0)
    # checkpoint-2 holds something in between: neither initial nor final
    mid = AutoModelForCausalLM.from_pretrained(run_a["dir"] / "checkpoint-2")
    assert changed(snapshot(fresh(model_path)), mid)
    assert changed(run_a["weights"], mid)


def test_resume_from_checkpoint_path_matches_uninterrupted(run_a, model_path, tmp_path):
    trainer = _resume_trainer(model_path, tmp_path / "run_b")
    output = trainer.train(resume_from_checkpoint=str(run_a["dir"] / "checkpoint-2"))
    assert output.global_step == 4
    assert_same_weights(run_a["weights"], trainer.model, atol=1e-6)
    # the resumed steps logged the same losses as the uninterrupted run's steps 3 and 4
    rows_b = {row["step"]: row for row in train_rows(trainer)}
    rows_a = {row["step"]: row for row in run_a["rows"]}
    assert set(rows_b) == {1, 2, 3, 4}  # history up to the checkpoint came back with it
    for step in (3, 4):
        assert rows_b[step]["loss"] == pytest.approx(rows_a[step]["loss"], abs=1e-6)
        assert rows_b[step]["objective/scores"] == pytest.approx(rows_a[step]["objective/scores"], abs=1e-6)
        assert rows_b[step]["learning_rate"] == pytest.approx(rows_a[step]["learning_rate"], abs=1e-9)


def test_resume_true_picks_last_checkpoint(run_a, model_path, tmp_path):
    out = tmp_path / "run_c"
    out.mkdir()
    shutil.copytree(run_a["dir"] / "checkpoint-2", out / "checkpoint-2")
    trainer = _resume_trainer(model_path, out)
    steps_run = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    trainer.add_callback(Steps())
    trainer.train(resume_from_checkpoint=True)
    assert steps_run == [3, 4]  # continued from checkpoint-2
    assert_same_weights(run_a["weights"], trainer.model, atol=1e-6)


def test_resume_true_uses_latest_of_several(run_a, model_path, tmp_path):
    out = tmp_path / "run_d"
    shutil.copytree(run_a["dir"], out, ignore=shutil.ignore_patterns("completions.jsonl"))
    trainer = _resume_trainer(model_path, out)
    trainer.train(resume_from_checkpoint=True)  # checkpoint-4: nothing left to do
    assert trainer.state.global_step == 4
    assert_same_weights(run_a["weights"], trainer.model, atol=0)


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_a_crash_logs_each_step_once(run_a, model_path, tmp_path):
    """The run logged steps 1-4 but only checkpoint-2 survived, and the kill cut its last metrics
    row short; resumed, metrics.jsonl and completions.jsonl hold each step once, in order, with the
    uninterrupted run's values."""
    out = tmp_path / "crashed"
    shutil.copytree(run_a["dir"], out, ignore=shutil.ignore_patterns("checkpoint-4"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"loss": 0.1, "st')
    uninterrupted = {name: read_rows(run_a["dir"] / name) for name in ("metrics.jsonl", "completions.jsonl")}
    trainer = _resume_trainer(model_path, out)
    trainer.train(resume_from_checkpoint=True)

    metrics = read_rows(out / "metrics.jsonl")
    assert [row["step"] for row in metrics if "loss" in row] == [1, 2, 3, 4]
    assert ["train_runtime" in row for row in metrics] == [False] * 4 + [True]  # one summary, the last row
    assert metrics[:2] == uninterrupted["metrics.jsonl"][:2]  # kept as they were
    for resumed, expected in zip(metrics[2:4], uninterrupted["metrics.jsonl"][2:4]):
        for key in ("step", "loss", "objective/scores", "learning_rate", "epoch"):
            assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key
    completions, expected = read_rows(out / "completions.jsonl"), uninterrupted["completions.jsonl"]
    assert [row["step"] for row in completions] == [1, 1, 2, 2, 3, 3, 4, 4]
    for resumed, row in zip(completions, expected):
        assert {k: resumed[k] for k in ("step", "prompt", "chosen", "rejected")} == \
               {k: row[k] for k in ("step", "prompt", "chosen", "rejected")}
        assert resumed["chosen_score"] == pytest.approx(row["chosen_score"], abs=1e-6)


def test_fresh_start_replaces_the_logs_an_earlier_run_left(run_a, model_path, tmp_path):
    out = tmp_path / "reused"
    out.mkdir()
    for name in ("metrics.jsonl", "completions.jsonl"):
        shutil.copy(run_a["dir"] / name, out / name)
    trainer = _resume_trainer(model_path, out, max_steps=2, save_strategy="no")
    trainer.train()
    assert [row["step"] for row in read_rows(out / "metrics.jsonl")] == [1, 2, 2]  # 2: the summary
    assert [row["step"] for row in read_rows(out / "completions.jsonl")] == [1, 1, 2, 2]


def test_resume_true_without_checkpoint_raises(model_path, tmp_path):
    trainer = _resume_trainer(model_path, tmp_path / "empty")
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_from_non_checkpoint_dir_raises(model_path, tmp_path):
    trainer = _resume_trainer(model_path, tmp_path / "x")
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        trainer.train(resume_from_checkpoint=str(bogus))


def test_save_total_limit_rotates(model_path, tmp_path):
    trainer = _resume_trainer(model_path, tmp_path / "rot", save_steps=1, save_total_limit=2, max_steps=3)
    trainer.train()
    names = sorted(p for p in os.listdir(tmp_path / "rot") if p.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-3"]


def test_peft_resume_matches_uninterrupted(model_path, tmp_path):
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    a = _resume_trainer(model_path, tmp_path / "pa", peft_config=lora())
    a.train()
    assert (tmp_path / "pa" / "checkpoint-2" / "adapter_model.safetensors").exists()
    b = _resume_trainer(model_path, tmp_path / "pb", peft_config=lora())
    b.train(resume_from_checkpoint=str(tmp_path / "pa" / "checkpoint-2"))
    assert_same_weights(snapshot(a.model), b.model, atol=1e-6)


# ------------------------------------------------------------------------------------- accumulation
# Adam's first step is lr * g / (|g| + eps): near g = 0 it amplifies float noise in the gradient by
# up to lr / eps (3e5 with eps=1e-8), so parameters are compared after SGD, and after Adam with an
# epsilon that bounds the amplification; the gradient itself is compared through grad_norm and loss.
@pytest.mark.parametrize("optim, extra", [("sgd", {}), ("adamw_torch", {"adam_epsilon": 1e-3})])
def test_gradient_accumulation_equivalence(model_path, tmp_path, optim, extra):
    """8 prompts per step either way: 4 x GA 2 must equal 8 x GA 1 (loss is the mean over pairs)."""

    def one_step(per_device, accumulation, name):
        args = make_args(tmp_path / name, max_steps=1, per_device_train_batch_size=per_device,
                         gradient_accumulation_steps=accumulation, optim=optim, log_completions=False, **extra)
        trainer = OnlineDPOTrainer(fresh(model_path), reward_funcs=toy.short_reward, args=args,
                                   train_dataset=toy.prompt_dataset(16))
        pairs_seen = []
        original = trainer.learner.step
        trainer.learner.step = lambda batch, beta: (pairs_seen.append(batch), original(batch, beta))[1]
        trainer.train()
        return train_rows(trainer)[0], snapshot(trainer.model), pairs_seen[0]

    row_a, weights_a, pairs_a = one_step(4, 2, "ga2")
    row_b, weights_b, pairs_b = one_step(8, 1, "ga1")
    assert len(pairs_a) == len(pairs_b) == 8
    assert pairs_a.chosen_ids == pairs_b.chosen_ids and pairs_a.rejected_ids == pairs_b.rejected_ids
    assert row_a["loss"] == pytest.approx(row_b["loss"], abs=1e-5)
    assert row_a["grad_norm"] == pytest.approx(row_b["grad_norm"], rel=1e-4)
    for key in ("objective/kl", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert row_a[key] == pytest.approx(row_b[key], abs=1e-4), key
    worst = max((weights_a[n] - weights_b[n]).abs().max().item() for n in weights_a)
    assert worst <= 1e-5, f"largest weight difference {worst}"
