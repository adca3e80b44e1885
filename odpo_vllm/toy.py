"""A toy world for offline demos and tests: a tiny model and tokenizer built locally, generated
prompts, and a programmatic reward where preference learning shows within minutes on a CPU.

The task: prompts ask for a review; the reward is the share of sentiment words in the
completion that are positive minus the share that are negative. A randomly initialised model
starts near zero, and Online DPO learns to emit the positive words.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

POSITIVE = ["good", "great", "happy", "love", "fun", "nice", "bright", "kind", "warm", "best"]
NEGATIVE = ["bad", "sad", "boring", "awful", "dull", "cold", "worst", "slow", "ugly", "weak"]
NEUTRAL = [
    "the", "a", "film", "book", "song", "it", "was", "is", "and", "very", "plot", "story", "show",
    "cast", "music", "ending", "day", "we", "they", "felt", "this", "that", "so", "really", "quite",
]
SUBJECTS = ["film", "book", "song", "show", "play", "game", "album", "meal", "trip", "class"]
EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def sentiment_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """Positive minus negative sentiment words found in each completion, per 8 characters.

    Words are counted as substrings, so "goodfun" counts twice: a dense signal that a randomly
    initialised model can climb from its first steps.
    """
    scores = []
    for completion in completions:
        text = (completion if isinstance(completion, str) else completion[-1]["content"]).lower()
        hits = sum(text.count(w) for w in POSITIVE) - sum(text.count(w) for w in NEGATIVE)
        scores.append(8.0 * hits / max(len(text), 8))
    return scores


def short_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """A second toy reward: shorter completions score higher (for reward-weight tests)."""
    return [-len(ids) / 64.0 for ids in completion_ids]


def _corpus(rng: random.Random, lines: int = 3000) -> list[str]:
    words = POSITIVE + NEGATIVE + NEUTRAL + SUBJECTS
    corpus = []
    for _ in range(lines):
        corpus.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
    corpus += [f"Review the {s}:" for s in SUBJECTS] + [f"Tell me about the {s}." for s in SUBJECTS]
    return corpus


def build_tokenizer(vocab_size: int = 320, seed: int = 0):
    """A byte-level BPE trained on the toy corpus, with EOS, PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 2, **overrides):
    """A Qwen2-shaped config. head_dim stays >= 32 because vLLM's CPU attention needs it."""
    from transformers import Qwen2Config

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    settings.update(overrides)
    return Qwen2Config(**settings)


def build_model(path: str | os.PathLike, seed: int = 0, reward_model: bool = False, **config) -> str:
    """Create a random-init tiny causal LM (or a 1-label reward model) with its tokenizer at `path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    tokenizer = build_tokenizer()
    cfg = model_config(tokenizer, **config)
    torch.manual_seed(seed)
    if reward_model:
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def prompts(n: int = 64, conversational: bool = False, seed: int = 0) -> list[dict]:
    """Generated prompt rows: {'prompt': str} or {'prompt': [{'role': 'user', 'content': ...}]}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        text = rng.choice([f"Review the {subject}:", f"Tell me about the {subject}."])
        rows.append({"prompt": [{"role": "user", "content": text}] if conversational else text})
    return rows


def prompt_dataset(n: int = 64, conversational: bool = False, seed: int = 0):
    from datasets import Dataset

    return Dataset.from_list(prompts(n, conversational, seed))


def write_prompts(path: str | os.PathLike, n: int = 64, conversational: bool = False, seed: int = 0) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in prompts(n, conversational, seed):
            f.write(json.dumps(row) + "\n")
    return str(path)
