"""`python -m odpo_vllm.demo --real`'s own code (held-out prompts answered before and after with
the same seed, scored, shown side by side, written to held_out.json), on a tiny Llama instead of
SmolLM2 so it runs in seconds; tests/test_smollm2.py trains the real model."""

from __future__ import annotations

import json

import pytest
from tiny_gguf import tiny_llama

from odpo_vllm import real_demo, real_task

pytestmark = [pytest.mark.timeout(600), pytest.mark.vllm]


def test_real_demo_scores_held_out_prompts_before_and_after(tmp_path, capsys):
    model = tiny_llama(tmp_path / "model")
    # learning rate 0: the weights after training are the weights before, so with the same
    # sampling seed the held-out replies must come back identical (only the weights may differ)
    result = real_demo.main(str(tmp_path / "demo"), 2, keep=False, model=model,
                            extra=["--learning_rate", "0", "--max_new_tokens", "8", "--disable_tqdm", "true"])
    replies = result["replies"]
    assert len(replies) == len(real_task.held_out_prompts()) == 64
    assert [r["after"] for r in replies] == [r["before"] for r in replies]
    assert any(r["before"].strip() for r in replies)
    assert [r["reward_before"] for r in replies] == real_task.vader_scores([r["before"] for r in replies])
    assert result["held_out_before"] == pytest.approx(sum(r["reward_before"] for r in replies) / 64)
    with open(tmp_path / "demo" / "held_out.json") as f:
        assert json.load(f)["replies"] == replies
    shown = capsys.readouterr().out
    assert "held-out reward (64 prompts, mean VADER)" in shown
    # the same replies before and after: every pair ties
    assert result["win_rate"] == 0.5 and "win rate of the trained model over the starting one: 0.50" in shown
    assert "64 tied, 0 lost" in shown
    assert shown.count("  |  after (reward") == 3  # three held-out prompts side by side
    assert (tmp_path / "demo" / "train" / "metrics.jsonl").exists()


def test_examples_shown_are_those_nearest_the_median_change():
    rows = real_task.held_out_prompts()[:8]
    before = [0.0] * 8
    after = [0.9, 0.1, 0.5, 0.45, 0.55, -0.2, 0.48, 0.6]  # changes; the (upper) median is 0.5
    shown = real_demo.typical_examples(rows, before, after)

    def topic(i):
        return next(t for t in real_task.HELD_OUT_TOPICS if t in rows[i]["prompt"][-1]["content"])

    expected, seen = [], set()
    for i in sorted(range(8), key=lambda i: abs(after[i] - 0.5)):  # nearest first, one per topic
        if topic(i) not in seen and len(expected) < 3:
            expected.append(i)
            seen.add(topic(i))
    assert shown == expected and shown[0] == 2 and 0 not in shown and 5 not in shown
