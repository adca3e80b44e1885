"""`WinRateCallback` (TRL's former signature) and `--win_rate`: the policy's completions of the
evaluation prompts against the starting policy's, judged pairwise (a judge, a reward callable or
the run's own rewards), ties half, the order shown to a judge shuffled."""

from __future__ import annotations

import pytest
from conftest import make_args

from odpo_vllm import OnlineDPOTrainer, PairwiseJudge, WinRateCallback, toy
from odpo_vllm.run.win_rate import outcomes_from_judge


def test_a_judge_sees_pairs_in_shuffled_order_and_its_verdicts_are_read_back():
    seen = []

    def longer_wins(prompts, pairs):  # index of the longer completion; a tie when equally long
        seen.extend(pairs)
        return [-1 if len(a) == len(b) else int(len(b) > len(a)) for a, b in pairs]

    policy = ["long answer", "x", "same", "longer still", "y"]
    reference = ["short", "much longer", "same", "z", "yy"]
    outcomes = outcomes_from_judge(PairwiseJudge(longer_wins), ["p"] * 5, policy, reference, True, seed=0)
    assert outcomes == [1.0, 0.0, 0.5, 1.0, 0.0]
    assert any(pair[0] in reference for pair in seen)  # some pairs were shown reference first
    assert outcomes_from_judge(PairwiseJudge(longer_wins), ["p"] * 5, policy, reference, False, seed=0) == outcomes
    with pytest.raises(ValueError, match=r"the judge returned 2 for pair 0"):
        outcomes_from_judge(PairwiseJudge(lambda p, pairs: [2] * len(pairs)), ["p"], ["a"], ["b"], True, seed=0)


@pytest.mark.vllm
def test_win_rate_is_one_half_at_the_start_and_rises_as_the_policy_learns(model_path, tmp_path):
    args = make_args(tmp_path, use_vllm=True, max_steps=40, per_device_train_batch_size=8, max_new_tokens=16,
                     lr_scheduler_type="constant", eval_strategy="steps", eval_steps=20, per_device_eval_batch_size=8)
    trainer = OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                               train_dataset=toy.prompt_dataset(64), eval_dataset=toy.prompt_dataset(16, seed=1))
    win_rate = WinRateCallback(None, trainer)  # judged by the run's own reward
    trainer.add_callback(win_rate)
    with pytest.raises(RuntimeError, match="no reference completions yet"):
        win_rate.evaluate()
    win_rate.on_train_begin(args, trainer.state, trainer.control)  # what train() calls first
    assert win_rate.evaluate() == 0.5  # the same weights and seed: every pair ties
    trainer.train()
    rates = [row["eval_win_rate"] for row in trainer.state.log_history if "eval_win_rate" in row]
    assert len(rates) == 2 and 0.5 <= rates[0] < rates[1] and rates[1] > 0.75, rates  # measured: 0.59, 1.0
    assert win_rate.evaluate() == rates[1]  # the same weights give the same rate
    trainer.close()


def test_win_rate_flag_needs_an_evaluation(tmp_path):
    from odpo_vllm.train import parse_args

    with pytest.raises(SystemExit, match=r"--win_rate: the win rate is measured at evaluations; add --eval_strategy"):
        parse_args(["--model_name_or_path", "m", "--dataset_name", "d", "--reward_funcs", "a:b", "--output_dir",
                    str(tmp_path), "--win_rate"])
