"""A GGUF file as a plain Hugging Face folder.

vLLM engines, DeepSpeed ranks, the reference model and reward workers all load weights with
`from_pretrained(folder)` (or vLLM's loader) from a path. transformers can read a GGUF file, but it
dequantizes it on every load (~25 s for a 135M model here) and marks the result as quantized, so
it cannot be saved or handed to vLLM as is. So the driver converts the file once: the dequantized
weights (fp32: every GGUF block type dequantizes exactly into it), the tokenizer with its chat
template and the generation config go into a folder in a cache keyed by the file's SHA-256, and
that folder is what every role receives. A second run (or a second role) finds it there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

logger = logging.getLogger("odpo_vllm")

# What the folder holds when its conversion finished (written last, read first).
DONE_FILE = "odpo_vllm_gguf.json"


class GGUFError(ValueError):
    """A GGUF file that cannot become a plain folder (names the file and what to do)."""


def is_gguf(name) -> bool:
    return isinstance(name, (str, os.PathLike)) and os.fspath(name).lower().endswith(".gguf")


def cache_root() -> str:
    """`$ODPO_VLLM_CACHE/gguf`, default `~/.cache/odpo_vllm/gguf`. On a cluster of several nodes
    this must be storage every node sees (the roles load the converted folder from it)."""
    base = os.environ.get("ODPO_VLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "odpo_vllm")
    return os.path.join(base, "gguf")


def file_sha256(path: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(path: str, field: str = "model", cache_dir: str | None = None) -> str:
    """The converted folder of GGUF file `path` (converted now if the cache does not hold it).
    `field` names the argument in errors. Safe to call from several processes at once: one
    converts (under a lock file), the others wait and reuse its folder."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}: no such GGUF file: {path!r}")
    root = cache_dir or cache_root()
    os.makedirs(root, exist_ok=True)
    stem = os.path.basename(path)
    if is_gguf(stem):
        stem = stem[: -len(".gguf")]
    folder = os.path.join(root, f"{stem}-{file_sha256(path)[:16]}")
    if os.path.exists(os.path.join(folder, DONE_FILE)):
        return folder
    import fcntl

    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same file: wait for it
        if not os.path.exists(os.path.join(folder, DONE_FILE)):
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            if logger.getEffectiveLevel() > logging.INFO:
                hf_logging.disable_progress_bar()  # the console stays quiet unless log_level asks
            try:
                _convert(path, folder, field)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
    return folder


def _convert(path: str, folder: str, field: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    started = time.monotonic()
    logger.info("%s: converting %s to a plain folder (once; cached in %s)", field, path, folder)
    directory, name = os.path.split(path)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise GGUFError(f"{field}: reading {path} needs the gguf package: pip install gguf") from err
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except Exception as err:  # ValueError for a foreign file or architecture, struct.error for a cut-short one
        raise GGUFError(
            f"{field}: transformers cannot read the GGUF file {path} ({type(err).__name__}: {err}); it must be a "
            "complete GGUF file of an architecture transformers dequantizes (see "
            "`transformers.modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES`): convert it to a Hugging Face "
            "folder yourself, or give the original model's folder or hub id"
        ) from err
    architecture = getattr(config, "model_type", None)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except Exception as err:  # tensors cut short, an unknown tokenizer model, a non-causal-LM architecture
        raise GGUFError(
            f"{field}: transformers read the metadata of the GGUF file {path} (architecture {architecture!r}) but "
            f"not its weights or tokenizer ({type(err).__name__}: {err}); convert it to a Hugging Face folder "
            "yourself, or give the original model's folder or hub id"
        ) from err
    # The loaded model is marked quantized (save_pretrained refuses it); its weights are already
    # plain fp32 tensors, so a model built from the config without the quantization marker takes them.
    plain_config = loaded.config
    if hasattr(plain_config, "quantization_config"):
        del plain_config.quantization_config
    plain_config.dtype = torch.float32
    # The file's tokenizer ids are the truth: a GGUF without a BOS token otherwise leaves the config
    # class's default BOS id (1 for Llama), which names some other token of this vocabulary.
    for kind in ("bos", "pad"):
        setattr(plain_config, f"{kind}_token_id", getattr(tokenizer, f"{kind}_token_id"))
    if plain_config.eos_token_id is None:
        plain_config.eos_token_id = tokenizer.eos_token_id
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    missing = [key for key in missing if key not in tied and key != "lm_head.weight"]
    if missing or unexpected:
        raise GGUFError(f"{field}: converting {path}: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    staging = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".", dir=os.path.dirname(folder))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        generation = GenerationConfig.from_model_config(plain_config)
        generation.save_pretrained(staging)
        with open(os.path.join(staging, DONE_FILE), "w") as f:
            json.dump({"source": path, "architecture": architecture,
                       "parameters": sum(p.numel() for p in plain.parameters())}, f)
        if os.path.exists(folder):  # a conversion cut short earlier: no DONE_FILE, so incomplete
            shutil.rmtree(folder)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("%s: converted %s in %.0f s", field, os.path.basename(path), time.monotonic() - started)
