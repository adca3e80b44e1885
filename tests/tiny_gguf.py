"""Tiny GGUF files for tests, written here (no download).

`tiny_llama(dir)` saves a random-init `LlamaForCausalLM` (hidden 64, 2 heads of 32, 1 KV head,
2 layers, tied embeddings) with the toy byte-level BPE tokenizer and its ChatML-like template.
`write_llama_gguf(path, dir)` writes that model as an F32 GGUF in llama.cpp's conventions, so that
transformers' GGUF loader reads it back to the same weights and an equivalent tokenizer:

- metadata under the architecture "llama" (`llama.context_length`, `llama.block_count`, ...);
- tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output` only
  when the embeddings are untied), each a numpy array of the Hugging Face shape (GGUF stores the
  dimensions reversed; the writer and reader both handle that);
- the rows of the Q and K projections permuted the way llama.cpp's converter does it: Hugging Face
  keeps each head's rotary pairs as (first half, second half) of the head, llama.cpp interleaves
  them; transformers' `LlamaTensorProcessor` undoes exactly this on load;
- the tokenizer as a byte-level BPE ("gpt2" model): tokens in id order, their types (control for
  the special tokens), merges as "a b" strings, bos/eos/pad ids and the chat template.
"""

from __future__ import annotations

import json
import os

import numpy as np

TOKEN_NORMAL = 1
TOKEN_CONTROL = 3


def tiny_llama(path: str | os.PathLike, seed: int = 0, num_key_value_heads: int = 1, tie_word_embeddings: bool = True) -> str:
    """A random-init tiny Llama with the toy tokenizer (and its chat template) saved at `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from odpo_vllm import toy

    tokenizer = toy.build_tokenizer(seed=seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: vLLM's CPU attention needs >= 32
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms start at exactly 1: make them distinct so a mix-up shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return os.fspath(path)


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Q/K rows from Hugging Face's rotary layout (per head: all first halves, then all second
    halves) to llama.cpp's (per head: the two halves interleaved pair by pair)."""
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _tokenizer_fields(model_dir: str):
    """(tokens in id order, token types, merges as "a b", special ids) of the saved tokenizer."""
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"{model_dir}: only a byte-level BPE tokenizer can be written, not {spec['model']['type']}")
    vocab = dict(spec["model"]["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["content"])
    tokens = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    if any(token is None for token in tokens):
        raise ValueError(f"{model_dir}: the vocabulary has holes")
    types = [TOKEN_CONTROL if token in special else TOKEN_NORMAL for token in tokens]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"].get("merges", [])]
    return tokens, types, merges


def write_llama_gguf(path: str | os.PathLike, model_dir: str | os.PathLike) -> str:
    """Write the Llama model (and tokenizer) saved in `model_dir` as an F32 GGUF file at `path`."""
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    path, model_dir = os.fspath(path), os.fspath(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise ValueError(f"{model_dir}: a {config.model_type} model, only llama is written")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(os.path.basename(model_dir.rstrip(os.sep)) or "tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)

    tokens, types, merges = _tokenizer_fields(model_dir)
    if len(tokens) != config.vocab_size:
        raise ValueError(f"{model_dir}: {len(tokens)} tokens for a vocabulary of {config.vocab_size}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    def tensor(name: str) -> np.ndarray:
        return state[name].to(torch.float32).numpy()

    writer.add_tensor("token_embd.weight", tensor("model.embed_tokens.weight"))
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", tensor(hf + "input_layernorm.weight"))
        writer.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(tensor(hf + "self_attn.q_proj.weight"), heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(tensor(hf + "self_attn.k_proj.weight"), kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", tensor(hf + "self_attn.v_proj.weight"))
        writer.add_tensor(f"blk.{i}.attn_output.weight", tensor(hf + "self_attn.o_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", tensor(hf + "post_attention_layernorm.weight"))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", tensor(hf + "mlp.gate_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", tensor(hf + "mlp.up_proj.weight"))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", tensor(hf + "mlp.down_proj.weight"))
    writer.add_tensor("output_norm.weight", tensor("model.norm.weight"))
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", tensor("lm_head.weight"))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_unsupported_gguf(path: str | os.PathLike, architecture: str = "rwkv6") -> str:
    """A small valid GGUF of an architecture transformers' GGUF loader does not read."""
    import gguf

    writer = gguf.GGUFWriter(os.fspath(path), architecture)
    writer.add_name("unsupported")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_context_length(16)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c", "d"])
    writer.add_token_types([TOKEN_NORMAL] * 4)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)
