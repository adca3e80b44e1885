"""Checks of the user's inputs that run at construction, before any step: each error names the
field (or row, file, function) and says what to do instead of failing later inside a library."""

from __future__ import annotations

import math
import os
from typing import Any

# File endings that make a string a local path rather than a hub id ("org/name").
LOCAL_ENDINGS = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow", ".safetensors", ".bin", ".pt", ".yaml",
                 ".gguf")


def looks_local(name: str) -> bool:
    """True for strings that can only be local paths: absolute, ./ ../ ~ prefixes, more than one
    '/', or a data/weights file ending. A plain "org/name" may be either and is left to the hub."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.strip("/").count("/") > 1
            or name.lower().endswith(LOCAL_ENDINGS) or os.sep != "/" and os.sep in name)


def check_local_path(name: Any, field: str) -> None:
    """A string that is a local path must exist: "no such file or folder" instead of the hub's
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    if isinstance(name, (str, os.PathLike)):
        name = os.fspath(name)
        if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
            raise FileNotFoundError(
                f"{field}: no such file or folder: {name!r} (relative to {os.getcwd()}); check the path, or give a "
                "hub id such as 'org/name'"
            )


def absolute_if_local(name: Any) -> Any:
    """A string (or `PathLike`) naming an existing local file or folder, relative to this process's
    working directory (`~` expanded): its absolute path. Anything else (a hub id such as "org/name"
    that is no local folder, a model object, a callable, None) comes back unchanged."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if isinstance(name, str) and name and os.path.exists(os.path.expanduser(name)):
        return os.path.abspath(os.path.expanduser(name))
    return name


def resolve_paths(model, ref_model, reward_funcs, args):
    """Every path the user gave, made absolute here in the driver before any role receives it: a Ray
    worker runs in its raylet's working directory (where `ray start` ran), not the driver's, so a
    relative path would name another folder there (or pass for a hub id). `args.output_dir` (which
    may not exist yet; the checkpoint folders derive from it) always becomes absolute, model and
    reward-model strings when they name something local. Returns (model, ref_model, reward_funcs);
    the path fields of `args` are set in place."""
    args.output_dir = os.path.abspath(os.path.expanduser(os.fspath(args.output_dir)))
    # `model_init_kwargs={"gguf_file": name}` (transformers' spelling) names a GGUF file in the
    # model's folder; the converted folder needs no such argument, so it leaves the kwargs here.
    gguf_file = None
    if getattr(args, "model_init_kwargs", None) and "gguf_file" in args.model_init_kwargs:
        args.model_init_kwargs = dict(args.model_init_kwargs)
        gguf_file = args.model_init_kwargs.pop("gguf_file")
    args.reward_model_path = model_source(absolute_if_local(args.reward_model_path), "reward_model_path")
    if isinstance(reward_funcs, (list, tuple)):
        reward_funcs = [model_source(absolute_if_local(func), f"reward_funcs[{i}]") for i, func in enumerate(reward_funcs)]
    else:
        reward_funcs = model_source(absolute_if_local(reward_funcs), "reward_funcs")
    return (model_source(absolute_if_local(model), "model", gguf_file),
            model_source(absolute_if_local(ref_model), "ref_model", gguf_file), reward_funcs)


def model_source(name: Any, field: str, gguf_file: str | None = None) -> Any:
    """A model given as a GGUF file (`x.gguf`, or a folder holding `gguf_file`) or as a packaged
    model's alias (`smollm2-135m-instruct`): the plain folder converted from it (once, cached;
    `odpo_vllm.models`). Anything else comes back unchanged."""
    if not isinstance(name, str):
        return name
    from odpo_vllm.models.gguf import convert_gguf, is_gguf
    from odpo_vllm.models.packaged import PACKAGED, packaged_gguf

    if name.lower() in PACKAGED and not os.path.exists(name):
        return convert_gguf(packaged_gguf(name, field), field)
    if gguf_file and os.path.isdir(name) and os.path.isfile(os.path.join(name, gguf_file)):
        return convert_gguf(os.path.join(name, gguf_file), field)
    if is_gguf(name):
        return convert_gguf(name, field)
    return name


def check_paths(model, ref_model, reward_funcs, args) -> None:
    """Every model the trainer would load from a string, before anything is loaded."""
    check_local_path(model, "model")
    check_local_path(ref_model, "ref_model")
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    for i, func in enumerate(funcs):
        check_local_path(func, f"reward_funcs[{i}]" if isinstance(reward_funcs, (list, tuple)) else "reward_funcs")
    check_local_path(args.reward_model_path, "reward_model_path")


# ---------------------------------------------------------------------------------------- tokenizers
def check_tokenizer(tokenizer, field: str = "processing_class") -> None:
    """Padding needs a pad token, and the EOS token stands in for a missing one; a tokenizer with
    neither fails here instead of at step 1 (`full(): argument 'fill_value' ... NoneType`)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ValueError(
            f"{field}: the tokenizer has neither a pad token nor an EOS token; give it one, e.g. "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) (and resize the model's embeddings), "
            "or set tokenizer.pad_token to an existing token"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def vocab_size(model_or_config) -> int | None:
    """Rows of the output (or input) embedding, else the config's vocab_size."""
    if hasattr(model_or_config, "get_output_embeddings"):
        for layer in (model_or_config.get_output_embeddings(), model_or_config.get_input_embeddings()):
            weight = getattr(layer, "weight", None)
            if weight is not None and weight.dim() == 2 and weight.shape[0] > 0:  # ZeRO-3 shards are empty
                return int(weight.shape[0])
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "vocab_size", None)
    return int(size) if size else None


def check_tokenizer_fits(tokenizer, model_or_config, field: str, model_field: str) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding (else an
    IndexError in the first forward pass)."""
    size = vocab_size(model_or_config)
    if size is not None and len(tokenizer) > size:
        raise ValueError(
            f"{field}: the tokenizer has {len(tokenizer)} tokens but {model_field} has a vocabulary of {size}; use "
            f"the model's own tokenizer, or resize the model (model.resize_token_embeddings(len(tokenizer)))"
        )


def check_special_ids_fit(tokenizer, model_or_config, field: str = "processing_class") -> None:
    """The ids the trainer itself puts into sequences (padding, EOS) must have a row in the
    policy's embedding. A tokenizer larger than the embedding is accepted otherwise (e.g. a Qwen2
    tokenizer class that adds `<|endoftext|>` on load): an added id that never occurs does no harm,
    and one that occurs in a prompt fails at encoding, naming the row (`PromptEncoder`)."""
    size = vocab_size(model_or_config)
    if size is None:
        return
    for name in ("pad_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, int) and token_id >= size:
            raise ValueError(
                f"{field}: its {name[:-3]} {tokenizer.convert_ids_to_tokens(token_id)!r} has id {token_id}, outside "
                f"the policy's vocabulary of {size}; set tokenizer.{name[:-3]} to a token the model has, or resize "
                "the model (model.resize_token_embeddings(len(tokenizer)))"
            )


def check_models(model, ref_model, tokenizer, config=None) -> None:
    """The policy, its reference and the tokenizer agree on the vocabulary."""
    check_special_ids_fit(tokenizer, model if model is not None else config)
    if ref_model is not None and model is not None:
        policy, reference = vocab_size(model), vocab_size(ref_model)
        if policy is not None and reference is not None and policy != reference:
            raise ValueError(
                f"ref_model: its vocabulary has {reference} tokens but the policy's has {policy}; the reference "
                "must score the policy's tokens: use a checkpoint of the same model family and tokenizer, or "
                "ref_model=None for a frozen copy of the policy"
            )


def check_reward_model(model, tokenizer, index: int, name: str) -> None:
    """A reward model gives one score per sequence and reads its own tokenizer's ids."""
    labels = getattr(model.config, "num_labels", 1)
    if labels != 1:
        raise ValueError(
            f"reward_funcs[{index}] ({name}): the reward model has num_labels={labels}; a reward model gives one "
            "score per sequence: load it with AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)"
        )
    check_tokenizer(tokenizer, f"reward_processing_classes[{index}] ({name})")
    check_tokenizer_fits(tokenizer, model, f"reward_processing_classes[{index}] ({name})",
                         f"reward model {name!r}")


# ---------------------------------------------------------------------------------------- rewards
def reward_values(values, function: str, expected: int) -> list[float]:
    """A reward function's output as floats (None -> NaN: no opinion). Anything else that is not a
    finite number fails, naming the function, the value and the completion's index."""
    if hasattr(values, "tolist"):  # numpy array, tensor
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TypeError(
            f"reward function {function!r} returned {type(values).__name__}; return a list with one float (or "
            f"None) per completion ({expected} here)"
        )
    if len(values) != expected:
        raise ValueError(f"reward function {function!r} returned {len(values)} values for {expected} completions")
    out = []
    for index, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"reward function {function!r} returned {value!r} ({type(value).__name__}) for completion {index}; "
                "return a float, or None for no opinion"
            )
        if not math.isfinite(value):
            raise ValueError(
                f"reward function {function!r} returned {value} for completion {index}; return a finite float, or "
                "None for no opinion"
            )
        out.append(float(value))
    return out


# ---------------------------------------------------------------------------------------- generation
# Names generation_kwargs may use on either backend, beyond the backend's own: our config's fields.
OUR_SAMPLING_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
# Set by the trainer for every request: a user value would conflict.
RESERVED_KEYS = {"n": "num_samples", "num_return_sequences": "num_samples", "seed": "seed",
                 "logprobs": None, "stop_token_ids": None, "output_kind": None}


# vLLM's sampling arguments under the names `generation_kwargs` may use (`vllm_engine.sampling_params`)
SAMPLING_ALIASES = {"max_new_tokens": "max_tokens"}
HF_ONLY_KEYS = {"do_sample", "use_cache", "num_beams", "cache_implementation"}  # dropped for vLLM


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def generation_kwargs_keys(use_vllm: bool) -> set[str]:
    """The keys `generation_kwargs` may hold for the backend that will sample."""
    if use_vllm:
        from vllm import SamplingParams

        fields = {f for f in SamplingParams.__struct_fields__ if not f.startswith("_")}
        return fields | set(SAMPLING_ALIASES) | set(HF_ONLY_KEYS) | OUR_SAMPLING_KEYS
    from transformers import GenerationConfig

    return set(GenerationConfig().to_dict()) | OUR_SAMPLING_KEYS


def check_generation_kwargs(generation_kwargs: dict | None, use_vllm: bool) -> None:
    if not generation_kwargs:
        return
    backend = "vLLM's SamplingParams" if use_vllm else "transformers' GenerationConfig"
    for key in generation_kwargs:
        if key in RESERVED_KEYS:
            instead = RESERVED_KEYS[key]
            raise ValueError(
                f"OnlineDPOConfig.generation_kwargs: {key!r} is set by the trainer for every request"
                + (f"; use OnlineDPOConfig.{instead}" if instead else "; remove it")
            )
    allowed = generation_kwargs_keys(use_vllm)
    unknown = sorted(set(generation_kwargs) - allowed)
    if unknown:
        import difflib

        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, 1)) else repr(k)
                 for k in unknown]
        raise ValueError(
            f"OnlineDPOConfig.generation_kwargs: {', '.join(hints)} not known to {backend}, which samples here "
            f"(use_vllm={use_vllm}); remove or rename them"
        )


def check_inputs(model, ref_model, reward_funcs, args) -> None:
    """What can be checked before anything is loaded: paths and the sampling settings."""
    check_paths(model, ref_model, reward_funcs, args)
    use_vllm = args.placement != "in_process" or (args.use_vllm if args.use_vllm is not None else vllm_available())
    check_generation_kwargs(args.generation_kwargs, use_vllm)
