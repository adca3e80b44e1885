"""Shared-prompt rows (each prompt once, its completions after it, several groups per row without
padding) give the separate-sequence pass's logprobs, loss, metrics and gradients (fp32, max abs
difference <= 1e-5 of the largest value), with gradient checkpointing, eager and sdpa attention, a
LoRA policy, k > 2 completions, prompt truncation, a sliding window and a soft-capped output
layer; a model that cannot take the mask falls back once, with a log line, to the same results.
The ZeRO-2/3 ranks are checked in tests/test_learner_group.py against a separate-sequence process."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from odpo_vllm.core.batches import PairBatch
from odpo_vllm.core.sequences import (
    SeparateSequences,
    SharedPromptRows,
    attention_mask,
    build_groups,
    logprobs_from_hidden,
    logprobs_from_logits,
    pack_rows,
    separate_sequences,
    shared_prompt_rows,
)
from odpo_vllm.learning.learner import Learner

from conftest import make_args

REL = 1e-5


def random_pairs(vocab: int, n: int = 5, seed: int = 0, prompt=(3, 24), completion=(1, 14)) -> PairBatch:
    generator = torch.Generator().manual_seed(seed)
    length = lambda bounds: int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=generator))  # noqa: E731
    tokens = lambda count: torch.randint(3, vocab, (count,), generator=generator).tolist()  # noqa: E731
    return PairBatch([tokens(length(prompt)) for _ in range(n)], [tokens(length(completion)) for _ in range(n)],
                     [tokens(length(completion)) for _ in range(n)])


def close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = REL) -> None:
    gap = (got.detach().float() - want.detach().float()).abs().max().item()
    scale = max(want.detach().abs().max().item(), 1e-6)
    assert gap <= rel * scale, f"{what}: max abs difference {gap:.3e} > {rel} x {scale:.3e}"


# -------------------------------------------------------------------------------- the layout
def test_rows_hold_each_prompt_once_with_restarting_positions_and_no_padding():
    prompts = [[10, 11, 12], [20, 21], [30]]
    completions = [[[1, 2], [3]], [[4, 5, 6], [7, 8]], [[9], [2, 3]]]
    rows = shared_prompt_rows(prompts, completions, max_length=64, pad_token_id=0)
    # group lengths 6, 7, 4: capacity 7, so [7] and [6] alone... and 4 shares no row with them
    tokens = sorted(rows.input_ids[r][rows.group_ids[r] >= 0].tolist() for r in range(rows.input_ids.shape[0]))
    assert sum(len(t) for t in tokens) == 6 + 7 + 4  # every prompt once
    assert rows.input_ids.shape[1] == 7  # no row longer than the longest group
    first = rows.input_ids[0].tolist()  # the longest group comes first
    assert first == [20, 21, 4, 5, 6, 7, 8]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]  # restart after the prompt
    mask = rows.attention_mask()[0, 0]
    assert mask[5].tolist() == [True, True, False, False, False, True, False]  # rejected: prompt + itself
    assert mask[4].tolist() == [True] * 5 + [False] * 2  # chosen: prompt + its own prefix
    # predictions: completion 1's first token is predicted by the last prompt token
    sequence_of = {(int(s), int(o)): (int(r), int(c)) for s, o, r, c in
                   zip(rows.sequences, rows.offsets, rows.rows, rows.cols)}
    assert sequence_of[(3 + 1, 0)] == (0, 1) and sequence_of[(3 + 1, 1)] == (0, 5)
    assert rows.completion_mask().sum(1).tolist() == [2, 3, 1, 1, 2, 2]  # block layout: samples 0, then 1


def test_packing_fills_rows_first_fit_decreasing_and_pads_only_to_the_longest_row():
    groups, _ = build_groups([[1] * 10, [1] * 3, [1] * 4, [1] * 2], [[[2] * 5], [[2] * 2], [[2] * 3], [[2]]], 64)
    rows = pack_rows(groups)
    assert [[len(g) for g in row] for row in rows] == [[15], [7, 5, 3]]
    packed = shared_prompt_rows([[1] * 10, [1] * 3, [1] * 4, [1] * 2], [[[2] * 5], [[2] * 2], [[2] * 3], [[2]]], 64, 0)
    assert packed.num_tokens == 2 * 15  # padded separate rows: 4 x 15 = 60


def test_groups_in_one_row_never_see_each_other_and_padding_sees_only_itself():
    group_ids = torch.tensor([[0, 0, 0, 1, 1, -6]])
    segment_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = attention_mask(group_ids, segment_ids)[0, 0]
    assert mask.tolist() == [
        [True, False, False, False, False, False],
        [True, True, False, False, False, False],
        [True, False, True, False, False, False],
        [False, False, False, True, False, False],
        [False, False, False, True, True, False],
        [False, False, False, False, False, True],
    ]
    additive = attention_mask(group_ids, segment_ids, torch.float32)[0, 0]
    assert torch.equal(additive == 0, mask) and additive.min() == torch.finfo(torch.float32).min


def test_prompts_cut_differently_by_max_length_are_not_shared():
    groups, truncated = build_groups([[1, 2, 3, 4, 5, 6]], [[[7, 8], [9, 9, 9, 9]]], max_length=6)
    assert truncated == 2
    assert [(g.prompt, g.completions, g.sequences) for g in groups] == [
        ([3, 4, 5, 6], [[7, 8]], [0]), ([5, 6], [[9, 9, 9, 9]], [1])]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_both_layouts_give_the_same_logprobs_and_gradients_when_prompts_are_cut(model_path, attention):
    """The two layouts through a real model, both gathers, prompts cut by max_length: pairs whose
    completions keep the same prompt share it, others are split, one prompt is dropped whole."""
    from transformers import AutoModelForCausalLM

    model = moved(AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=attention))
    batch = random_pairs(model.config.vocab_size, n=5, prompt=(16, 20), completion=(2, 10), seed=9)
    prompts = batch.prompt_ids + [list(range(3, 17)), list(range(20, 25))]
    completions = [[c, r] for c, r in zip(batch.chosen_ids, batch.rejected_ids)]
    completions += [[[40, 41, 42, 43], [44, 45, 46, 47]], [list(range(50, 66)), [70, 71, 72]]]
    mask_dtype = None if attention == "sdpa" else torch.float32  # the learner's forms (`_mask_dtype`)

    def run(build, gather):
        model.zero_grad(set_to_none=True)
        layout = build(prompts, completions, 16, 1)
        if gather == "hidden":
            out = model(**layout.model_inputs(mask_dtype), output_hidden_states=True, use_cache=False)
            logps, mask = logprobs_from_hidden(out.hidden_states[-1], model.lm_head, layout, chunk_tokens=7)
        else:
            logps, mask = logprobs_from_logits(model(**layout.model_inputs(mask_dtype), use_cache=False).logits,
                                               layout, chunk_tokens=7)
        weights = torch.linspace(0.5, 1.5, logps.numel()).reshape(logps.shape)  # a different weight per token
        (logps * weights).sum().backward()
        return layout, logps.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    for gather in ("hidden", "logits"):
        (separate, want, want_mask, want_grads), (shared, got, mask, got_grads) = (
            run(build, gather) for build in (separate_sequences, shared_prompt_rows))
        assert separate.num_truncated_prompts == shared.num_truncated_prompts == 2 * len(prompts) - 1
        groups = sum(len(set(row[row >= 0].tolist())) for row in shared.group_ids)
        assert (shared.segment_ids == 2).any() and groups > len(prompts)  # some prompts shared, some split
        assert torch.equal(mask, want_mask) and mask[len(prompts) - 1, 0] == 0  # nothing before token 0
        close(got, want, f"{gather}: logprobs")
        for name, grad in want_grads.items():
            close(got_grads[name], grad, f"{gather}: {name}")


# -------------------------------------------------------------------------------- equality
def pair_pass(policy, reference, args, batch: PairBatch, pad: int):
    learner = Learner(policy, reference, args, pad, 1)
    policy.train()
    policy.zero_grad(set_to_none=True)
    loss, sums, truncated = learner._pair_pass(batch, 0.1, len(batch), train=True)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    return learner, loss.detach(), sums, truncated, grads


def assert_same_pass(make_policy, reference, tmp_path, batch: PairBatch, pad: int, **overrides):
    """Separate sequences vs shared-prompt rows on fresh copies of the same policy."""
    results = []
    for shared in (False, True):
        args = make_args(tmp_path, shared_prompt_passes=shared, **{"max_length": 256, **overrides})
        results.append(pair_pass(make_policy(), reference, args, batch, pad))
    (_, loss0, sums0, cut0, grads0), (learner, loss1, sums1, cut1, grads1) = results
    assert learner._shared_ok and all(learner._shared_ok.values())  # the shared path did run
    close(loss1, loss0, "loss")
    assert cut0 == cut1
    # metrics are sums of logprob differences: their rounding scales with the logprobs they come from
    scale = max(abs(float(sums0["logps/chosen"])), abs(float(sums0["logps/rejected"])))
    for key, value in sums0.items():
        if key == "rewards/accuracies":
            assert float(sums1[key]) == float(value)
        else:
            gap = abs(float(sums1[key]) - float(value))
            assert gap <= REL * max(abs(float(value)), scale), f"{key}: {float(sums1[key])} vs {float(value)}"
    assert set(grads0) == set(grads1) and grads0
    largest = max(g.abs().max().item() for g in grads0.values())
    assert largest > 1e-4  # a real gradient was compared
    for name, grad in grads0.items():
        gap = (grads1[name] - grad).abs().max().item()
        assert gap <= REL * max(grad.abs().max().item(), 1e-2 * largest), f"{name}: {gap:.3e}"
    return learner


def moved(model, seed: int = 1, scale: float = 0.02):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_rows_match_separate_sequences(model_path, tmp_path, checkpointing, attention):
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=attention)  # noqa: E731
    reference = load().eval().requires_grad_(False)
    base = moved(load())

    def make_policy():
        policy = copy.deepcopy(base)
        if checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return policy

    batch = random_pairs(reference.config.vocab_size, n=6)
    assert_same_pass(make_policy, reference, tmp_path, batch, pad=1, gradient_checkpointing=checkpointing)


def test_truncated_prompts_and_ipo_loss(model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_path).eval().requires_grad_(False)
    base = moved(AutoModelForCausalLM.from_pretrained(model_path))
    batch = random_pairs(reference.config.vocab_size, n=4, prompt=(10, 20), completion=(2, 10))
    learner = assert_same_pass(lambda: copy.deepcopy(base), reference, tmp_path, batch, pad=1, max_length=16,
                               loss_type="ipo")
    assert learner._shared_ok


def test_lora_policy_with_its_base_as_reference(model_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = random_pairs(lora.config.vocab_size, n=4, seed=2)
    learner = assert_same_pass(lambda: copy.deepcopy(lora), None, tmp_path, batch, pad=1)
    assert learner.ref_model is None


def test_softcapped_model(tmp_path):
    """Gemma2: soft-capped logits (and attention scores), eager attention, scaled embeddings."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, final_logit_softcapping=2.0,
                          attn_logit_softcapping=5.0, pad_token_id=1, eos_token_id=0, bos_token_id=2)
    reference = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    base = moved(copy.deepcopy(reference).requires_grad_(True).train(), scale=0.05)
    learner = assert_same_pass(lambda: copy.deepcopy(base), reference, tmp_path, random_pairs(96, seed=3), pad=1)
    assert learner._hidden_path[id(learner.model)] is True  # the cap is applied on the chunked path


def test_sliding_window_longer_sequences_run_separately(model_path, tmp_path, caplog):
    """A sequence longer than the sliding window cannot share one mask with the full layers: that
    micro-batch runs as separate sequences, the rest shared; both equal the separate pass."""
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=12,
                           pad_token_id=1, eos_token_id=0, bos_token_id=2)
    reference = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    base = moved(copy.deepcopy(reference).requires_grad_(True).train())
    short = random_pairs(96, n=4, prompt=(3, 5), completion=(1, 6), seed=4)
    assert_same_pass(lambda: copy.deepcopy(base), reference, tmp_path, short, pad=1)
    long = random_pairs(96, n=3, prompt=(10, 14), completion=(4, 8), seed=5)
    with caplog.at_level(logging.WARNING, logger="odpo_vllm.learning.learner"):
        learner = Learner(copy.deepcopy(base), reference, make_args(tmp_path), 1, 1)
        assert isinstance(learner._layout(long), SeparateSequences)
        assert isinstance(learner._layout(short), SharedPromptRows)
    assert "sliding window (12)" in caplog.text


def test_more_than_two_completions_per_prompt(model_path, tmp_path):
    """k = 3 completions after one prompt give the logprobs and gradients of 3 separate sequences."""
    from transformers import AutoModelForCausalLM

    policy = moved(AutoModelForCausalLM.from_pretrained(model_path))
    learner = Learner(policy, None, make_args(tmp_path), 1, 1)
    batch = random_pairs(policy.config.vocab_size, n=4, seed=6)
    extra = random_pairs(policy.config.vocab_size, n=4, seed=7).chosen_ids
    samples = [[a, b, c] for a, b, c in zip(batch.chosen_ids, batch.rejected_ids, extra)]
    weights = torch.linspace(0.5, 1.5, 3 * len(batch))  # a different weight per sequence

    def run(layout):
        policy.zero_grad(set_to_none=True)
        logps, mask = learner.completion_logprobs(policy, layout)
        sums = (logps * mask).sum(1)
        (sums * weights).sum().backward()
        return sums.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}

    want, want_grads = run(separate_sequences(batch.prompt_ids, samples, 256, 1))
    rows = shared_prompt_rows(batch.prompt_ids, samples, 256, 1)
    separate = sum(3 * len(p) + sum(len(c) for c in s) for p, s in zip(batch.prompt_ids, samples))
    assert rows.num_tokens < separate  # the prompts once, and little padding
    got, got_grads = run(rows)
    close(got, want, "sequence logprobs")
    for name, grad in want_grads.items():
        close(got_grads[name], grad, name)


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_model_without_shared_prompt_support_falls_back_once(tmp_path, caplog, family):
    """Bloom fails on a 4D mask (it builds ALiBi from a 2D one); MPT takes the mask but its ALiBi
    ignores position ids, so the one-time probe finds its logprobs off. Either way: one log line
    saying why, and every pass then runs separate sequences with the same results."""
    from transformers import AutoModelForCausalLM, BloomConfig, MptConfig

    torch.manual_seed(0)
    if family == "bloom":
        config = BloomConfig(vocab_size=96, hidden_size=64, n_layer=2, n_head=2, pad_token_id=1, eos_token_id=0)
    else:
        config = MptConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=2, pad_token_id=1, eos_token_id=0)
    reference = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    base = moved(copy.deepcopy(reference).requires_grad_(True).train())
    batch = random_pairs(96, n=3, seed=8)
    results = []
    with caplog.at_level(logging.WARNING, logger="odpo_vllm.learning.learner"):
        for shared in (False, True):
            args = make_args(tmp_path, shared_prompt_passes=shared)
            learner, loss, sums, _, grads = pair_pass(copy.deepcopy(base), reference, args, batch, 1)
            learner._pair_pass(batch, 0.1, len(batch), train=False)  # a second pass: no second log line
            results.append((loss, grads))
    assert learner._shared_ok[id(learner.model)] is False
    lines = [r.getMessage() for r in caplog.records if "shared_prompt_passes" in r.getMessage()]
    assert len(lines) == 1 and type(reference).__name__ in lines[0], lines
    assert ("failed on a shared-prompt row" if family == "bloom" else "away from separate sequences") in lines[0]
    close(results[1][0], results[0][0], "loss")
    for name, grad in results[0][1].items():
        assert torch.equal(results[1][1][name], grad), name


def test_training_with_three_samples_matches_separate_sequences(model_path, tmp_path):
    """The trainer with k = 3 samples per prompt (best vs worst) and gradient checkpointing (its
    default): two steps with shared-prompt rows log the metrics and reach the weights of two steps
    with separate sequences."""
    from transformers import AutoModelForCausalLM

    from odpo_vllm import OnlineDPOTrainer, toy

    from conftest import train_rows

    runs = []
    for shared in (False, True):
        args = make_args(tmp_path, output_dir=tmp_path / f"shared{shared}", num_samples=3, max_steps=2,
                         shared_prompt_passes=shared, optim="sgd", learning_rate=0.5, gradient_checkpointing=True)
        trainer = OnlineDPOTrainer(AutoModelForCausalLM.from_pretrained(model_path), reward_funcs=toy.sentiment_reward,
                                   args=args, train_dataset=toy.prompt_dataset(8))
        trainer.train()
        assert all(trainer.learner._shared_ok.values()) and bool(trainer.learner._shared_ok) == shared
        runs.append((train_rows(trainer), {n: p.detach().clone() for n, p in trainer.model.named_parameters()}))
    (rows0, weights0), (rows1, weights1) = runs
    assert len(rows0) == len(rows1) == 2
    for row0, row1 in zip(rows0, rows1):
        for key in ("loss", "logps/chosen", "logps/rejected", "objective/scores"):
            assert row1[key] == pytest.approx(row0[key], rel=REL, abs=1e-6), key
    moved_by = max((weights1[n] - AutoModelForCausalLM.from_pretrained(model_path).state_dict()[n]).abs().max().item()
                   for n in ("model.layers.0.self_attn.q_proj.weight",))
    assert moved_by > 1e-4  # training did change the weights
    for name, value in weights0.items():
        close(weights1[name], value, name)
