"""The asynchronous schedule in one process (transformers sampler: fast, same pipeline as the Ray
placements): the batch of step t is sampled by policy version max(0, t - K), the staleness of
every step is min(t, K), and a run stopped with batches in flight resumes exactly; with
weight_sync_steps s, by version s * floor(max(0, t - K) / s), pushed every s steps, and a run
stopped between two pushes resumes exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import StopAt, make_args, record_prompts, snapshot, train_rows
from transformers import AutoModelForCausalLM

from odpo_vllm import OnlineDPOTrainer, toy
from odpo_vllm.sampling.pipeline import pushes_after, sampling_version


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
    # weight_sync_steps s: the engines hold versions 0, s, 2s, ... (the issue's 1-based "steps 1-4
    # from version 0, steps 5-8 from version 4" for K=0, s=4)
    assert [sampling_version(t, 0, 4) for t in range(9)] == [0, 0, 0, 0, 4, 4, 4, 4, 8]
    assert [sampling_version(t, 1, 4) for t in range(10)] == [0, 0, 0, 0, 0, 4, 4, 4, 4, 8]
    assert [sampling_version(t, 2, 3) for t in range(9)] == [0, 0, 0, 0, 0, 3, 3, 3, 6]
    assert [pushes_after(t, 3) for t in range(6)] == [False, False, True, False, False, True]


@pytest.mark.parametrize("k,s", [(0, 3), (1, 3), (2, 2)])
def test_weight_sync_steps_publishes_every_s_steps_and_ages_each_batch(model_path, tmp_path, k, s):
    trainer, seen = trainer_for(model_path, tmp_path / f"k{k}s{s}", async_steps=k, weight_sync_steps=s, max_steps=7,
                                save_strategy="no")
    published, publish = [], trainer.publisher.publish

    def recording(version, stop=None):
        published.append((trainer.state.global_step, version))
        return publish(version, stop)

    trainer.publisher.publish = recording
    trainer.train()
    rows = train_rows(trainer)
    # (global_step, version): pushes after every s-th step, then one at the end of training
    pushes = [(t, t + 1) for t in range(7) if (t + 1) % s == 0]
    assert published == pushes + ([(7, 7)] if 7 % s else [])
    assert [r["async/staleness"] for r in rows] == [float(t - sampling_version(t, k, s)) for t in range(7)]
    assert len(seen) == 7


def test_first_interval_of_weight_sync_steps_equals_async_sampling_by_version_0(model_path, tmp_path):
    """With s=3, K=0 the batches of steps 1-3 are all sampled by version 0, as K=2's: same batches,
    same learner, so the same loss and logprobs; K=0, s=1 samples the second one with version 1."""
    semi, _ = trainer_for(model_path, tmp_path / "semi", async_steps=0, weight_sync_steps=3, max_steps=3,
                          save_strategy="no", learning_rate=5e-2)
    semi.train()
    lag, _ = trainer_for(model_path, tmp_path / "lag", async_steps=2, max_steps=3, save_strategy="no",
                         learning_rate=5e-2)
    lag.train()
    online, _ = trainer_for(model_path, tmp_path / "online", async_steps=0, max_steps=3, save_strategy="no",
                            learning_rate=5e-2)
    online.train()
    a, b, c = train_rows(semi), train_rows(lag), train_rows(online)
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-6), key
    assert a[1]["logps/chosen"] != pytest.approx(c[1]["logps/chosen"], abs=1e-6)


def test_resume_between_two_pushes_is_exact(model_path, tmp_path):
    """s=4, K=1: stopped at step 2 (the learners at version 2, the engines at 0; the checkpoint
    holds the batches of steps 3-5, sampled by version 0) and resumed to 8 equals 8 steps
    uninterrupted: same prompts, same weights."""
    settings = dict(weight_sync_steps=4, async_steps=1, max_steps=8, save_steps=2, learning_rate=5e-2)
    full, full_prompts = trainer_for(model_path, tmp_path / "full", **settings)
    full.train()
    part, first_prompts = trainer_for(model_path, tmp_path / "part", stop_at=2, **settings)
    part.train()
    state = torch.load(tmp_path / "part" / "checkpoint-2" / "rollouts.pt", weights_only=False)
    assert [(item["step"], item["pairs"].policy_version) for item in state["ready"]] == [(2, 0), (3, 0), (4, 0)]
    resumed, resumed_prompts = trainer_for(model_path, tmp_path / "part", **settings)
    resumed.train(resume_from_checkpoint=True)
    assert len(full_prompts) == 8 and first_prompts + resumed_prompts == full_prompts
    assert [r["async/staleness"] for r in train_rows(resumed)][2:] == [2.0, 3.0, 4.0, 1.0, 2.0, 3.0]
    weights, now = snapshot(full.model), dict(resumed.model.named_parameters())
    assert max((weights[n] - now[n].detach()).abs().max().item() for n in weights) <= 1e-6


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


def test_resume_with_another_async_steps_or_weight_sync_steps_is_refused(model_path, tmp_path):
    part, _ = trainer_for(model_path, tmp_path / "run", stop_at=3)
    part.train()
    other, _ = trainer_for(model_path, tmp_path / "run", async_steps=1)
    with pytest.raises(ValueError, match="async_steps=2"):
        other.train(resume_from_checkpoint=True)
    other, _ = trainer_for(model_path, tmp_path / "run", weight_sync_steps=3)
    with pytest.raises(ValueError, match="weight_sync_steps=1; resume with the same weight_sync_steps"):
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
