"""What the engines receive: the learner's weights under Hugging Face checkpoint names.

One definition for every placement: base names (what vLLM's loaders expect), tied weights under
every name, LoRA merged into the base weights, cast to the engine's dtype. `LearnerWeights` is the
`WeightSource` of an in-process model; a DeepSpeed rank yields the same names and values through
`named_weights` (gathered in size-capped groups under ZeRO-3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


def checkpoint_name(name: str) -> str | None:
    """Map a (possibly PEFT-wrapped) parameter name to its base checkpoint name; None = skip."""
    if "lora_" in name or ".original_module." in name:
        return None
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


@contextlib.contextmanager
def merged_adapter(model):
    """LoRA merged into the base weights for the duration (no-op for plain models)."""
    merge = getattr(model, "merge_adapter", None)
    if merge is None or not hasattr(model, "peft_config"):
        yield
        return
    merge()
    try:
        yield
    finally:
        model.unmerge_adapter()


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

    def __init__(self, model, dtype: torch.dtype | None = None):
        self.model, self.dtype = model, dtype

    def _meta(self):
        with merged_adapter(self.model):
            return [TensorMeta(n, self.dtype or t.dtype, tuple(t.shape)) for n, t in _base_weights(self.model)]

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(m.name, m.dtype, m.shape) for m in self._meta()]

    def tensor_meta(self) -> list[TensorMeta]:
        return self._meta()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Merged LoRA weights are unmerged in place afterwards: hand out copies of those, so a
        # consumer that keeps a tensor past the iteration still holds the merged values.
        copy = hasattr(self.model, "peft_config")
        with torch.no_grad(), merged_adapter(self.model):
            for name, tensor in _base_weights(self.model):
                tensor = tensor.detach().to(self.dtype) if self.dtype else tensor.detach()
                yield name, tensor.clone() if copy else tensor


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
