"""Vision-language models: a processor as `processing_class`, prompts with images.

A processor (transformers' `ProcessorMixin`: a tokenizer plus an image processor) turns a prompt's
text and images into input ids, in which each image placeholder is expanded to the model's image
tokens, and pixel inputs (`pixel_values` and model-specific extras such as `pixel_attention_mask`
or `image_sizes`). The tokenizer inside it (`processor.tokenizer`) serves everything else: padding,
EOS, decoding completions. A prompt's images come from the dataset's `image` column (one image)
or `images` column (a list), as in the reference.

Prompt ids are encoded once with the dataset (`data.PromptEncoder`); the pixel inputs are made per
batch (`attach_media`) rather than stored in the dataset, so an image dataset stays as small as
its images. They travel with each row as `PromptMedia` to the sampler (pixel inputs for
transformers' `generate`, the images themselves for vLLM) and with the pairs to the learner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IMAGE_COLUMNS = ("image", "images")
MEDIA_KEY = "prompt_media"  # the row key that carries a prompt's `PromptMedia` through one step


def is_processor(processing_class: Any) -> bool:
    """A multi-modal processor (tokenizer inside) rather than a tokenizer."""
    from transformers import ProcessorMixin

    return isinstance(processing_class, ProcessorMixin)


def text_tokenizer(processing_class: Any):
    """The tokenizer for ids, padding, EOS and decoding: the processor's own tokenizer, or the
    tokenizer itself."""
    if is_processor(processing_class):
        tokenizer = getattr(processing_class, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"processing_class: the {type(processing_class).__name__} has no tokenizer; give a "
                             "processor with a `tokenizer` (e.g. AutoProcessor.from_pretrained(model_id))")
        return tokenizer
    return processing_class


def is_vision_config(model_or_config: Any) -> bool:
    """A vision-language architecture: one transformers' image-text-to-text auto class loads."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_processing_class(name_or_path: str, model_or_config: Any, trust_remote_code: bool):
    """The default processing_class: the processor of a vision-language model, else the tokenizer."""
    from transformers import AutoProcessor, AutoTokenizer

    loader = AutoProcessor if is_vision_config(model_or_config) else AutoTokenizer
    return loader.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def check_placement(processing_class: Any, args) -> None:
    """Images reach the learner and the sampler in process and on the dedicated placement; the
    colocated placement does not carry them yet."""
    if is_processor(processing_class) and args.placement == "colocated":
        raise ValueError(
            f"processing_class: a {type(processing_class).__name__} (a vision-language model's processor) does not "
            "train on placement='colocated' yet: use placement=\"dedicated\" or placement=\"in_process\""
        )
    if is_processor(processing_class) and args.vllm_mode == "server" and args.use_vllm is not False:
        raise ValueError(
            f"processing_class: a {type(processing_class).__name__} (a vision-language model's processor): "
            "vllm_mode=\"server\" does not carry images to the server yet; use vllm_mode=\"colocate\" (in process "
            "or placement=\"dedicated\") or use_vllm=False"
        )


def vision_engine_unavailable() -> str | None:
    """Why vLLM engines cannot sample a vision-language model here (vLLM's multi-modal models
    import torchvision), or None: they can."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return "vLLM's vision-language models need torchvision, which is not installed"
    return None


def image_token_ids(processing_class: Any) -> set[int]:
    """The ids the processor expands image placeholders into (empty for a tokenizer)."""
    if not is_processor(processing_class):
        return set()
    ids = {getattr(processing_class, "image_token_id", None)}
    tokenizer = text_tokenizer(processing_class)
    for name in ("image_token", "fake_image_token", "boi_token", "eoi_token"):
        token = getattr(processing_class, name, None)
        if isinstance(token, str):
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}


def row_images(row: dict) -> list | None:
    """The prompt's images, in order: the `images` column (a list) or the `image` column (one)."""
    images = row.get("images")
    if images is not None:
        return list(images) if isinstance(images, (list, tuple)) else [images]
    image = row.get("image")
    return [image] if image is not None else None


def with_image_placeholders(prompt: list[dict], count: int) -> list[dict]:
    """A conversation whose messages hold plain strings, rewritten in the processors' content-part
    form: the first user message gets `count` image parts before its text (as the reference puts
    the row's image in front of the user's text). A conversation that already has image parts is
    returned as it is: the user placed them."""
    if any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") == "image"
                                                       for p in m["content"]) for m in prompt):
        return prompt
    out, placed = [], False
    for message in prompt:
        content = message["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
            if message["role"] == "user" and not placed:
                parts = [{"type": "image"}] * count + parts
                placed = True
            message = {**message, "content": parts}
        out.append(message)
    return out


def text_only_messages(prompt: Any) -> Any:
    """A conversation with its image parts dropped and text parts joined, for a text reward model."""
    if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
        return prompt
    out = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict)
                              and part.get("type") == "text")
        out.append({**message, "content": content})
    return out


@dataclass
class PromptMedia:
    """One prompt's images and the processor's pixel inputs for them (batch dimension 1)."""

    images: list
    pixel_inputs: dict[str, torch.Tensor]


def process_prompt(processor, text: str, images: list, add_special_tokens: bool) -> tuple[list[int], dict]:
    """(input ids with image tokens expanded, pixel inputs) of one prompt."""
    out = processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=add_special_tokens)
    pixel_inputs = {key: value for key, value in out.items()
                    if key not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
                    and isinstance(value, torch.Tensor)}
    return out["input_ids"][0].tolist(), pixel_inputs


def attach_media(rows: list[dict], encoder) -> list[dict]:
    """Each row of a batch with its `PromptMedia` under `MEDIA_KEY` (rows without images unchanged);
    a row whose ids no longer match its images (a data_collator rewrote them) fails here."""
    if encoder.processor is None:
        return rows
    out = []
    for row in rows:
        images = row_images(row)
        if images is None:
            out.append(row)
            continue
        ids, pixel_inputs = encoder.encode_with_images(row, -1)
        if ids != list(row["prompt_ids"]):
            raise ValueError("data_collator: a row's 'prompt_ids' do not match its prompt and images any more; "
                             "rewrite 'prompt' and the image column, not 'prompt_ids', for image prompts")
        out.append({**row, MEDIA_KEY: PromptMedia(images, pixel_inputs)})
    return out


def batch_media(rows: list[dict]) -> list[PromptMedia] | None:
    """The batch's `PromptMedia`, one per row, or None for a text batch."""
    media = [row.get(MEDIA_KEY) for row in rows]
    if all(m is None for m in media):
        return None
    if any(m is None for m in media):
        raise ValueError("train_dataset: a batch mixes prompts with and without images; give every row an image "
                         "(or none), so each prompt's pixel inputs line up with its image tokens")
    return media


def vllm_prompt(ids: list[int], media: PromptMedia | None) -> dict:
    """One vLLM request: token ids, and the images as multi-modal data."""
    if media is None:
        return {"prompt_token_ids": ids}
    images = media.images[0] if len(media.images) == 1 else list(media.images)
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}
