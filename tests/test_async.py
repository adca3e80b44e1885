"""The asynchronous schedule in one process (transformers sampler: fast, same pipeline as the Ray
placements): the batch of step t is sampled by policy version max(0, t - K), the staleness of
every step is min(t, K), and a run stopped with batches in flight resumes exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import StopAt, make_args, record_prompts, snapshot, train_rows
from transformers import AutoModelForCausalLM

from odpo_vllm import OnlineDPOTrainer, toy
from odpo_vllm.sampling.pipeline import sampling_version


def trainer_for(model_path, out, stop_at=None, **overrides):
    settings = dict(max_steps=6, per_device_train_batch_size=2, async_steps=2, save_strategy="steps", save_steps=3,
                    log_completions=False)
    settings.update(overrides)
    trainer = OnlineDPOTrainer(AutoModelForCausalLM.from_pretrained(model_path), reward_funcs=toy.short_reward,
                               args=make_args(out, output_dir=out, **settings), train_dataset=toy.prompt_dataset(10),
                               callbacks=[StopAt(stop_at)] if stop_at else None)
    return trainer, record_prompts(trainer)


def test_sampling_version_schedule():
    assert [sampling_version(t, 0) for t in range(4)] == [0, 1, 2, 3]
    assert [sampling_version(t, 2) for t in range(5)] == [0, 0, 0, 1, 2]


@pytest.mark.parametrize("k", [0, 1, 3])
def test_staleness_is_min_of_step_and_k(model_path, tmp_path, k):
    trainer, seen = trainer_for(model_path, tmp_path / f"k{k}", async_steps=k, max_steps=5, save_strategy="no")
    trainer.train()
    rows = train_rows(trainer)
    assert [r["async/staleness"] for r in rows] == [float(min(t, k)) for t in range(5)]
    assert all(r["async/staleness_max"] == r["async/staleness"] for r in rows)  # one step per log row
    assert len(seen) == 5


def test_k0_is_the_synchronous_trajectory(model_path, tmp_path):
    """async_steps=0 samples every batch with the weights trained so far: the first step equals
    K=1's (both use version 0), the second differs (K=1 samples it with version 0)."""
    sync, _ = trainer_for(model_path, tmp_path / "sync", async_steps=0, max_steps=2, save_strategy="no")
    sync.train()
    lag, _ = trainer_for(model_path, tmp_path / "lag", async_steps=1, max_steps=2, save_strategy="no")
    lag.train()
    a, b = train_rows(sync), train_rows(lag)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], abs=1e-7)
    assert a[1]["logps/chosen"] != pytest.approx(b[1]["logps/chosen"], abs=1e-6)


def test_async_resume_with_batches_in_flight_is_exact(model_path, tmp_path):
    """K=2, stopped at step 3 (its checkpoint holds the batches of steps 4, 5 and 6, sampled by
    versions 1, 2 and 3) and resumed to 6: same prompts in the same order, same weights as 6 uninterrupted steps."""
    full, full_prompts = trainer_for(model_path, tmp_path / "full")
    full.train()
    part, first_prompts = trainer_for(model_path, tmp_path / "part", stop_at=3)
    part.train()
    state = torch.load(tmp_path / "part" / "checkpoint-3" / "rollouts.pt", weights_only=False)
    assert [item["step"] for item in state["ready"]] == [3, 4, 5]  # 0-based: the batches of steps 4 to 6
    assert [item["pairs"].policy_version for item in state["ready"]] == [1, 2, 3]
    resumed, resumed_prompts = trainer_for(model_path, tmp_path / "part")
    resumed.train(resume_from_checkpoint=True)
    assert len(full_prompts) == 6 and first_prompts + resumed_prompts == full_prompts  # none lost, none repeated
    assert [r["async/staleness"] for r in train_rows(resumed)][-3:] == [2.0, 2.0, 2.0]
    weights, now = snapshot(full.model), dict(resumed.model.named_parameters())
    assert max((weights[n] - now[n].detach()).abs().max().item() for n in weights) <= 1e-6


def test_resume_with_another_async_steps_is_refused(model_path, tmp_path):
    part, _ = trainer_for(model_path, tmp_path / "run", stop_at=3)
    part.train()
    other, _ = trainer_for(model_path, tmp_path / "run", async_steps=1)
    with pytest.raises(ValueError, match="async_steps=2"):
        other.train(resume_from_checkpoint=True)


def test_checkpoints_are_renamed_when_complete_and_auto_resumes(model_path, tmp_path):
    """A save goes to `checkpoint-N.incomplete` and is renamed when complete: a folder a killed save
    left behind is never taken for a checkpoint. `resume_from_checkpoint="auto"` starts fresh
    without a checkpoint and resumes from the newest complete one otherwise."""
    out = tmp_path / "run"
    first, _ = trainer_for(model_path, out, async_steps=1, max_steps=2, save_steps=1)
    first.train(resume_from_checkpoint="auto")  # nothing to resume: a fresh start
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1",
                                                                                      "checkpoint-2"]
    # what a save killed before its rename leaves: a folder under the temporary name, not picked
    (out / "checkpoint-3.incomplete").mkdir()
    (out / "checkpoint-3.incomplete" / "model.safetensors").write_bytes(b"partial")
    again, seen = trainer_for(model_path, out, async_steps=1, max_steps=3, save_steps=1)
    again.train(resume_from_checkpoint="auto")
    assert train_rows(again)[-1]["step"] == 3 and len(seen) == 1  # resumed at 2: one step trained
    assert (out / "checkpoint-3" / "trainer_state.json").exists() and not (out / "checkpoint-3.incomplete").exists()
