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
    assert shown.count("  |  after (reward") == 3  # three held-out prompts side by side
    assert (tmp_path / "demo" / "train" / "metrics.jsonl").exists()
