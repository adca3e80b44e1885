"""What the engines receive: the learner's weights under Hugging Face checkpoint names.

One definition for every placement: base names (what vLLM's loaders expect), tied weights under
every name, LoRA merged into the base weights, cast to the engine's dtype. `LearnerWeights` is the
`WeightSource` of an in-process model; a DeepSpeed rank yields the same names and values through
`named_weights` (gathered in size-capped groups under ZeRO-3).

LoRA is merged out of place: each adapted weight is sent as a new tensor, base + delta, and the
training model is never written to. Its base weights are the DPO reference (the policy with its
adapter disabled), and PEFT's in-place merge_adapter/unmerge_adapter round trip is not exact: in
bf16, 100 publishes changed 40-50% of each adapted layer's base entries (toy model, measured),
a reference drift that `sync/logprob_gap` cannot see (engine and learner drift together) and that
a multi-rank ZeRO-3 run, which discards its gathered copy, did not share with ZeRO-2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch


def checkpoint_name(name: str) -> str | None:
    """Map a (possibly PEFT-wrapped) parameter name to its base checkpoint name; None = skip."""
    if "lora_" in name or ".original_module." in name:
        return None
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def low_rank_product(weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float,
                     fan_in_fan_out: bool) -> torch.Tensor:
    """scaling * B @ A in float32, in the layout of the weight it adapts (transposed where that
    weight is stored (in, out): GPT-2's Conv1D, `fan_in_fan_out`; and embeddings)."""
    delta = (weight_b.float() @ weight_a.float()) * scaling
    return delta.T if fan_in_fan_out else delta


def merged_weight(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """base + delta as a new tensor of `dtype` (the dtype sent today: the engine's, or the
    parameter's). Summed in float32 and rounded once, which is also more accurate than PEFT's bf16
    merge, where the delta is rounded to bf16 before the sum is."""
    return (base.detach().float() + delta).to(dtype)


def lora_targets(model) -> dict[str, tuple[Any, str]]:
    """The base parameters a PEFT model's LoRA layers adapt, by parameter name
    ("...q_proj.base_layer.weight"): the layer and which parameter of its base layer ("weight", or
    "bias" where an active adapter has `lora_bias`). Empty for a plain model."""
    if not hasattr(model, "peft_config"):
        return {}
    from peft.tuners.lora import LoraLayer

    targets = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if layer.merged:  # the base weights already hold the delta: adding it again would double it
            raise ValueError(f"{name}: LoRA adapter merged into the training model; unmerge it before publishing")
        if not layer.get_base_layer().weight.is_floating_point():
            raise NotImplementedError(f"{name}: a quantized base weight is not merged for the engines")
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_variant", {}):
                raise NotImplementedError(f"{name}: LoRA variants (DoRA, ...) are not merged for the engines: "
                                          "their merge is not base + delta")
        targets[f"{name}.base_layer.weight"] = (layer, "weight")
        if any(getattr(layer, "lora_bias", {}).get(adapter, False) for adapter in layer.active_adapters):
            targets[f"{name}.base_layer.bias"] = (layer, "bias")
    return targets


def lora_delta(layer, which: str) -> torch.Tensor:
    """What merging `layer`'s active adapters adds to its base layer's `which` ("weight" or "bias"),
    in float32. Reads the adapter weights only (under ZeRO-3: gathered)."""
    from peft.tuners.lora import Embedding

    total = 0.0
    for adapter in layer.active_adapters:
        scaling = layer.scaling[adapter]
        if which == "bias":
            if getattr(layer, "lora_bias", {}).get(adapter, False):
                total = total + layer.lora_B[adapter].bias.float() * scaling
        elif isinstance(layer, Embedding) and adapter in layer.lora_embedding_A:
            total = total + low_rank_product(layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter],
                                             scaling, fan_in_fan_out=True)
        elif adapter in layer.lora_A and isinstance(layer.lora_A[adapter], torch.nn.Linear):
            total = total + low_rank_product(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                                             scaling, layer.fan_in_fan_out)
        elif adapter in layer.lora_A:  # convolutions: PEFT's own delta (rounded to the adapter's dtype)
            total = total + layer.get_delta_weight(adapter).float()
    return total


def _base_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    # state_dict() lists tied parameters under every name (lm_head.weight too), which vLLM
    # needs: its loader does not re-tie a missing lm_head on reload.
    for name, tensor in model.state_dict().items():
        mapped = checkpoint_name(name)
        if mapped is not None:
            yield mapped, tensor


def _weight_source_base():
    try:
        from vllm.distributed.weight_transfer.base import WeightSource

        return WeightSource
    except ImportError:  # the in-process transformers path does not need vLLM
        return object


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


class LearnerWeights(_weight_source_base()):
    """A re-iterable `WeightSource` over a learner model in checkpoint format."""

    def __init__(self, model, dtype: torch.dtype | None = None, merge_lora: bool = True):
        # merge_lora=False: the base weights as they are (an engine that serves the adapter itself)
        self.model, self.dtype, self.merge_lora = model, dtype, merge_lora

    def _meta(self):
        return [TensorMeta(n, self.dtype or t.dtype, tuple(t.shape)) for n, t in _base_weights(self.model)]

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(m.name, m.dtype, m.shape) for m in self._meta()]

    def tensor_meta(self) -> list[TensorMeta]:
        return self._meta()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        targets = lora_targets(self.model) if self.merge_lora else {}
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                mapped = checkpoint_name(name)
                if mapped is None:
                    continue
                dtype = self.dtype or tensor.dtype
                if name in targets:
                    yield mapped, merged_weight(tensor, lora_delta(*targets[name]), dtype)
                else:
                    yield mapped, tensor.detach().to(dtype)


def validate_weights(metas: list[TensorMeta], expected: dict[str, tuple[int, ...]], engine: str) -> None:
    """Refuse an update whose names or shapes do not match the engine's model: vLLM would fail
    halfway through the load and leave the engine with half-replaced weights."""
    got = {m.name: tuple(m.shape) for m in metas}
    unknown = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    wrong = sorted(n for n in set(got) & set(expected) if got[n] != tuple(expected[n]))
    if unknown or missing or wrong:
        details = []
        if unknown:
            details.append(f"unknown names {unknown[:5]}")
        if missing:
            details.append(f"missing names {missing[:5]}")
        if wrong:
            details.append("shape mismatch " + ", ".join(f"{n}: {got[n]} vs {tuple(expected[n])}" for n in wrong[:5]))
        raise ValueError(f"weight update for {engine} rejected before loading: " + "; ".join(details))
