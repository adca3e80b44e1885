"""TR-DPO's reference refresh (`sync_ref_model`, DPOConfig's fields): every `ref_model_sync_steps`
steps the reference becomes alpha * policy + (1 - alpha) * reference; checkpoints hold it, so a
resume after a refresh equals the uninterrupted run. In process (the Ray path is compared with it
in tests/test_placement.py)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import StopAt, make_args, snapshot
from transformers import AutoModelForCausalLM, TrainerCallback

from odpo_vllm import OnlineDPOTrainer, toy

REFRESH = dict(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)


class PolicyAtSteps(TrainerCallback):
    """The policy's weights at the end of each step (after that step's refresh, if any)."""

    def __init__(self):
        self.trainer, self.weights = None, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = snapshot(self.trainer.model)


def trainer_for(model_path, out, callbacks=(), **overrides):
    settings = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=5e-2, save_strategy="steps",
                    save_steps=3, log_completions=False, **REFRESH)
    settings.update(overrides)
    return OnlineDPOTrainer(AutoModelForCausalLM.from_pretrained(model_path), reward_funcs=toy.short_reward,
                            args=make_args(out, output_dir=out, **settings), train_dataset=toy.prompt_dataset(10),
                            callbacks=list(callbacks))


def test_reference_becomes_a_mix_of_the_policy_every_n_steps(model_path, tmp_path):
    recorder = PolicyAtSteps()
    trainer = trainer_for(model_path, tmp_path / "run", callbacks=[recorder], save_strategy="no")
    recorder.trainer = trainer
    initial = snapshot(trainer.learner.ref_model)
    trainer.train()
    policy = recorder.weights
    reference = dict(trainer.learner.ref_model.named_parameters())
    for name, start in initial.items():
        after_2 = 0.5 * policy[2][name] + 0.5 * start
        expected = 0.5 * policy[4][name] + 0.5 * after_2
        assert torch.allclose(reference[name].detach(), expected, atol=1e-6), name
    # the policy moved, so the reference did: a refresh that did nothing would fail above too
    assert max((policy[4][n] - initial[n]).abs().max().item() for n in initial) > 1e-3


def test_resume_after_a_refresh_equals_the_uninterrupted_run(model_path, tmp_path):
    full = trainer_for(model_path, tmp_path / "full")
    full.train()
    part = trainer_for(model_path, tmp_path / "part", callbacks=[StopAt(3)])
    part.train()
    assert os.path.exists(tmp_path / "part" / "checkpoint-3" / "reference.safetensors")
    resumed = trainer_for(model_path, tmp_path / "part")
    resumed.train(resume_from_checkpoint=True)
    for model_of in (lambda t: t.model, lambda t: t.learner.ref_model):
        expected, now = snapshot(model_of(full)), dict(model_of(resumed).named_parameters())
        assert max((expected[n] - now[n].detach()).abs().max().item() for n in expected) <= 1e-6
    # without the saved reference the resumed run would start from the initial one
    initial = snapshot(AutoModelForCausalLM.from_pretrained(model_path))
    reference = dict(resumed.learner.ref_model.named_parameters())
    assert max((initial[n] - reference[n].detach()).abs().max().item() for n in initial) > 1e-3


@pytest.mark.parametrize("field,value,message", [
    ("ref_model_mixup_alpha", 1.5, r"ref_model_mixup_alpha: must be in \[0, 1\]"),
    ("ref_model_sync_steps", 0, r"ref_model_sync_steps: must be an integer >= 1"),
])
def test_bad_refresh_settings_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match="OnlineDPOConfig." + message):
        make_args(tmp_path, **{field: value})


def test_refresh_with_a_lora_policy_is_refused_at_construction(model_path, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match=r"OnlineDPOConfig.sync_ref_model: a LoRA policy's reference is its base"):
        OnlineDPOTrainer(model_path, reward_funcs=toy.short_reward, args=make_args(tmp_path, **REFRESH),
                         train_dataset=toy.prompt_dataset(4),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
