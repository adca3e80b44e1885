"""The real-model bench's prompt builders (`benchmarks/real_shapes.py`): TL;DR-like prompts are
~400 tokens of real English laid out as TRL's TL;DR data; chat prompts are the real task's rows.
Cheap: no model, no trainer (SmolLM2's tokenizer is used where its converted folder exists)."""

from __future__ import annotations

import os
import re
import sys
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import real_shapes  # noqa: E402

LAYOUT = re.compile(r"SUBREDDIT: r/\w+\n\nTITLE: .+\n\nPOST: (.+)\n\nTL;DR:", re.S)


def _smollm2_counter():
    """SmolLM2's tokenizer from the converted folder in the cache, if one is there (no conversion here)."""
    from odpo_vllm.models.gguf import cache_root

    root = cache_root()
    folders = [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("SmolLM2-135M") and
               os.path.isfile(os.path.join(root, d, "tokenizer.json"))] if os.path.isdir(root) else []
    if not folders:
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(folders[0], "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize("counter", ["rough", "smollm2"])
def test_tldr_prompts_are_about_400_tokens_of_real_text(counter):
    count = real_shapes.rough_tokens if counter == "rough" else _smollm2_counter()
    if count is None:
        pytest.skip("SmolLM2's converted folder is not here (odpo_vllm.models.packaged.smollm2() makes it)")
    rows = real_shapes.tldr_prompts(16, count, target=400)
    assert len(rows) == 16 and len({r["prompt"] for r in rows}) == 16
    source = " ".join(" ".join(sentences) for _, sentences in real_shapes.doc_sections())
    words = Counter()
    for row in rows:
        prompt = row["prompt"]
        assert 340 <= count(prompt) <= 400, count(prompt)
        post = LAYOUT.fullmatch(prompt).group(1)
        # every sentence of the post is a sentence of Python's reference manual, verbatim
        sentences = real_shapes.split_sentences(post)
        assert len(sentences) >= 8
        assert all(s in source for s in sentences)
        words.update(w.lower() for w in re.findall(r"[A-Za-z]+", post))
    total = sum(words.values())
    # English, not word salad: function words at their usual rates, a varied vocabulary
    assert words["the"] / total > 0.04
    assert sum(words[w] for w in ("a", "of", "is", "to", "and", "in")) / total > 0.1
    assert len(words) > 500


def test_chat_prompts_are_the_real_task_rows():
    from odpo_vllm import real_task

    rows = real_shapes.chat_prompts(20)
    assert rows == real_task.train_prompts()[:20]
    assert all(r["prompt"][0]["role"] == "user" for r in rows)
