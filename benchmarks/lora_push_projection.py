"""Bytes per weight push, merged against adapter (`lora_sync`), for models larger than this
machine trains: each model is built from its published shapes on PyTorch's meta device (no
weights, no download), wrapped with a LoRA adapter by PEFT, and measured with the trainer's own
code: `LearnerWeights` (what a merged push sends: every tensor the engine loads, a tied output
layer included, as the SmolLM2 runs' `sync/bytes` counts it) and PEFT's adapter state dict (what
an adapter push sends). Bytes are for the dtype the engines serve (`--dtype`, bf16 on GPUs).

The first row is checked against a measurement: SmolLM2-135M-Instruct with r 16 on q_proj and
v_proj in fp32 is what `bench_lora_sync.py` ran (`results/lora_sync_cpu.md`: 6.51e+08 merged,
3.69e+06 adapter bytes per push).

    python benchmarks/lora_push_projection.py [--dtype bf16] [--rank 16]
"""

from __future__ import annotations

import argparse
import os

HERE = os.path.dirname(os.path.abspath(__file__))

# The published config.json shapes (Hugging Face model cards) of each model.
SHAPES = {
    "SmolLM2-135M-Instruct": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                             num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                             tie_word_embeddings=True)),
    "Qwen2.5-0.5B-Instruct": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                             num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                             tie_word_embeddings=True)),
    "Qwen2.5-1.5B-Instruct": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                             num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                             tie_word_embeddings=True)),
    "Qwen2.5-7B-Instruct": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                           num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                           tie_word_embeddings=False)),
}
TARGETS = {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}


def push_bytes(config, rank: int, targets, element_bytes: int) -> tuple[int, int, int]:
    """(parameters of the model, bytes of a merged push, bytes of an adapter push) for a model of
    `config` with a LoRA adapter of `rank` on `targets`."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from odpo_vllm.weights.names import LearnerWeights

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    merged = sum(tensor.numel() for _, tensor in LearnerWeights(model)) * element_bytes
    adapter = sum(tensor.numel() for tensor in get_peft_model_state_dict(model).values()) * element_bytes
    return parameters, merged, adapter


def config_of(name: str):
    from transformers import AutoConfig

    model_type, shape = SHAPES[name]
    return AutoConfig.for_model(model_type, **shape)


def report(rank: int, dtype: str) -> list[str]:
    lines = [f"# Bytes per weight push: merged vs adapter (LoRA r {rank}, {dtype})", "",
             "`python benchmarks/lora_push_projection.py " + f"--rank {rank} --dtype {dtype}`: models built from "
             "their published shapes on the meta device; a merged push is what `LearnerWeights` yields (a tied "
             "output layer is sent as its own tensor), an adapter push PEFT's adapter state dict.", "",
             "| model | parameters | LoRA targets | merged push | adapter push | adapter / merged |",
             "|---|---|---|---|---|---|"]
    for name in SHAPES:
        for label, targets in TARGETS.items():
            parameters, merged, adapter = push_bytes(config_of(name), rank, targets, DTYPES[dtype])
            lines.append(f"| {name} | {parameters / 1e9:.3f} B | {label} | {merged / 1e9:.2f} GB | "
                         f"{adapter / 1e6:.1f} MB | {100 * adapter / merged:.2f}% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "lora_push_projection.md"))
    options = parser.parse_args()
    _, merged, adapter = push_bytes(config_of("SmolLM2-135M-Instruct"), 16, TARGETS["q,v"], DTYPES["fp32"])
    check = (f"Check against the measured SmolLM2 run (r 16, q,v, fp32; `results/lora_sync_cpu.md`: 6.51e+08 merged, "
             f"3.69e+06 adapter): projected {merged:.3g} merged, {adapter:.3g} adapter.")
    lines = report(options.rank, options.dtype) + ["", check]
    with open(options.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
