"""`TransformersGenerator`: samples k completions per prompt with `model.generate` on the
learner's own model (in process). The vLLM engine (`vllm_engine.py`) has the same calls."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from odpo_vllm.core.batches import ReadyRollouts, Rollouts, finish_rollouts
from odpo_vllm.core.sequences import stack_pixel_inputs


class TransformersGenerator:
    """Samples with `model.generate` on the learner's own model (always in sync, version = step).

    The reference generates in training mode under gradient checkpointing, which turns the KV
    cache off; here generation runs in eval mode with the cache on, then training mode returns.
    """

    def __init__(self, model, eos_token_ids: set[int], pad_token_id: int, sampling: dict[str, Any],
                 batch_size: int | None = None, autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.eos_token_ids = set(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.sampling = dict(sampling)
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.policy_version = -1  # set by the weight publisher

    def _generation_config(self):
        return generation_config(self.sampling, self.eos_token_ids, self.pad_token_id)

    def submit(self, prompt_ids: list[list[int]], num_samples: int, seed: int, media=None) -> ReadyRollouts:
        """In process, sampling happens now; the handle holds the result."""
        return ReadyRollouts(self.generate(prompt_ids, num_samples, seed, media))

    def drain(self, stop: list | None = None) -> None:
        """Nothing is in flight: sampling happens at submit."""

    def recover(self) -> None:
        """Nothing to replace in process."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_samples: int, seed: int, media=None) -> Rollouts:
        """`media`: a vision-language batch's `multimodal.PromptMedia`, one per prompt (their pixel
        inputs go to `generate` beside the ids), else None."""
        device = next(self.model.parameters()).device
        block = [ids for _ in range(num_samples) for ids in prompt_ids]  # block layout
        config = self._generation_config()
        chunk = self.batch_size * num_samples if self.batch_size else len(block)
        was_training = self.model.training
        self.model.eval()
        raw, started = [], time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                for start in range(0, len(block), chunk):
                    pixels = None
                    if media is not None:  # block row r holds prompt r % B
                        pixels = stack_pixel_inputs([m.pixel_inputs for m in media],
                                                    [r % len(prompt_ids) for r in range(start, start + chunk)
                                                     if r < len(block)])
                    raw += self._sample(block[start : start + chunk], config, device, pixels)
        finally:
            self.model.train(was_training)
        rollouts = finish_rollouts(raw, prompt_ids, num_samples, self.eos_token_ids, self.policy_version)
        rollouts.sample_s = time.perf_counter() - started
        return rollouts

    def _sample(self, prompts: list[list[int]], config, device, pixel_inputs=None) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(prompts):  # left padding, as decoder-only generation wants
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention_mask[i, width - len(ids):] = 1
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        extra = {}
        for key, value in (pixel_inputs or {}).items():
            dtype = next(self.model.parameters()).dtype if value.is_floating_point() else value.dtype
            extra[key] = value.to(device, dtype)
        with autocast:
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
                **extra
            )
        return [row.tolist() for row in out[:, width:].cpu()]

    def set_policy_version(self, version: int) -> None:
        """Shares the learner's parameters: nothing moves, only the version is recorded."""
        self.policy_version = version


def generation_config(sampling: dict, eos_token_ids, pad_token_id):
    """transformers' `GenerationConfig` for the config's sampling settings."""
    from transformers import GenerationConfig

    settings = dict(sampling)
    settings.setdefault("do_sample", True)
    # 0, not None: generate() fills None from the model's defaults (top_k=50), which would
    # truncate the distribution that vLLM samples in full.
    settings["top_k"] = settings.get("top_k") or 0
    return GenerationConfig(eos_token_id=sorted(eos_token_ids), pad_token_id=pad_token_id, use_cache=True,
                            **settings)
