"""The pure math of Online DPO against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from odpo_vllm.core.objective import (
    apply_missing_eos_penalty,
    beta_for_epoch,
    dpo_loss,
    policy_metrics,
    score_metrics,
    select_pairs,
    truncate_after_eos,
)
from odpo_vllm.core.sequences import logprobs_from_logits, separate_sequences, token_logprobs, truncate


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------------------------- loss
class TestDpoLoss:
    def test_sigmoid_hand_values(self):
        # pair 0: h = (-1 - -3) - (-2 - -2) = 2, beta*h = 1 -> -log sigmoid(1) = log(1 + e^-1)
        # pair 1: h = (-4 - -3) - (-1 - -1) = -1, beta*h = -0.5 -> log(1 + e^0.5)
        # pair 2: h = 0 -> log 2
        loss = dpo_loss(t(-1.0, -4.0, -7.0), t(-3.0, -3.0, -5.0), t(-2.0, -1.0, -6.0), t(-2.0, -1.0, -4.0),
                        beta=0.5, loss_type="sigmoid")
        expected = t(0.31326168751822286, 0.9740769841801067, 0.6931471805599453)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)

    def test_sigmoid_is_default(self):
        a = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
        assert a.item() == pytest.approx(0.31326168751822286, abs=1e-6)

    def test_ipo_hand_values(self):
        # beta = 0.5 -> target 1/(2*0.5) = 1
        # h = 2 -> (2 - 1)^2 = 1 ; h = -1 -> (-1 - 1)^2 = 4 ; h = 0 -> 1
        loss = dpo_loss(t(-1.0, -4.0, -7.0), t(-3.0, -3.0, -5.0), t(-2.0, -1.0, -6.0), t(-2.0, -1.0, -4.0),
                        beta=0.5, loss_type="ipo")
        torch.testing.assert_close(loss, t(1.0, 4.0, 1.0), rtol=0, atol=1e-6)

    def test_ipo_small_beta(self):
        # beta = 0.1 -> target 5; h = 0 -> 25; h = 5 -> 0
        loss = dpo_loss(t(0.0, 5.0), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.1, loss_type="ipo")
        torch.testing.assert_close(loss, t(25.0, 0.0), rtol=0, atol=1e-5)

    def test_reference_enters_with_opposite_sign(self):
        # Same policy margin, the reference already prefers chosen by 2 -> h = 0 -> log 2
        loss = dpo_loss(t(-1.0), t(-3.0), t(-1.0), t(-3.0), beta=1.0)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)

    def test_gradient_pushes_chosen_up(self):
        chosen = torch.tensor([-2.0], requires_grad=True)
        rejected = torch.tensor([-2.0], requires_grad=True)
        dpo_loss(chosen, rejected, t(-2.0), t(-2.0), beta=0.1).sum().backward()
        # d/dc -log sigmoid(beta (c - r)) at 0 = -beta * sigmoid(0) = -0.05
        assert chosen.grad.item() == pytest.approx(-0.05, abs=1e-6)
        assert rejected.grad.item() == pytest.approx(0.05, abs=1e-6)

    def test_unknown_loss_type_raises(self):
        with pytest.raises(ValueError, match="loss_type"):
            dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, loss_type="hinge")


# ------------------------------------------------------------------------------------- pairs
class TestSelectPairs:
    def test_block_layout_k2(self):
        # B=3, k=2; row j*B + i is sample j of prompt i
        # prompt 0: samples (1, 3) -> chosen sample 1 (row 3), rejected sample 0 (row 0)
        # prompt 1: samples (5, 4) -> chosen sample 0 (row 1), rejected sample 1 (row 4)
        # prompt 2: samples (2, 2) tie -> chosen sample 0 (row 2), rejected sample 1 (row 5)
        scores = t(1.0, 5.0, 2.0, 3.0, 4.0, 2.0)
        chosen, rejected = select_pairs(scores, num_prompts=3, num_samples=2)
        assert chosen.tolist() == [3, 1, 2]
        assert rejected.tolist() == [0, 4, 5]

    def test_tie_chooses_first_sample(self):
        chosen, rejected = select_pairs(t(0.5, 0.5), num_prompts=1, num_samples=2)
        assert chosen.tolist() == [0] and rejected.tolist() == [1]

    def test_k4_best_vs_worst(self):
        # B=2, k=4. prompt 0 samples (0.5, 2.0, -1.0, 2.0): best = sample 1 (first of the tie) -> row 2,
        #   worst = sample 2 -> row 4.
        # prompt 1 samples (3, 3, 1, 1): best = sample 0 -> row 1; worst = last minimum, sample 3 -> row 7.
        scores = t(0.5, 3.0, 2.0, 3.0, -1.0, 1.0, 2.0, 1.0)
        chosen, rejected = select_pairs(scores, num_prompts=2, num_samples=4)
        assert chosen.tolist() == [2, 1]
        assert rejected.tolist() == [4, 7]

    @pytest.mark.parametrize("k", [2, 3, 4])
    def test_all_equal_row_gives_distinct_rows(self, k):
        # B=2, prompt 0 all equal, prompt 1 strictly increasing in the sample index
        scores = torch.tensor([v for j in range(k) for v in (7.0, float(j))])
        chosen, rejected = select_pairs(scores, num_prompts=2, num_samples=k)
        assert chosen[0].item() == 0  # first sample of prompt 0
        assert rejected[0].item() == (k - 1) * 2  # last sample of prompt 0
        assert chosen[1].item() == (k - 1) * 2 + 1  # best: last sample of prompt 1
        assert rejected[1].item() == 1  # worst: first sample of prompt 1
        assert (chosen != rejected).all()

    def test_chosen_score_never_below_rejected(self):
        generator = torch.Generator().manual_seed(0)
        scores = torch.randint(0, 3, (5 * 6,), generator=generator).float()  # many ties
        chosen, rejected = select_pairs(scores, num_prompts=6, num_samples=5)
        assert (scores[chosen] >= scores[rejected]).all()
        assert (chosen != rejected).all()
        assert ((chosen % 6) == torch.arange(6)).all() and ((rejected % 6) == torch.arange(6)).all()

    def test_wrong_number_of_scores_raises(self):
        with pytest.raises(ValueError):
            select_pairs(t(1.0, 2.0, 3.0), num_prompts=2, num_samples=2)

    def test_one_sample_raises(self):
        with pytest.raises(ValueError):
            select_pairs(t(1.0, 2.0), num_prompts=2, num_samples=1)


# ------------------------------------------------------------------------------------- completions
class TestCompletions:
    def test_truncate_after_first_eos_keeps_it(self):
        assert truncate_after_eos([5, 6, 2, 7, 2], {2}) == ([5, 6, 2], True)

    def test_truncate_no_eos(self):
        assert truncate_after_eos([5, 6, 7], {2}) == ([5, 6, 7], False)

    def test_truncate_several_eos_ids(self):
        assert truncate_after_eos([5, 9, 2, 4], {2, 9}) == ([5, 9], True)

    def test_truncate_eos_first_and_empty(self):
        assert truncate_after_eos([2, 1, 1], {2}) == ([2], True)
        assert truncate_after_eos([], {2}) == ([], False)

    def test_missing_eos_penalty(self):
        scores = t(1.0, 2.0, 3.0)
        out = apply_missing_eos_penalty(scores, torch.tensor([True, False, False]), 0.5)
        torch.testing.assert_close(out, t(1.0, 1.5, 2.5))

    def test_missing_eos_penalty_accepts_int_mask(self):
        out = apply_missing_eos_penalty(t(0.0, 0.0), torch.tensor([0, 1]), 2.0)
        torch.testing.assert_close(out, t(-2.0, 0.0))

    def test_no_penalty(self):
        scores = t(1.0, 2.0)
        torch.testing.assert_close(apply_missing_eos_penalty(scores, torch.tensor([False, False]), None), scores)
        torch.testing.assert_close(apply_missing_eos_penalty(scores, torch.tensor([False, False]), 0.0), scores)


# ------------------------------------------------------------------------------------- beta
class TestBeta:
    def test_scalar(self):
        assert beta_for_epoch(0.1, 0) == 0.1
        assert beta_for_epoch(0.1, 7.5) == 0.1

    def test_list_one_value_per_epoch_then_last(self):
        betas = [0.1, 0.05, 0.01]
        assert beta_for_epoch(betas, 0) == 0.1
        assert beta_for_epoch(betas, 0.99) == 0.1
        assert beta_for_epoch(betas, 1) == 0.05
        assert beta_for_epoch(betas, 1.5) == 0.05
        assert beta_for_epoch(betas, 2) == 0.01
        assert beta_for_epoch(betas, 3) == 0.01
        assert beta_for_epoch(betas, 100) == 0.01

    def test_single_element_list(self):
        assert beta_for_epoch([0.2], 0) == 0.2
        assert beta_for_epoch([0.2], 4) == 0.2


# ------------------------------------------------------------------------------------- separate sequences
class TestSeparateSequences:
    def test_truncation_keeps_the_completion_and_cuts_the_prompt_from_the_left(self):
        assert truncate([1, 2, 3, 4, 5], [10, 11, 12], 6) == ([3, 4, 5], [10, 11, 12])
        assert truncate([1, 2], [3, 4, 5, 6], 3) == ([], [3, 4, 5])
        assert truncate([1, 2], [3], 10) == ([1, 2], [3])

    def test_left_truncates_prompt_and_masks(self):
        layout = separate_sequences([[1, 2, 3, 4, 5], [6, 7]], [[[10, 11, 12]], [[13]]], max_length=6, pad_token_id=0)
        assert layout.input_ids.tolist() == [[3, 4, 5, 10, 11, 12], [6, 7, 13, 0, 0, 0]]
        assert layout.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
        assert layout.completion_mask().tolist() == [[1, 1, 1], [1, 0, 0]]
        # completion token t of row s is predicted by the column before it
        assert list(zip(layout.rows.tolist(), layout.cols.tolist(), layout.targets.tolist())) == [
            (0, 2, 10), (0, 3, 11), (0, 4, 12), (1, 1, 13)]
        assert layout.num_truncated_prompts == 1

    def test_rows_in_block_layout(self):
        # 2 prompts x 2 completions: row j * 2 + g holds completion j of prompt g
        layout = separate_sequences([[1], [2]], [[[3], [4]], [[5], [6]]], max_length=10, pad_token_id=0)
        assert layout.input_ids.tolist() == [[1, 3], [2, 5], [1, 4], [2, 6]]
        assert layout.num_truncated_prompts == 0 and layout.input_ids.dtype == torch.long
        assert set(layout.model_inputs()) == {"input_ids", "attention_mask"}

    def test_prompt_dropped_when_completion_fills_max_length(self):
        layout = separate_sequences([[1, 2]], [[[3, 4, 5, 6]]], max_length=3, pad_token_id=0)
        assert layout.input_ids.tolist() == [[3, 4, 5]]
        assert layout.completion_mask().tolist() == [[0, 1, 1]]  # nothing predicts the first token
        assert layout.num_truncated_prompts == 1

    def test_length_mismatch_raises(self):
        with pytest.raises(ValueError):
            separate_sequences([[1]], [[[2]], [[3]]], max_length=4, pad_token_id=0)


# ------------------------------------------------------------------------------------- logprobs
class TestLogprobsFromLogits:
    PROMPTS, COMPLETIONS = [[1, 2, 3], [4], [5, 6]], [[[7, 8]], [[9, 1, 2]], [[3]]]

    def _case(self, vocab=11, seed=0):
        layout = separate_sequences(self.PROMPTS, self.COMPLETIONS, max_length=8, pad_token_id=0)
        logits = torch.randn(*layout.input_ids.shape, vocab, generator=torch.Generator().manual_seed(seed)) * 3
        return layout, logits

    def _by_hand(self, logits):
        """(S, C) log-softmax in float64 at each completion token, indexed from the token lists alone."""
        expected = torch.zeros(3, 3, dtype=torch.float64)
        for s, (prompt, [completion]) in enumerate(zip(self.PROMPTS, self.COMPLETIONS)):
            for t, token in enumerate(completion):
                expected[s, t] = torch.log_softmax(logits[s, len(prompt) + t - 1].double(), dim=-1)[token]
        return expected

    def test_matches_direct_log_softmax_and_zeroes_the_rest(self):
        layout, logits = self._case()
        logps, mask = logprobs_from_logits(logits, layout)
        assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
        assert logps.dtype == torch.float32
        torch.testing.assert_close(logps.double(), self._by_hand(logits), rtol=0, atol=1e-5)
        assert (logps[mask == 0] == 0).all()

    def test_chunking_invariance(self):
        layout, logits = self._case()
        one, _ = logprobs_from_logits(logits, layout, chunk_tokens=1)
        three, _ = logprobs_from_logits(logits, layout, chunk_tokens=3)
        all_tokens, _ = logprobs_from_logits(logits, layout, chunk_tokens=100)
        torch.testing.assert_close(one, all_tokens, rtol=0, atol=0)
        torch.testing.assert_close(three, all_tokens, rtol=0, atol=0)
        with pytest.raises(ValueError, match="chunk_tokens"):
            logprobs_from_logits(logits, layout, chunk_tokens=0)

    def test_next_token_logprobs_of_a_whole_sequence_are_those_of_the_gather(self):
        # the probe's scoring (`token_logprobs`) and the pass's agree: every token after the first
        ids = [5, 9, 1, 7, 3]
        layout = separate_sequences([ids[:1]], [[ids[1:]]], max_length=8, pad_token_id=0)
        logits = torch.randn(1, 5, 11, generator=torch.Generator().manual_seed(2)) * 3
        torch.testing.assert_close(token_logprobs(logits, torch.tensor([ids])), logprobs_from_logits(logits, layout)[0],
                                   rtol=0, atol=0)

    def test_low_precision_logits_are_normalised_in_fp32(self):
        # a log-softmax in bf16 is off by up to ~5e-2 at this scale; the one in fp32 by ~1e-6
        layout, logits = self._case(vocab=50)
        logits = logits.to(torch.bfloat16)
        logps, _ = logprobs_from_logits(logits, layout)
        assert logps.dtype == torch.float32
        torch.testing.assert_close(logps.double(), self._by_hand(logits), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- metrics
class TestPolicyMetrics:
    # One pair: row 0 chosen, row 1 rejected, 3 token positions.
    MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])

    def _metrics(self, pad_policy=(0.0, 0.0, 0.0), pad_ref=(0.0, 0.0, 0.0), beta=0.5):
        policy = torch.tensor([[-1.0, -2.0, pad_policy[0]], [-0.5, pad_policy[1], pad_policy[2]]])
        ref = torch.tensor([[-1.5, -1.0, pad_ref[0]], [-2.0, pad_ref[1], pad_ref[2]]])
        return policy_metrics(policy, ref, self.MASK, num_pairs=1, beta=beta)

    def test_hand_values(self):
        m = self._metrics()
        # sequence sums over real tokens: policy chosen -3, rejected -0.5; ref chosen -2.5, rejected -2
        # kl chosen = -0.5, kl rejected = 1.5 -> per pair mean 0.5
        assert m["objective/kl"].item() == pytest.approx(0.5)
        # entropy estimate = -(mean of the two policy sums) = -(-3 - 0.5) / 2
        assert m["objective/entropy"].item() == pytest.approx(1.75)
        assert m["objective/non_score_reward"].item() == pytest.approx(-0.25)  # -beta * kl, the reference's sign
        assert m["rewards/chosen"].item() == pytest.approx(-0.25)  # 0.5 * (-3 - -2.5)
        assert m["rewards/rejected"].item() == pytest.approx(0.75)  # 0.5 * (-0.5 - -2)
        assert m["rewards/accuracies"].item() == 0.0
        assert m["rewards/margins"].item() == pytest.approx(-1.0)
        assert m["logps/chosen"].item() == pytest.approx(-3.0)
        assert m["logps/rejected"].item() == pytest.approx(-0.5)

    def test_padding_values_never_count(self):
        clean = self._metrics()
        dirty = self._metrics(pad_policy=(1e6, -1e9, 7.0), pad_ref=(-1e6, 3e8, -123.0))
        for key in clean:
            assert dirty[key].item() == pytest.approx(clean[key].item(), abs=1e-6), key

    def test_sums_over_pairs(self):
        # two pairs: the second is the first shifted so its rewards/accuracy differ
        policy = torch.tensor([[-1.0, -2.0], [-0.2, -0.3], [-0.5, 0.0], [-4.0, -4.0]])
        ref = torch.tensor([[-1.5, -1.0], [-1.0, -1.0], [-2.0, 0.0], [-1.0, -1.0]])
        mask = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]])
        m = policy_metrics(policy, ref, mask, num_pairs=2, beta=1.0)
        # pair 0: chosen (-3 vs -2.5) reward -0.5; rejected (-0.5 vs -2) reward 1.5
        # pair 1: chosen (-0.5 vs -2) reward 1.5; rejected (-8 vs -2) reward -6
        assert m["rewards/chosen"].item() == pytest.approx(1.0)
        assert m["rewards/rejected"].item() == pytest.approx(-4.5)
        assert m["rewards/accuracies"].item() == 1.0  # only pair 1
        assert m["rewards/margins"].item() == pytest.approx(-2.0 + 7.5)
        # kl: pair 0 (-0.5 + 1.5)/2 = 0.5 ; pair 1 (1.5 + -6)/2 = -2.25
        assert m["objective/kl"].item() == pytest.approx(-1.75)
        assert m["logps/chosen"].item() == pytest.approx(-3.5)
        assert m["logps/rejected"].item() == pytest.approx(-8.5)


def test_score_metrics_hand_values():
    # B=2, k=2: prompt 0 samples (1, 3), prompt 1 samples (2, 4)
    scores = t(1.0, 2.0, 3.0, 4.0)
    chosen, rejected = select_pairs(scores, 2, 2)
    m = score_metrics(scores, chosen, rejected, torch.tensor([True, False, False, False]))
    assert m["objective/scores"] == pytest.approx(2.5)
    assert m["objective/scores_margin"] == pytest.approx(2.0)
    assert m["val/contain_eos_token"] == pytest.approx(0.25)


def test_rlhf_reward_is_score_plus_non_score_reward():
    from odpo_vllm.core.objective import non_score_reward, rlhf_reward

    kl = torch.tensor([2.0, 0.0, -1.0])
    assert non_score_reward(kl, 0.1).tolist() == pytest.approx([-0.2, 0.0, 0.1])
    # scores mean 1.5, KL mean 0.4, beta 0.5: 1.5 + (-0.2) = 1.3 = score - beta * KL
    assert rlhf_reward(torch.tensor([1.0, 2.0]), non_score_reward(torch.tensor(0.4), 0.5).item()) == pytest.approx(1.3)


def test_sample_logprob_gap_compares_the_tokens_both_sides_have():
    from odpo_vllm.core.objective import sample_logprob_gap

    # 2 pairs: rows chosen_0, chosen_1, rejected_0, rejected_1; 3 completion columns
    policy = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    sampler = [[-1.5, -2.0],        # |0.5|, |0| -> 0.25
               [-0.5, -9.0],        # a token the learner does not see (cut): only the first -> 0
               [-1.0, -1.0, -0.7],  # -> 0.1
               []]                  # nothing to compare -> 0
    gap = sample_logprob_gap(policy, mask, sampler, num_pairs=2)
    assert gap.item() == pytest.approx((0.25 + 0.1) / 2 + (0.0 + 0.0) / 2)
    assert sample_logprob_gap(policy, mask, [[-1.0, -2.0], [-0.5], [-1.0] * 3, []], 2).item() == 0.0
