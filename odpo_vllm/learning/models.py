"""Loading and preparing the policy and the reference: one loader for every placement.

The in-process trainer and each DeepSpeed learner rank call the same functions, so
`model_init_kwargs`, `trust_remote_code`, LoRA, dropout and gradient checkpointing mean the same
thing wherever the policy lives.
"""

from __future__ import annotations

import copy

import torch


def load_causal_lm(name_or_path: str, args):
    """`AutoModelForCausalLM.from_pretrained` with the config's `model_init_kwargs` (dtype names
    accepted as strings) and `trust_remote_code`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from odpo_vllm.multimodal import is_vision_config

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=args.trust_remote_code)
    auto = AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM
    kwargs = dict(args.model_init_kwargs or {})
    dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return auto.from_pretrained(name_or_path, trust_remote_code=args.trust_remote_code, **kwargs)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def context_length(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config  # a VLM's text model
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)


def prepare_policy_and_reference(model, ref_model, peft_config, args, device=None):
    """PEFT adapter, frozen reference (a copy of the policy, or None with PEFT: the policy with its
    adapter disabled is the reference), dropout off, device, gradient checkpointing. A PeftModel
    given with a peft_config has its adapter merged first (TRL 1.16 refuses that case)."""
    if isinstance(model, str):
        model = load_causal_lm(model, args)
    if isinstance(ref_model, str):
        ref_model = load_causal_lm(ref_model, args)
    if peft_config is not None:
        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):
            # Its adapter becomes part of the base (and so of the reference); only the new one trains.
            model = model.merge_and_unload()
        model = get_peft_model(model, peft_config)
    elif ref_model is None:
        ref_model = copy.deepcopy(model)
    if args.disable_dropout:
        disable_dropout(model)
        if ref_model is not None:
            disable_dropout(ref_model)
    if ref_model is not None:
        ref_model = ref_model.eval().requires_grad_(False)
        if device is not None:
            ref_model = ref_model.to(device)
    if device is not None:
        model = model.to(device)
    if args.gradient_checkpointing:
        kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if peft_config is not None and kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
    return model, ref_model
