"""Models vLLM has no code for (custom-code models, `trust_remote_code`) in the engine: which of
vLLM's model implementations runs them, their Python files beside the engine's config, and the
transformers classes vLLM's Transformers backend patches, given back to the learner's models."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

logger = logging.getLogger("odpo_vllm.sampling.vllm_engine")  # the name users filter the engine's lines by


def engine_model_impl(config, requested: str, log: bool = True) -> str:
    """vLLM's own model code where it has it; its Transformers backend (`"transformers"`) for an
    architecture it does not list, e.g. a custom-code model, as the reference trains those too."""
    if requested != "vllm":
        return requested
    from vllm.model_executor.models import ModelRegistry

    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures or any(arch in ModelRegistry.get_supported_archs() for arch in architectures):
        return requested
    if log:
        logger.warning("vLLM has no model code for %s: the engine runs it with vLLM's Transformers backend "
                       "(vllm_model_impl='transformers')", ", ".join(architectures))
    return "transformers"


def _subclasses(cls) -> set:
    found, stack = set(), [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


@contextlib.contextmanager
def transformers_classes_kept():
    """vLLM's Transformers backend decorates the transformers model class it runs, for the whole
    process: its `__init__` then needs a vLLM config context and its `__call__` an attribute only
    the engine's instance has. Beside an in-process learner that breaks every other instance (the
    policy, the reference, any model built later in this process). After the engine is built its
    instance no longer needs the new `__init__`, so the class gets its own back; and the class gets
    `do_not_compile = True` as a default, so other instances' calls run their plain `forward` (the
    engine's instance keeps its own value)."""
    from transformers import PreTrainedModel

    saved = {cls: (cls.__dict__.get("__init__"), cls.__dict__.get("__call__")) for cls in _subclasses(PreTrainedModel)}
    try:
        yield
    finally:
        for cls, (init, call) in saved.items():
            if cls.__dict__.get("__init__") is not init:
                if init is None:
                    delattr(cls, "__init__")
                else:
                    cls.__init__ = init
            if cls.__dict__.get("__call__") is not call and "do_not_compile" not in cls.__dict__:
                cls.do_not_compile = True


def copy_custom_code(config, folder: str) -> None:
    """A custom-code model (`auto_map` in its config): its Python files beside the config the
    engine starts from (`save_pretrained` of a config copies the configuration module only, and
    vLLM's Transformers backend imports the modeling one too)."""
    source = getattr(config, "_name_or_path", None)
    if not getattr(config, "auto_map", None) or not source or not os.path.isdir(source):
        return
    for name in os.listdir(source):
        if name.endswith(".py") and not os.path.exists(os.path.join(folder, name)):
            shutil.copy(os.path.join(source, name), os.path.join(folder, name))
