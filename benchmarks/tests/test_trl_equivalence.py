"""The TRL equivalence harness (`benchmarks/trl_equivalence.py`) finds what it is built to find: on an
aligned configuration it reports no divergence, and each divergence injected into odpo_vllm (the loss,
the EOS cut, the tie rule, the learning rate) is reported at its step and kind, with the other kinds
still equal; a BOS tokenizer gives the one expected divergence, and `trl_bos` removes it.

Teacher-forced on the harness's synthetic rows (EOS in half the rows, ids after it), 3 steps; TRL runs
once per configuration (module fixtures), ours once per injection. `python -m pytest -q
benchmarks/tests/test_trl_equivalence.py` (the bench extra: trl installed).
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("trl", reason="the bench extra (trl) is not installed")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/

import torch  # noqa: E402

import trl_equivalence as te  # noqa: E402

RTOL = 1e-4  # no rounding control run here: 3 steps stay well within it
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trl_equivalence"))


@pytest.fixture(scope="module")
def text_run(folder):
    """(task, synthetic rows, TRL's trace on them) for plain-text prompts, no BOS, unpadded vocabulary."""
    task = te.Task(name="text", steps=STEPS, folder=folder)
    rows = te.synthetic_rows(task)
    return task, rows, te.run_trl(task, replay=rows)


def diverged(divergences) -> dict[str, int]:
    return {kind: d.step for kind, d in divergences.items() if not d.ok}


def test_aligned_config_reports_no_unexplained_divergence(text_run):
    task, rows, trl = text_run
    ours = te.run_ours(task, replay=rows)
    divergences = te.compare(trl, ours, RTOL)
    assert te.unexplained(divergences) == []
    # every kind was compared (the hooks saw each quantity), and they are equal
    assert all(d.compared > 0 for d in divergences.values()), {k: d.compared for k, d in divergences.items()}
    # the one known difference: TRL hands reward functions the rows padded to the batch's width
    assert set(diverged(divergences)) <= {"rf_ids"}
    assert divergences["rf_ids"].ok or divergences["rf_ids"].note == te.RF_PAD_NOTE
    # the synthetic rows exercise EOS cuts, both with and without EOS
    eos = [r for step in rows for r in step]
    assert 0 < sum(1 for r in eos if 0 in r) < len(eos)  # id 0 is the toy EOS (<|endoftext|>)


def test_injected_loss_scale_is_found_at_step_0(text_run):
    from odpo_vllm.learning import learner

    task, rows, trl = text_run
    original = learner.dpo_loss
    ours = te.run_ours(task, replay=rows, patches=[(learner, "dpo_loss", lambda *a, **k: original(*a, **k) * 1.01)])
    found = te.compare(trl, ours, RTOL)
    assert found["loss"].step == 0 and "rel 1.0e-02" in found["loss"].size
    assert found["grad_norm"].step == 0
    assert found["logp"].ok and found["ref_logp"].ok and found["completion"].ok  # before the loss: equal
    assert "loss" in te.unexplained(found)


def test_injected_eos_cut_is_found_in_completions(text_run):
    from odpo_vllm.core import batches

    task, rows, trl = text_run

    def drops_eos(ids, eos_ids):  # a bug: the EOS is not kept
        for position, token in enumerate(ids):
            if token in eos_ids:
                return list(ids[:position]), True
        return list(ids), False

    ours = te.run_ours(task, replay=rows, patches=[(batches, "truncate_after_eos", drops_eos)])
    found = te.compare(trl, ours, RTOL)
    assert found["completion"].step == 0 and "completion" in te.unexplained(found)
    assert found["text"].ok  # EOS is a special token: the decoded texts are the same
    assert found["logp"].step == 0


def test_injected_tie_rule_is_found_in_pairs(text_run):
    from odpo_vllm.sampling import pairing

    task, rows, trl = text_run
    original = pairing.select_pairs

    def later_sample_wins_ties(scores, num_prompts, num_samples):
        chosen, rejected = original(scores, num_prompts, num_samples)
        tie = scores[:num_prompts] == scores[num_prompts:]
        return torch.where(tie, rejected, chosen), torch.where(tie, chosen, rejected)

    ours = te.run_ours(task, replay=rows, patches=[(pairing, "select_pairs", later_sample_wins_ties)])
    found = te.compare(trl, ours, RTOL)
    ties = [s for s, step in enumerate(trl.steps)
            if any(a == b for a, b in zip(step.rewards[:4], step.rewards[4:]))]
    assert ties, "the synthetic rows should give tied rewards (no 'e' in either completion)"
    assert found["pairs"].step == ties[0]
    assert found["rewards"].ok and found["completion"].ok


def test_injected_learning_rate_is_found(text_run):
    from odpo_vllm.learning import learner

    task, rows, trl = text_run
    original = learner.build_scheduler

    def half_lr(optimizer, args, num_training_steps):
        for group in optimizer.param_groups:
            group["lr"] *= 0.5
            group["initial_lr"] = group["lr"]
        return original(optimizer, args, num_training_steps)

    ours = te.run_ours(task, replay=rows, patches=[(learner, "build_scheduler", half_lr)])
    found = te.compare(trl, ours, RTOL)
    assert found["lr"].step == 0 and found["update"].step == 0
    # step 0's loss and gradient come before the learning rate acts; from step 1 the weights differ
    assert found["grad"].step == 1 and found["loss"].step == 1 and found["completion"].ok


def test_bos_tokenizer_gives_the_expected_divergence_and_trl_bos_removes_it(folder):
    task = te.Task(name="padded-bos", steps=2, bos=True, vocab_rows=te.PADDED_ROWS, folder=folder)
    rows = te.synthetic_rows(task)
    assert max(t for step in rows for r in step for t in r) >= 401  # ids the tokenizer cannot decode
    ours = te.run_ours(task, replay=rows)
    bos = ours.steps[0].prompt_ids[0][0]

    skipped = te.compare(te.run_trl(task, replay=rows), ours, RTOL, bos_token_id=bos)
    assert skipped["prompt_ids"].step == 0 and skipped["prompt_ids"].note == te.BOS_NOTE
    assert not skipped["logp"].ok  # the model sees other prompts
    assert te.unexplained(skipped) == [] and te.explain(skipped).startswith("BOS")

    applied = te.compare(te.run_trl(te.Task(**{**task.__dict__, "trl_bos": True}), replay=rows), ours, RTOL,
                         bos_token_id=bos)
    assert te.unexplained(applied) == [] and set(diverged(applied)) <= {"rf_ids"}


def test_truncation_rule_difference_is_reported(folder):
    """TRL cuts every prompt by the batch's padded widths, ours each sequence by its own length: with
    completions that end early and a binding max_length, the logprob pass sees other prompt tokens."""
    task = te.Task(name="truncation", steps=1, max_length=10, folder=folder)
    rows = te.synthetic_rows(task)
    found = te.compare(te.run_trl(task, replay=rows), te.run_ours(task, replay=rows), RTOL)
    assert found["model_in"].step == 0 and found["model_in"].note == te.TRUNC_NOTE
    assert te.unexplained(found) == [] and "truncation rule" in te.explain(found)
    assert found["prompt_ids"].ok and found["completion"].ok


def test_truncation_rule_is_recognised_only_as_a_left_cut():
    assert te.is_truncation_difference([[7, 8], [5]], [[6, 7, 8], [5]])
    assert not te.is_truncation_difference([[7, 9]], [[6, 7, 8]])  # not a tail: unexplained
    assert not te.is_truncation_difference([[7, 8]], [[7, 8]])


def test_relative_error_and_bos_rule():
    assert te.relative_error([1.0, -2.0], [1.0, -2.0]) == 0.0
    assert te.relative_error([1.0, -2.0], [1.0, -2.002]) == pytest.approx(1e-3)
    assert te.relative_error([3.0, 4.0], [3.0, 4.5], l2=True) == pytest.approx(0.1)
    assert te.is_bos_difference([[5, 6]], [[9, 5, 6]], 9)
    assert not te.is_bos_difference([[5, 6]], [[9, 5, 7]], 9)
    assert not te.is_bos_difference([[5, 6]], [[5, 6]], 9)
