"""What an engine receives when it serves the policy as a vLLM LoRA adapter (`lora_sync='adapter'`).

The engine loads the base weights once (the learner's, adapter disabled: the DPO reference); each
push sends only the adapter's tensors (PEFT's saved names, the engine's dtype) and its config, which
the engine writes to a folder of its own and loads under a LoRA name and id never used before. New
names matter: vLLM keys its prefix cache by adapter, so a reused name could serve KV cached under
the previous version.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# vLLM's LoRAConfig.max_lora_rank accepts only these values
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class AdapterWeights:
    tensors: dict[str, torch.Tensor]  # PEFT's saved names ("base_model.model....lora_A.weight")
    config: dict  # the adapter's `adapter_config.json`

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _active_config(model):
    adapters = list(getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", "default")])
    return adapters, model.peft_config[adapters[0]]


def adapter_refusal(model) -> str | None:
    """Why vLLM cannot serve this policy as an adapter (None: it can), in words for a log line."""
    if not hasattr(model, "peft_config"):
        return "the policy has no LoRA adapter"
    adapters, config = _active_config(model)
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters (vLLM serves one per request)"
    return config_refusal(config)


def config_refusal(config) -> str | None:
    """`adapter_refusal` for a PEFT config alone (a Ray placement's driver holds no model)."""
    if getattr(config, "peft_type", None) is None or str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        return f"a {getattr(config, 'peft_type', type(config).__name__)} adapter, not LoRA"
    reasons = []
    if getattr(config, "use_dora", False):
        reasons.append("DoRA (use_dora)")
    if getattr(config, "modules_to_save", None):
        reasons.append(f"modules_to_save {list(config.modules_to_save)}")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        reasons.append("trained biases (bias / lora_bias)")
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        reasons.append("per-module ranks or alphas (rank_pattern / alpha_pattern)")
    if config.r > VLLM_LORA_RANKS[-1]:
        reasons.append(f"rank {config.r} > {VLLM_LORA_RANKS[-1]}")
    targets = config.target_modules if isinstance(config.target_modules, (list, set, tuple)) else [config.target_modules]
    odd = sorted(str(t) for t in targets if any(word in str(t) for word in ("embed", "lm_head", "wte")))
    if odd:
        reasons.append(f"adapted embeddings or output layer {odd}")
    return "vLLM does not serve " + ", ".join(reasons) if reasons else None


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as `max_lora_rank` that holds `rank`."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def adapter_rank(model) -> int:
    return _active_config(model)[1].r


def adapter_weights(model, dtype: torch.dtype) -> AdapterWeights:
    """The active adapter's tensors (copies in `dtype`, on the CPU) and config."""
    from peft import get_peft_model_state_dict

    adapters, config = _active_config(model)
    with torch.no_grad():
        state = get_peft_model_state_dict(model, adapter_name=adapters[0])
        tensors = {name: t.detach().to(device="cpu", dtype=dtype).contiguous() for name, t in state.items()}
    return AdapterWeights(tensors, adapter_config(model))


def adapter_config(model) -> dict:
    """The active adapter's `adapter_config.json`, as a dict."""
    return json.loads(json.dumps(_active_config(model)[1].to_dict(), default=_jsonable))


def saved_name(parameter_name: str, adapter: str) -> str | None:
    """The name PEFT saves an adapter parameter under ("...q_proj.lora_A.default.weight" ->
    "...q_proj.lora_A.weight"); None for a parameter of no LoRA matrix of `adapter`."""
    for part in (".lora_A.", ".lora_B."):
        if f"{part}{adapter}." in parameter_name:
            return parameter_name.replace(f"{part}{adapter}.", part)
    return None


def _jsonable(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return getattr(value, "value", str(value))  # enums (task_type, peft_type)


def write_adapter(directory: str, adapter: AdapterWeights) -> int:
    """Write the folder vLLM loads an adapter from; returns the bytes written."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(adapter.tensors, os.path.join(directory, ADAPTER_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(adapter.config, f)
    return adapter.nbytes


def choose_lora_sync(requested: str, model, on_gpu: bool, where: str | None = None, vision: bool = False) -> str:
    """What the pushes send for `lora_sync=requested`: "merged" or "adapter". `model`: the policy,
    or its PEFT config; `where`: why this placement's engines cannot take adapter pushes (None:
    they can)."""
    if model is None or not (hasattr(model, "peft_config") or hasattr(model, "peft_type")):
        return "merged"  # a full policy: its whole weights are what changes
    refusal = adapter_refusal(model) if hasattr(model, "peft_config") else config_refusal(model)
    return decide_lora_sync(requested, refusal or engine_refusal(vision=vision) or where, on_gpu)


def engine_refusal(tensor_parallel_size: int = 1, vision: bool = False) -> str | None:
    """Why engines of this kind cannot take adapter pushes over a weight transport (None: they can)."""
    if vision:
        return "a vision-language engine"
    if tensor_parallel_size > 1:
        return "vllm_tensor_parallel_size > 1 (each of an engine's workers would need the adapter)"
    return None


def decide_lora_sync(requested: str, refusal: str | None, on_gpu: bool) -> str:
    """`choose_lora_sync` for a LoRA policy, given why its engines cannot serve the adapter
    (`refusal`; None: they can). An impossible "adapter" is refused naming the field; "auto"
    picks "adapter" only where it pays and works (GPU engines) and says in one line why not
    otherwise."""
    if requested == "adapter":
        if refusal:
            raise ValueError(f"OnlineDPOConfig.lora_sync='adapter': {refusal}; use lora_sync='merged' (or 'auto')")
        return "adapter"
    if requested == "merged":
        return "merged"
    why = refusal or (None if on_gpu else "on CPU vLLM runs LoRA without its kernels and samples slower than "
                                          "the merged push costs")
    if why:
        logger.info("lora_sync=auto: the engines get merged weights (%s)", why)
        return "merged"
    return "adapter"
