"""Prompt datasets: loading, validation, tokenization, and a resumable batch order."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from odpo_vllm.multimodal import process_prompt, row_images, with_image_placeholders

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def load_prompt_dataset(name_or_path: str, split: str = "train", config_name: str | None = None):
    """A `datasets.Dataset` from a hub name, a local data file, or a local dataset directory."""
    import datasets

    from odpo_vllm.validation import check_local_path

    check_local_path(name_or_path, "dataset_name")
    if os.path.isfile(name_or_path):
        ext = os.path.splitext(name_or_path)[1].lower()
        if ext not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"dataset_name: {name_or_path!r} has extension {ext!r}; use one of {sorted(DATA_FILE_BUILDERS)}"
            )
        try:
            return datasets.load_dataset(DATA_FILE_BUILDERS[ext], data_files={split: name_or_path}, split=split)
        except Exception as err:
            if ext in (".json", ".jsonl"):
                check_json_lines(name_or_path, err)
            raise
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "dataset_info.json")):
        loaded = datasets.load_from_disk(name_or_path)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(name_or_path, config_name, split=split)


def check_json_lines(path: str, error: Exception) -> None:
    """After `datasets` failed to read a JSON file: name the first line that is not a JSON object.
    Returns quietly when every line parses (a JSON array file, or another kind of failure)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.read(1)
        if first == "[":  # one JSON document, not JSON Lines
            return
        f.seek(0)
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"dataset_name: {path} line {number} is not valid JSON ({err.msg} at column {err.colno}): "
                    f"{line.strip()[:80]!r}; fix or delete that line"
                ) from error
            if not isinstance(value, dict):
                raise ValueError(
                    f"dataset_name: {path} line {number} is a JSON {type(value).__name__}, not an object with a "
                    "'prompt' key; fix or delete that line"
                ) from error


def is_conversational(prompt: Any) -> bool:
    """A list of messages (dicts); `PromptEncoder` checks that each has a role and a content."""
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict)


def check_messages(prompt: list, where: str) -> None:
    """Every message of a conversation has a string `role` and a `content` (datasets fills a key
    missing from some messages with None)."""
    for index, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {index} is a {type(message).__name__}, not a "
                             "{'role': ..., 'content': ...} dict")
        for key in ("role", "content"):
            if message.get(key) is None:
                present = sorted(k for k, v in message.items() if v is not None)
                raise ValueError(f"{where}: message {index} has no {key!r} (keys: {present}); every message needs "
                                 "'role' and 'content'")
        if not isinstance(message["role"], str):
            raise ValueError(f"{where}: message {index} has role {message['role']!r}; it must be a string such as 'user'")


@dataclass
class PromptEncoder:
    """Turns a dataset row into prompt token ids, applying the chat template to conversations.

    Prompt ids are produced once, here, for every generation backend, so no backend adds or
    drops a BOS differently.
    """

    tokenizer: Any
    max_prompt_tokens: int  # the model's context minus the tokens reserved for the completion
    max_new_tokens: int
    dataset_name: str = "train_dataset"
    vocab_size: int | None = None  # the policy's embedding rows: a prompt id at or past it is refused
    processor: Any = None  # a vision-language model's processor (`multimodal.py`); None for a tokenizer

    def text(self, prompt: Any, row_index: int, template=None) -> str:
        """The prompt as text; a conversation through `template`'s chat template (default: the tokenizer's)."""
        template = template or self.tokenizer
        if isinstance(prompt, str):
            return prompt
        if is_conversational(prompt):
            check_messages(prompt, f"{self.dataset_name} row {row_index}")
            if template.chat_template is None:
                raise ValueError(
                    f"{self.dataset_name} row {row_index}: the prompt is a conversation but the tokenizer has no "
                    "chat_template; set processing_class.chat_template or use plain-text prompts"
                )
            return template.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        raise ValueError(
            f"{self.dataset_name} row {row_index}: 'prompt' must be a string or a list of "
            f"{{'role', 'content'}} messages, got {type(prompt).__name__}"
        )

    def encode(self, row: dict, row_index: int) -> list[int]:
        if "prompt" not in row:
            raise ValueError(
                f"{self.dataset_name} row {row_index}: no 'prompt' column (columns: {sorted(row)}); "
                "rename your prompt column to 'prompt'"
            )
        if row_images(row) is not None:
            ids = self.encode_with_images(row, row_index)[0]
        else:
            text = self.text(row["prompt"], row_index)
            if not text.strip():
                raise ValueError(f"{self.dataset_name} row {row_index}: the prompt is empty; drop or fill that row")
            ids = with_bos(self.tokenizer, self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"{self.dataset_name} row {row_index}: the prompt tokenizes to nothing")
        if self.vocab_size is not None and max(ids) >= self.vocab_size:
            bad = next(i for i in ids if i >= self.vocab_size)
            raise ValueError(
                f"{self.dataset_name} row {row_index}: the prompt holds token {self.tokenizer.convert_ids_to_tokens(bad)!r} "
                f"(id {bad}), which is outside the policy's vocabulary of {self.vocab_size} (the tokenizer has "
                f"{len(self.tokenizer)} tokens); remove it from the prompt (or the chat template), or resize the model "
                "(model.resize_token_embeddings(len(tokenizer)))"
            )
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"{self.dataset_name} row {row_index}: the prompt has {len(ids)} tokens, which leaves no room for "
                f"max_new_tokens={self.max_new_tokens} in the model's context; shorten or drop the prompt, "
                "or lower max_new_tokens"
            )
        return ids

    def encode_with_images(self, row: dict, row_index: int) -> tuple[list[int], dict]:
        """(prompt ids with the image tokens expanded, pixel inputs) of a row with images, through the
        processor (a conversation gets one image part per image in its first user message)."""
        where = f"{self.dataset_name} row {row_index}" if row_index >= 0 else f"{self.dataset_name} row"
        images = row_images(row)
        if self.processor is None:
            column = "images" if row.get("images") is not None else "image"
            raise ValueError(f"{where}: the prompt has an {column!r} column but processing_class is a "
                             f"{type(self.tokenizer).__name__}, which cannot read images; pass the model's processor "
                             "(AutoProcessor.from_pretrained(model_id)) as processing_class, or drop the column")
        prompt = row["prompt"]
        if is_conversational(prompt):
            check_messages(prompt, where)
            prompt = with_image_placeholders(prompt, len(images))
        text = self.text(prompt, row_index, self.processor)
        try:
            ids, pixel_inputs = process_prompt(
                self.processor, text, [image.convert("RGB") if hasattr(image, "convert") else image for image in images],
                add_special_tokens=False)
            return with_bos(self.tokenizer, ids), pixel_inputs
        except ValueError as err:
            raise ValueError(f"{where}: the processor refused the prompt and its {len(images)} image(s) ({err}); "
                             "give one image placeholder per image in the prompt") from err


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """The reference's prompt rule (TRL's `tokenize_row`): prompts are tokenized without the
    tokenizer's automatic special tokens (a chat template writes its own; some tokenizers would
    append an EOS), then the tokenizer's BOS goes in front unless the prompt already starts with
    it. Without that BOS a model trained with one sees prompts it never saw (issue 28: on a small
    `<bos>` task the missing BOS alone cut the reward reached on some seeds from ~0.97 to ~0.5)."""
    bos = tokenizer.bos_token_id
    if bos is None or (ids and ids[0] == bos):
        return list(ids)
    return [bos, *ids]


def as_dataset(rows, name: str):
    """A `datasets.Dataset` as given; a list (or tuple) of row dicts, which TRL's trainer also
    takes, as a `Dataset`; anything else is refused naming `name` and what it takes."""
    import datasets

    if isinstance(rows, datasets.Dataset):
        return rows
    if isinstance(rows, (list, tuple)):
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise ValueError(f"{name}: row {bad} is a {type(rows[bad]).__name__}, not a dict; give a list of dicts "
                             "such as {'prompt': ...}, or a datasets.Dataset")
        keys = {key for row in rows for key in row}
        # from_list takes the first row's keys: give every row every key (None where it has none)
        return datasets.Dataset.from_list([{key: row.get(key) for key in sorted(keys)} for row in rows])
    raise ValueError(f"{name}: expected a datasets.Dataset, a datasets.IterableDataset or a list of dicts with a "
                     f"'prompt' key, got {type(rows).__name__}")


def encode_dataset(dataset, encoder: PromptEncoder):
    """Validate every row and add a `prompt_ids` column, before any training starts."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return dataset  # encoded lazily, batch by batch; errors still name the row
    dataset = as_dataset(dataset, encoder.dataset_name)
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"{encoder.dataset_name}: no 'prompt' column (columns: {dataset.column_names}); "
            "rename your prompt column to 'prompt'"
        )
    if len(dataset) == 0:
        raise ValueError(f"{encoder.dataset_name}: the dataset has no rows")
    return dataset.map(
        lambda row, index: {"prompt_ids": encoder.encode(row, index)},
        with_indices=True,
        desc=f"Tokenizing {encoder.dataset_name}",
    )


@dataclass
class PromptBatches:
    """The order prompts are drawn in: a seeded permutation per epoch, resumable by position.

    `epoch` and `position` (batches already taken in the epoch) are all the state needed to
    continue a run exactly where it stopped.
    """

    dataset: Any
    batch_size: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0
    _order: list[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:  # batches per epoch
        return -(-len(self.dataset) // self.batch_size)

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def next(self) -> tuple[list[int], list[dict]]:
        """The next batch's row indices and rows; rolls over to a new epoch when one is used up."""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = self._epoch_order()
        start = self.position * self.batch_size
        indices = self._order[start : start + self.batch_size]
        self.position += 1
        return indices, [self.dataset[i] for i in indices]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._order = None


class IterablePromptBatches:
    """Batches from a streaming `IterableDataset`; resumes by skipping rows already taken."""

    def __init__(self, dataset, batch_size: int, encoder: PromptEncoder):
        self.dataset, self.batch_size, self.encoder = dataset, batch_size, encoder
        self.epoch, self.rows_taken, self._iterator = 0, 0, None

    def next(self) -> tuple[list[int], list[dict]]:
        if self._iterator is None:
            self._iterator = iter(self.dataset.skip(self.rows_taken) if self.rows_taken else self.dataset)
        indices, rows = [], []
        while len(rows) < self.batch_size:
            try:
                row = dict(next(self._iterator))
            except StopIteration:
                if rows:
                    break
                self.epoch, self.rows_taken = self.epoch + 1, 0
                self._iterator = iter(self.dataset)
                continue
            row["prompt_ids"] = self.encoder.encode(row, self.rows_taken)
            indices.append(self.rows_taken)
            rows.append(row)
            self.rows_taken += 1
        return indices, rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rows_taken": self.rows_taken}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.rows_taken, self._iterator = state["epoch"], state["rows_taken"], None


def engine_context(train_dataset, eval_encoded, context: int, args, image_ids: set[int],
                   eos_token_id: int) -> tuple[int, list[int]]:
    """The engines' max_model_len (the longest encoded prompt + max_new_tokens, capped by the
    model's `context`) and the probe: a fixed sequence that engine and learner both score after
    every sync (the first prompt twice, text tokens only: it is scored without pixel inputs)."""
    from datasets import Dataset

    longest = context - args.max_new_tokens  # streaming data: any prompt the model can take
    first_prompt = None
    if isinstance(train_dataset, Dataset):
        evals = eval_encoded.values() if isinstance(eval_encoded, dict) else [eval_encoded]
        parts = [train_dataset] + [part for part in evals if isinstance(part, Dataset)]
        longest = max(len(ids) for part in parts for ids in part["prompt_ids"])
        first_prompt = train_dataset[0]["prompt_ids"]
    max_model_len = args.vllm_max_model_len or min(context, longest + args.max_new_tokens)
    first_prompt = [token for token in first_prompt or [] if token not in image_ids]
    probe = (first_prompt or [eos_token_id]) * 2
    return max_model_len, probe[: max_model_len - 1]
