"""The configuration fields TRL 1.16's OnlineDPOConfig has beyond the seed's, with its defaults
and checks, and what each does here: structured outputs and vLLM's Transformers backend on the
engine, the KV-cache implementation on the transformers sampler."""

from __future__ import annotations

import re

import pytest

from odpo_vllm import OnlineDPOConfig, OnlineDPOTrainer, toy

from conftest import make_args

# TRL 1.16's defaults for the fields it added (read from its dataclass; trl is not a test dependency)
TRL_116_DEFAULTS = dict(
    vllm_mode="colocate", vllm_server_base_url=None, vllm_server_host="0.0.0.0", vllm_server_port=8000,
    vllm_server_timeout=240.0, vllm_group_port=51216, vllm_model_impl="vllm", vllm_structured_outputs_regex=None,
    cache_implementation=None, ds3_gather_for_generation=True, top_k=0,
)


def test_reference_fields_and_defaults(tmp_path):
    config = OnlineDPOConfig(output_dir=str(tmp_path))
    assert {name: getattr(config, name) for name in TRL_116_DEFAULTS} == TRL_116_DEFAULTS
    given = dict(vllm_server_base_url="http://10.0.0.1:8000", vllm_server_host="10.0.0.1", vllm_server_port=8001,
                 vllm_server_timeout=60.0, vllm_group_port=51217, vllm_model_impl="transformers",
                 vllm_structured_outputs_regex="[ab]+", cache_implementation="static", ds3_gather_for_generation=False)
    config = OnlineDPOConfig(output_dir=str(tmp_path), **given)
    assert {name: getattr(config, name) for name in given} == given


@pytest.mark.parametrize("field, value, message", [
    ("vllm_mode", "remote", "must be 'colocate' or 'server'"),
    ("vllm_server_base_url", "10.0.0.1:8000", "must start with http:// or https://"),
    ("vllm_server_base_url", "http://:8000", "names no host"),
    ("vllm_group_port", 0, "must be a port in 1-65535"),
    ("vllm_model_impl", "jax", "must be 'vllm' or 'transformers'"),
    ("vllm_structured_outputs_regex", "(ab", "is not a regular expression"),
    ("vllm_server_timeout", 0, "must be > 0 seconds"),
])
def test_reference_fields_bad_values_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=rf"OnlineDPOConfig.{field}: .*{re.escape(message)}"):
        OnlineDPOConfig(output_dir=str(tmp_path), **{field: value})


def test_server_mode_trains_in_process(tmp_path):
    """vllm_mode="server" samples on a server the user started and trains here: a Ray placement,
    which starts engines of its own, is refused with what to use instead."""
    OnlineDPOConfig(output_dir=str(tmp_path), vllm_mode="server")  # placement="in_process": accepted
    with pytest.raises(ValueError, match=r"OnlineDPOConfig.vllm_mode: .*placement='in_process'"):
        OnlineDPOConfig(output_dir=str(tmp_path), vllm_mode="server", placement="dedicated")


def test_cache_implementation_reaches_the_transformers_sampler(model, tmp_path):
    args = make_args(tmp_path, use_vllm=False, cache_implementation="static", max_new_tokens=6, max_steps=1)
    with OnlineDPOTrainer(model, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(4)) as trainer:
        assert trainer.generation_config.cache_implementation == "static"
        trainer.train()
    assert [r["step"] for r in trainer.state.log_history if "loss" in r] == [1]


@pytest.mark.vllm
def test_structured_outputs_regex_constrains_every_completion(model_path, tmp_path):
    pattern = "(good|great|fun)( (good|great|fun)){0,3}"
    args = make_args(tmp_path, use_vllm=True, vllm_structured_outputs_regex=pattern, max_new_tokens=16, max_steps=2,
                     logging_steps=1)
    with OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(8)) as trainer:
        trainer.train()
        rows = [trainer.encoder.encode(row, i) for i, row in enumerate(toy.prompts(4, seed=5))]
        rollouts = trainer.generator.generate(rows, 2, seed=7)
    texts = trainer.processing_class.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    assert texts and all(re.fullmatch(pattern, text.strip()) for text in texts), texts
    assert all(r["sync/logprob_gap"] < 1e-4 for r in trainer.state.log_history if "loss" in r)


@pytest.mark.vllm
def test_vllm_transformers_backend_trains_and_serves_the_learner(model_path, tmp_path):
    args = make_args(tmp_path, use_vllm=True, vllm_model_impl="transformers", max_new_tokens=8, max_steps=2,
                     learning_rate=1e-2, logging_steps=1)
    with OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(8)) as trainer:
        trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 2 and max(r["sync/logprob_gap"] for r in rows) < 1e-4
    # vLLM decorated the model class for the whole process: models of that class built afterwards
    # (by the next trainer, or the user) still build and run
    import torch
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(model_path)
    assert type(again) is type(trainer.model) and torch.isfinite(again(torch.tensor([[1, 2, 3]])).logits).all()
