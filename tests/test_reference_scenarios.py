"""The scenarios of the reference's own trainer tests (TRL's test_online_dpo_trainer.py), written
here for odpo_vllm and run with both samplers: a reward model with its own tokenizer on standard
and conversational prompts with evaluation during training, and the generation settings a user
reads back from the trainer. docs/reference_tests.md maps every reference test to ours."""

from __future__ import annotations

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from odpo_vllm import OnlineDPOTrainer, toy

from conftest import changed, make_args, snapshot, train_rows

BACKENDS = [pytest.param(False, id="transformers"), pytest.param(True, id="vllm", marks=pytest.mark.vllm)]


@pytest.mark.parametrize("use_vllm", BACKENDS)
@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_reward_model_with_its_tokenizer_and_evaluation(model, reward_model_path, tmp_path, use_vllm, conversational):
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_path, num_labels=1)
    reward_tokenizer = AutoTokenizer.from_pretrained(reward_model_path)
    reward_before = snapshot(reward_model)
    args = make_args(tmp_path, use_vllm=use_vllm, max_steps=3, eval_strategy="steps", eval_steps=2)
    with OnlineDPOTrainer(model, reward_funcs=reward_model, args=args, reward_processing_classes=reward_tokenizer,
                          train_dataset=toy.prompt_dataset(8, conversational=conversational),
                          eval_dataset=toy.prompt_dataset(4, conversational=conversational, seed=5)) as trainer:
        before = snapshot(trainer.model)
        trainer.train()
        assert changed(before, trainer.model)
    history = trainer.state.log_history
    assert "train_loss" in history[-1] and history[-1]["train_loss"] > 0
    rows = train_rows(trainer)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert any(row["objective/scores"] != 0.0 for row in rows)  # the reward model's scores, not a constant
    # every eval_steps, and at the last step (transformers' DefaultFlowCallback decides, as for the reference)
    assert [row["step"] for row in history if "eval_loss" in row] == [2, 3]
    assert not changed(reward_before, reward_model)  # the reward model is never trained


def test_generation_kwargs_set_the_transformers_generation_config(model, tmp_path):
    """generation_kwargs win over the named settings; with use_vllm=False there is no engine."""
    args = make_args(tmp_path, use_vllm=False, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.2,
                     max_new_tokens=12, generation_kwargs={"do_sample": False})
    with OnlineDPOTrainer(model, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(4)) as trainer:
        config = trainer.generation_config
        assert trainer.use_vllm is False and trainer.llm is None and trainer.vllm_client is None
        assert (config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (0.8, 0.9, 40, 1.2)
        assert config.max_new_tokens == 12 and config.do_sample is False
        trainer.train()
        # greedy: both samples of a prompt are the same completion, so every pair ties
        assert all(row["objective/scores_margin"] == 0.0 for row in train_rows(trainer))
