"""The seeds benchmark's pieces (`benchmarks/bench_seeds.py`): the `bos-char` task's tokenizer and
model folder as issue 28 describes them, its character-level reward, and the paired comparison.
Cheap: no training run (the benchmark itself is not a test)."""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_seeds  # noqa: E402


def test_vowel_reward_is_the_vowel_share_of_ascii_letters():
    scores = bench_seeds.vowel_reward(None, ["a e a", "", "xyz", "Ab", "12 !", "éa"])
    assert scores == [1.0, 0.0, 0.0, 0.5, 0.0, 1.0]


def test_bos_char_task_is_a_qwen2_tokenizer_with_bos_and_a_padded_embedding(tmp_path):
    from transformers import AutoTokenizer

    from odpo_vllm.data import with_bos

    path = bench_seeds.build_task("bos-char", str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == 401
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert "<|endoftext|>" in tokenizer.get_vocab()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == 416
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    plain = tokenizer("Review the film:")["input_ids"]  # the Qwen2 class adds no BOS by itself
    assert plain[0] != tokenizer.bos_token_id
    assert with_bos(tokenizer, tokenizer("Review the film:", add_special_tokens=False)["input_ids"]) == [
        tokenizer.bos_token_id, *plain]


def test_paired_comparison_per_seed():
    trl = {0: (0.9, 0.0, 1.0), 1: (0.5, 0.0, 1.0), 2: (0.8, 0.0, 1.0)}
    ours = {0: (0.95, 0.0, 1.0), 1: (0.4, 0.0, 1.0), 2: (0.8, 0.0, 1.0), 3: (1.0, 0.0, 1.0)}  # seed 3: no TRL run
    diffs, mean, se, wins = bench_seeds.paired(ours, trl)
    assert [round(d, 6) for d in diffs] == [0.05, -0.1, 0.0]
    assert math.isclose(mean, -0.05 / 3) and wins == 2
    assert math.isclose(se, 0.076376261582597 / math.sqrt(3), rel_tol=1e-9)


def test_tail_rows_are_the_prompts_the_training_figure_averages():
    """`tail`'s prompts: the last fifth of the steps (as `last_fifth` cuts them) in ours' order."""
    steps, per_step = 24, bench_seeds.TASKS["sentiment"]["settings"]["per_device_train_batch_size"]
    rows = bench_seeds.TASKS["sentiment"]["prompts"]()
    order = bench_seeds.our_order("sentiment", 3, steps)
    tail = bench_seeds.tail_rows("sentiment", 3, steps)
    assert len(tail) == (steps // 5) * per_step
    assert tail == [rows[i] for i in order[-len(tail):]]
    assert tail != bench_seeds.tail_rows("sentiment", 4, steps)  # the seed draws the order


def test_per_prompt_reads_the_block_layout():
    # 3 prompts x 2 samples: sample j of prompt i at j * 3 + i
    assert bench_seeds._per_prompt([1.0, 2.0, 3.0, 3.0, 4.0, 5.0], 3, 2) == [2.0, 3.0, 4.0]
