"""The push-size projection (`benchmarks/lora_push_projection.py`) counts on the meta device what
a real model of the same shapes sends: a merged push's bytes as the learner's weight source
yields them, an adapter push's as the engine is given them (`adapter_weights`)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_push_projection  # noqa: E402


@pytest.mark.parametrize("model_type, tied, targets", [("qwen2", True, ["q_proj", "v_proj"]),
                                                       ("llama", False, "all-linear")])
def test_projection_on_meta_equals_what_a_real_model_sends(model_type, tied, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from odpo_vllm.weights.adapter import adapter_weights
    from odpo_vllm.weights.names import LearnerWeights

    config = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=96, vocab_size=300,
                                  tie_word_embeddings=tied)
    parameters, merged, adapter = lora_push_projection.push_bytes(config, 4, targets, element_bytes=2)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert parameters == sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    sent = list(LearnerWeights(model, dtype=torch.bfloat16))
    assert merged == sum(t.numel() * t.element_size() for _, t in sent)
    head = 300 * 64 if tied else 0  # a tied output layer is sent as a tensor of its own
    assert merged == (parameters + head) * 2
    assert adapter == adapter_weights(model, torch.bfloat16).nbytes


def test_published_shapes_give_the_published_sizes():
    """The shapes table against the models' published parameter counts (0.49B, 1.54B, 7.62B, 135M)."""
    published = {"SmolLM2-135M-Instruct": 0.135, "Qwen2.5-0.5B-Instruct": 0.494, "Qwen2.5-1.5B-Instruct": 1.544,
                 "Qwen2.5-7B-Instruct": 7.616}
    import transformers

    for name, billions in published.items():
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(lora_push_projection.config_of(name))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=5e-4), name
