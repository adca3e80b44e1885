"""A custom-code model (`trust_remote_code=True`, an architecture vLLM has no code for) trains
with the default backend, as in the reference: the vLLM engine runs it with vLLM's Transformers
backend, and where even that cannot (no `AutoModel` entry in its `auto_map`) the transformers
sampler does, with one logged line."""

from __future__ import annotations

import json
import logging
import os

import pytest

from odpo_vllm import OnlineDPOTrainer, toy

from conftest import make_args

pytestmark = [pytest.mark.timeout(600), pytest.mark.vllm]

CONFIG_CODE = '''from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote_qwen2"
'''
MODEL_CODE = '''from transformers import Qwen2ForCausalLM, Qwen2Model

from .configuration_remote import RemoteConfig


class RemoteModel(Qwen2Model):
    config_class = RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
'''


def remote_model(path, auto_model: bool = True) -> str:
    """The toy policy re-labelled as a custom-code architecture, `RemoteForCausalLM`, whose code
    lives beside its config."""
    toy.build_model(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(architectures=["RemoteForCausalLM"], model_type="remote_qwen2",
                  auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    if auto_model:
        config["auto_map"]["AutoModel"] = "modeling_remote.RemoteModel"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    for name, code in (("configuration_remote.py", CONFIG_CODE), ("modeling_remote.py", MODEL_CODE)):
        with open(os.path.join(path, name), "w") as f:
            f.write(code)
    return os.fspath(path)


@pytest.mark.parametrize("auto_model, sampler", [(True, "VLLMGenerator"), (False, "TransformersGenerator")])
def test_custom_code_model_trains_with_the_default_backend(tmp_path, caplog, auto_model, sampler):
    model = remote_model(tmp_path / "remote", auto_model)
    args = make_args(tmp_path, use_vllm=None, trust_remote_code=True, max_steps=2, max_new_tokens=8,
                     per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, gradient_checkpointing=False)
    with caplog.at_level(logging.WARNING, logger="odpo_vllm"):
        with OnlineDPOTrainer(model, reward_funcs=toy.sentiment_reward, args=args,
                              train_dataset=toy.prompt_dataset(8)) as trainer:
            assert type(trainer.model).__name__ == "RemoteForCausalLM"
            assert type(trainer.generator).__name__ == sampler
            trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 2 and rows[1]["loss"] != rows[0]["loss"]
    said = [r.getMessage() for r in caplog.records if "RemoteForCausalLM" in r.getMessage()]
    if auto_model:  # the engine served the learner's weights after each step
        assert max(r["sync/logprob_gap"] for r in rows) < 1e-4
        assert len(said) == 1 and "Transformers backend" in said[0]
    else:
        assert len(said) == 2 and "sampling with transformers' generate" in said[1]
