"""What TRL's callbacks need from the trainer beyond its attributes: `EnginePolicy`, the current
policy as a callback that reads `trainer.model_wrapped` sees it under a Ray placement, and the
refusal of the callbacks that cannot work here (`refuse_unworkable_callback`).

TRL's callbacks (`LogCompletionsCallback`) sample from `trainer.model_wrapped` with `generate()`.
In process that is the learner's own model. Under a Ray placement the driver holds no copy of the
policy (the ranks do), so this object stands in for it: `generate()` samples through the run's
engines, which serve the learners' weights (a push is made first when `weight_sync_steps` left
them behind), one completion per prompt, with the run's sampling settings and a seed of its own
per step (so it never shifts the training samples). A `generation_config` that asks for other
settings is refused naming them: the engines sample with the run's.
"""

from __future__ import annotations

import torch

# generation_config fields and the run's sampling settings they must equal (`sampling_settings`)
CHECKED = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
COMPLETIONS_SEED_SALT = 2  # evaluation uses 1 (`run/evaluation.py`)


def generation_conflicts(generation_config, sampling: dict) -> list[str]:
    """'asked vs run' for each way `generation_config` decodes unlike the run's `sampling`
    settings: greedy (transformers' default, do_sample=False) where the run samples, and every
    field of CHECKED it sets to another value."""
    if generation_config is None:
        return []
    conflicts = []
    if not getattr(generation_config, "do_sample", False):
        conflicts.append(f"greedy decoding (do_sample=False) vs sampling at temperature {sampling['temperature']}")
    asked = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else vars(generation_config)
    for field in CHECKED:
        if field not in asked or field not in sampling or asked[field] == sampling[field]:
            continue
        if field == "top_k" and not asked[field] and not sampling[field]:  # 0 and None both mean "off"
            continue
        conflicts.append(f"{field}={asked[field]} vs {sampling[field]}")
    return conflicts


class EnginePolicy(torch.nn.Module):
    """The policy served by the run's engines, with the few model attributes TRL's callbacks read
    (a Module without parameters: `accelerate`'s unwrap_model walks modules)."""

    is_gradient_checkpointing = False  # nothing to turn off around generate()

    def __init__(self, trainer):
        super().__init__()
        self._trainer = trainer
        self.config = getattr(trainer, "model_config", None)
        self.device = torch.device("cpu")  # the prompts' tensors stay in the driver
        self.generation_config = None

    def check(self, generation_config, who: str) -> None:
        conflicts = generation_conflicts(generation_config, self._trainer.args.sampling_settings())
        if conflicts:
            raise ValueError(
                f"{who}: under placement={self._trainer.args.placement!r} completions come from the run's engines, "
                f"which sample with the run's settings; the generation_config asks for {'; '.join(conflicts)}. Set "
                "those on OnlineDPOConfig (max_new_tokens, temperature, ...) or pass generation_config=None")

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **unused) -> torch.Tensor:
        """(prompt row as given, then its completion, padded): what `model.generate` returns."""
        trainer = self._trainer
        self.check(generation_config, "model_wrapped.generate")
        trainer.sync_engines()
        pad = trainer.tokenizer.pad_token_id
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask)]
        from odpo_vllm.sampling.pipeline import step_seed

        seed = step_seed(trainer.args.seed, trainer.state.global_step, COMPLETIONS_SEED_SALT)
        completions = trainer.generator.generate(prompts, 1, seed).completion_ids
        width = max((len(c) for c in completions), default=0)
        out = torch.full((len(prompts), input_ids.shape[1] + width), pad, dtype=input_ids.dtype)
        out[:, : input_ids.shape[1]] = input_ids
        for row, completion in enumerate(completions):
            out[row, input_ids.shape[1] : input_ids.shape[1] + len(completion)] = torch.tensor(completion)
        return out


def refuse_unworkable_callback(trainer, callback) -> None:
    """Refuse, when it is added (before training), a TRL callback that cannot do its work on this
    trainer, naming what does."""
    cls = callback if isinstance(callback, type) else type(callback)
    name = cls.__name__
    if not cls.__module__.startswith("trl"):
        return
    if name == "SyncRefModelCallback":
        raise ValueError("callbacks: SyncRefModelCallback refreshes a reference held by the callback; here the "
                         "learners own the reference: set OnlineDPOConfig(sync_ref_model=True, "
                         "ref_model_sync_steps=..., ref_model_mixup_alpha=...) instead")
    if trainer.model is None and name == "BEMACallback":
        raise ValueError(f"callbacks: BEMACallback averages the policy's weights in this process, but under "
                         f"placement={trainer.args.placement!r} they live in the learner ranks; use "
                         "placement='in_process' for it")
    if trainer.model is None and not isinstance(callback, type) and hasattr(callback, "generation_config"):
        trainer.model_wrapped.check(callback.generation_config, name)
