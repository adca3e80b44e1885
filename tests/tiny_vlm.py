"""Tiny vision-language models and their processors, built locally with random weights (no
downloads): a Llava-shaped one (CLIP vision tower + Llama text model) and an Idefics2-shaped one,
each with the toy tokenizer (`odpo_vllm.toy`) plus its image tokens."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from odpo_vllm.toy import build_tokenizer

IMAGE_SIZE = 30  # pixels a side: small, and what both image processors resize to
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_image(seed: int, size: int = 24) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _text_config(vocab_size: int, pad_token_id: int, eos_token_id: int):
    from transformers import LlamaConfig

    # head_dim 32: vLLM's CPU attention needs >= 32
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id)


def llava(seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor), random weights, 4 image tokens per image."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    patch = 15  # (30 / 15)^2 = 4 patches, the CLS token dropped by the "default" feature selection
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=patch, projection_dim=32)
    config = LlavaConfig(vision_config=vision,
                         text_config=_text_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def idefics2(seed: int = 0):
    """(Idefics2ForConditionalGeneration, Idefics2Processor), random weights, 4 latents per image."""
    from transformers import (Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessorPil,
                              Idefics2Processor, LlamaConfig)

    tokenizer = build_tokenizer()
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=False,
                                                size={"longest_edge": IMAGE_SIZE, "shortest_edge": IMAGE_SIZE})
    latents = 4
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=latents,
                                  chat_template=LLAVA_CHAT_TEMPLATE)  # adds its image tokens to the tokenizer
    text = _text_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    config = Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=15),
        perceiver_config=dict(hidden_size=64, resampler_n_latents=latents, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=32, num_key_value_heads=2),
        text_config=text.to_dict() | {"model_type": LlamaConfig.model_type},
        image_token_id=processor.image_token_id)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor
