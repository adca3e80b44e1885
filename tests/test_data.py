"""Prompt data: validation before training, file loading, resumable batch order."""

from __future__ import annotations

import pytest
from conftest import make_args
from datasets import Dataset

from odpo_vllm import OnlineDPOTrainer, toy
from odpo_vllm.data import PromptBatches, load_prompt_dataset


def build(model_path, tmp_path, dataset, **kwargs):
    return OnlineDPOTrainer(model_path, reward_funcs=toy.sentiment_reward, args=make_args(tmp_path),
                            train_dataset=dataset, **kwargs)


def test_missing_prompt_column(model_path, tmp_path):
    dataset = Dataset.from_list([{"text": "Review the film:"}, {"text": "Tell me about the song."}])
    with pytest.raises(ValueError) as info:
        build(model_path, tmp_path, dataset)
    message = str(info.value)
    assert "'prompt'" in message and "train_dataset" in message and "text" in message


def test_empty_prompt_names_row(model_path, tmp_path):
    rows = toy.prompts(6)
    rows[3]["prompt"] = "   "
    with pytest.raises(ValueError) as info:
        build(model_path, tmp_path, Dataset.from_list(rows))
    assert "row 3" in str(info.value)
    assert "empty" in str(info.value)


def test_empty_conversational_prompt_names_row(model_path, tmp_path):
    rows = toy.prompts(4, conversational=True)
    rows[2]["prompt"] = []
    with pytest.raises(ValueError, match="row 2"):
        build(model_path, tmp_path, Dataset.from_list(rows))


def test_prompt_too_long_names_row(model_path, tmp_path):
    rows = toy.prompts(5)
    rows[4]["prompt"] = " ".join(["Review the film and the book and the song"] * 200)  # >> 512 tokens
    with pytest.raises(ValueError) as info:
        build(model_path, tmp_path, Dataset.from_list(rows))
    message = str(info.value)
    assert "row 4" in message and "max_new_tokens" in message


def test_eval_dataset_errors_name_the_eval_dataset(model_path, tmp_path):
    bad = Dataset.from_list([{"prompt": "Review the film:"}, {"prompt": ""}])
    with pytest.raises(ValueError) as info:
        build(model_path, tmp_path, toy.prompt_dataset(4), eval_dataset=bad)
    assert "eval_dataset" in str(info.value) and "row 1" in str(info.value)


def test_conversational_without_chat_template(model_path, tmp_path, fresh_tokenizer):
    fresh_tokenizer.chat_template = None
    with pytest.raises(ValueError) as info:
        build(model_path, tmp_path, toy.prompt_dataset(4, conversational=True), processing_class=fresh_tokenizer)
    message = str(info.value)
    assert "chat_template" in message and "row 0" in message


def test_bad_prompt_type_names_row(model_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": [[1, 2], [3]]})
    with pytest.raises(ValueError, match="row 0"):
        build(model_path, tmp_path, dataset)


def test_errors_raise_before_training(model_path, tmp_path):
    """The constructor fails; no trainer exists, so nothing can have trained."""
    rows = toy.prompts(3)
    rows[1]["prompt"] = ""
    with pytest.raises(ValueError, match="row 1"):
        build(model_path, tmp_path, Dataset.from_list(rows))
    assert not (tmp_path / "out" / "completions.jsonl").exists()


def test_load_local_jsonl(tmp_path):
    path = toy.write_prompts(tmp_path / "data" / "prompts.jsonl", n=12, seed=3)
    dataset = load_prompt_dataset(path)
    assert len(dataset) == 12
    assert dataset["prompt"] == [row["prompt"] for row in toy.prompts(12, seed=3)]


def test_load_local_conversational_jsonl(tmp_path):
    path = toy.write_prompts(tmp_path / "conv.jsonl", n=5, conversational=True)
    dataset = load_prompt_dataset(path)
    assert len(dataset) == 5
    assert dataset[0]["prompt"] == toy.prompts(5, conversational=True)[0]["prompt"]


def test_load_unknown_extension_raises(tmp_path):
    path = tmp_path / "prompts.xml"
    path.write_text("<x/>")
    with pytest.raises(ValueError, match="extension"):
        load_prompt_dataset(str(path))


def test_trainer_accepts_loaded_jsonl(model_path, tmp_path):
    dataset = load_prompt_dataset(toy.write_prompts(tmp_path / "p.jsonl", n=6))
    trainer = build(model_path, tmp_path, dataset)
    assert len(trainer.train_dataset) == 6
    assert all(len(ids) > 0 for ids in trainer.train_dataset["prompt_ids"])


# ------------------------------------------------------------------------------------- batch order
def _take(batches, n):
    return [batches.next()[0] for _ in range(n)]


def test_prompt_batches_permutation_per_epoch():
    dataset = [{"prompt": str(i)} for i in range(10)]
    batches = PromptBatches(dataset, batch_size=4, seed=7)
    assert len(batches) == 3  # ceil(10 / 4)
    epoch0 = _take(batches, 3)
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(i for b in epoch0 for i in b) == list(range(10))
    assert batches.epoch == 0
    epoch1 = _take(batches, 3)
    assert batches.epoch == 1
    assert sorted(i for b in epoch1 for i in b) == list(range(10))
    assert [i for b in epoch0 for i in b] != [i for b in epoch1 for i in b]  # reshuffled
    # rows match indices
    indices, rows = PromptBatches(dataset, 4, seed=7).next()
    assert [row["prompt"] for row in rows] == [str(i) for i in indices]


def test_prompt_batches_seeded():
    dataset = list(range(20))
    a = _take(PromptBatches(dataset, 5, seed=1), 8)
    b = _take(PromptBatches(dataset, 5, seed=1), 8)
    c = _take(PromptBatches(dataset, 5, seed=2), 8)
    assert a == b and a != c


def test_prompt_batches_no_shuffle_is_in_order():
    batches = PromptBatches(list(range(5)), 2, seed=0, shuffle=False)
    assert _take(batches, 4) == [[0, 1], [2, 3], [4], [0, 1]]


@pytest.mark.parametrize("stop_after", [1, 3, 5])
def test_prompt_batches_resume_from_state_dict(stop_after):
    dataset = list(range(10))
    uninterrupted = _take(PromptBatches(dataset, 4, seed=3), 8)
    first = PromptBatches(dataset, 4, seed=3)
    head = _take(first, stop_after)
    state = first.state_dict()
    resumed = PromptBatches(dataset, 4, seed=999)  # seed comes back from the state
    resumed.load_state_dict(state)
    tail = _take(resumed, 8 - stop_after)
    assert head + tail == uninterrupted


@pytest.fixture
def bos_tokenizer(fresh_tokenizer):
    """The toy tokenizer with a `<bos>` token (as Llama- or Gemma-style tokenizers have) whose
    automatic special tokens would append EOS, the case `add_special_tokens=False` guards against."""
    from tokenizers import processors

    fresh_tokenizer.add_special_tokens({"bos_token": "<bos>"})
    eos = fresh_tokenizer.eos_token
    fresh_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, fresh_tokenizer.eos_token_id)])
    return fresh_tokenizer


def test_prompts_start_with_one_bos_and_get_no_automatic_tokens(bos_tokenizer):
    """The reference's tokenize_row rule: no automatic special tokens, the BOS in front once, also
    when a chat template already wrote it."""
    from odpo_vllm.data import PromptEncoder

    encoder = PromptEncoder(bos_tokenizer, max_prompt_tokens=64, max_new_tokens=8)
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    text = "Review the film:"
    assert bos_tokenizer(text)["input_ids"][-1] == eos  # what add_special_tokens=True would give
    plain = encoder.encode({"prompt": text}, 0)
    assert plain == [bos] + bos_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoder.encode({"prompt": "<bos>" + text}, 0) == plain  # already there: not doubled

    messages = [{"role": "user", "content": text}]
    bos_tokenizer.chat_template = "<bos>" + toy.CHAT_TEMPLATE
    templated = encoder.encode({"prompt": messages}, 0)
    assert templated[0] == bos and templated[1] != bos and eos not in templated


def test_tokenizer_without_bos_keeps_prompts_as_tokenized(fresh_tokenizer):
    from odpo_vllm.data import PromptEncoder

    encoder = PromptEncoder(fresh_tokenizer, max_prompt_tokens=64, max_new_tokens=8)
    assert fresh_tokenizer.bos_token_id is None
    assert encoder.encode({"prompt": "Review the film:"}, 0) == fresh_tokenizer("Review the film:")["input_ids"]
