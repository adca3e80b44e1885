"""Logprobs from hidden states, a chunk of completion tokens at a time, equal the full-logits pass
(values and gradients) in either layout, also behind a soft-capped output layer, and the learner
falls back to full logits where the output layer alone does not give the model's logits."""

from __future__ import annotations

import pytest
import torch

from odpo_vllm.core.sequences import (
    logprobs_from_hidden,
    logprobs_from_logits,
    separate_sequences,
    shared_prompt_rows,
)
from odpo_vllm.learning.learner import Learner

from conftest import make_args

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
COMPLETIONS = [[20, 21, 22, 23], [30], [40, 41], [50, 51, 52, 53, 54, 55]]


def _layout(pad: int, build=separate_sequences):
    return build(PROMPTS, [[c] for c in COMPLETIONS], max_length=16, pad_token_id=pad)


def _by_hand(logits: torch.Tensor) -> torch.Tensor:
    """(S, C) logprobs of separate rows' completion tokens from the model's logits (float64 log-softmax,
    indexed from the token lists alone, differentiable)."""
    out = torch.zeros(len(PROMPTS), max(len(c) for c in COMPLETIONS), dtype=torch.float64)
    for s, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
        picked = torch.log_softmax(logits[s, positions].double(), dim=-1)[torch.arange(len(completion)), completion]
        out = out.index_put((torch.full_like(positions, s), torch.arange(len(completion))), picked)
    return out


@pytest.mark.parametrize("build", [separate_sequences, shared_prompt_rows])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 1000])
def test_hidden_chunks_match_full_logits(chunk_tokens, build):
    torch.manual_seed(0)
    vocab, width = 97, 16
    head = torch.nn.Linear(width, vocab, bias=True)
    layout = _layout(pad=0, build=build)
    hidden = torch.randn(*layout.input_ids.shape, width, requires_grad=True)

    expected, expected_mask = logprobs_from_logits(head(hidden), layout, chunk_tokens=2)
    (expected.sum() * 0.5).backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = None
    head.zero_grad()

    got, mask = logprobs_from_hidden(hidden, head, layout, chunk_tokens)
    (got.sum() * 0.5).backward()
    assert torch.equal(mask, expected_mask)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (4, 6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got[mask == 0] == 0).all()
    for want, have in zip(grads, [hidden.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_no_vocabulary_wide_tensor_larger_than_a_chunk():
    """The projection only ever sees `chunk_tokens` rows: nothing (R, L, V)-sized is built."""
    torch.manual_seed(0)
    layout = _layout(pad=0)
    seen = []

    def project(states):
        seen.append(states.shape[0])
        return states @ torch.ones(8, 64)

    logprobs_from_hidden(torch.randn(*layout.input_ids.shape, 8), project, layout, chunk_tokens=4)
    assert max(seen) <= 4 and sum(seen) == int(layout.completion_mask().sum())


def _learner_and_full(model, tmp_path, layout):
    """The learner's logprobs and gradients next to the same computed by hand from the model's logits."""
    learner = Learner(model, None, make_args(tmp_path, gradient_checkpointing=False), 1, 1)
    full = _by_hand(model(**layout.model_inputs(), use_cache=False).logits)
    full.sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    got, _ = learner.completion_logprobs(model, layout)
    got.sum().backward()
    return learner, full.float(), full_grads, got


def test_learner_uses_hidden_states_and_matches_full_logits(model, tmp_path):
    layout = _layout(pad=1)
    learner, full, full_grads, got = _learner_and_full(model, tmp_path, layout)
    assert learner._hidden_path[id(model)] is True
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_softcapped_output_layer_uses_hidden_states(tmp_path):
    """Gemma2 soft-caps its logits after the output layer: the learner applies the same cap to its
    chunks, so it stays on the hidden-state path, with the full-logits values and gradients."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=32, final_logit_softcapping=1.0,
                          pad_token_id=1, eos_token_id=0, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config)
    layout = _layout(pad=1)
    learner, full, full_grads, got = _learner_and_full(model, tmp_path, layout)
    assert learner._hidden_path[id(model)] is True
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_learner_falls_back_when_logits_are_post_processed(tmp_path):
    """Cohere scales its logits after the output layer (`logit_scale`), which the learner does not
    know about: the bare output layer gives other logprobs, its check notices, and the learner's
    logprobs are those of the model's logits."""
    from transformers import AutoModelForCausalLM, CohereConfig

    torch.manual_seed(0)
    config = CohereConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, logit_scale=0.5,
                          pad_token_id=1, eos_token_id=0, bos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    layout = _layout(pad=1)
    with torch.no_grad():
        hidden = model(**layout.model_inputs(), output_hidden_states=True).hidden_states[-1]
        bare, _ = logprobs_from_hidden(hidden, model.get_output_embeddings(), layout)
    learner, full, full_grads, got = _learner_and_full(model, tmp_path, layout)
    assert (bare - full).abs().max() > 1e-2  # the hidden-state path would be wrong for this model
    assert learner._hidden_path[id(model)] is False
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
