"""LoRA weights for the engines are merged out of place: publishing never writes to the training
model, whose base weights are the DPO reference (the policy with its adapter disabled).

- bf16, 100 publishes: every base weight is bitwise what it was, and each published weight is
  base + delta (PEFT's in-place merge/unmerge moved the base weights at every publish);
- the merge is PEFT's (`merge_and_unload`) in fp32, for Linear, Conv1D (`fan_in_fan_out`) and
  Embedding LoRA layers, under the base names;
- DeepSpeed ZeRO-2 and ZeRO-3 ranks (one rank on gloo, in this process) publish the same weights
  through training steps, and neither moves the base weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from odpo_vllm.weights.names import LearnerWeights, checkpoint_name

from conftest import free_port, make_args


def lora_policy(model, target_modules, dtype=torch.float32, seed=0, **lora):
    """`model` with a LoRA adapter whose B is random (a fresh adapter's B is zero: no delta; an
    embedding's is A, so both are drawn there)."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(model.to(dtype), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=target_modules, **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name or "lora_embedding_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return policy


def expected_merge(policy) -> dict[str, torch.Tensor]:
    """PEFT's own merge, in fp32, on a copy, under checkpoint names."""
    merged = copy.deepcopy(policy).float().merge_and_unload()
    return {name: tensor for name, tensor in merged.state_dict().items()}


def test_bf16_publishes_leave_the_base_weights_bitwise_unchanged(model):
    policy = lora_policy(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         dtype=torch.bfloat16)
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    want = expected_merge(policy)
    source = LearnerWeights(policy, torch.bfloat16)
    for _ in range(100):
        published = dict(source)
    moved = [name for name, tensor in policy.state_dict().items() if not torch.equal(tensor, before[name])]
    assert moved == [], f"{len(moved)} tensors moved, e.g. {moved[:3]}"
    assert not any(layer.merged for layer in policy.modules() if hasattr(layer, "merged"))

    assert set(published) == set(want) and [m.name for m in source.tensor_meta()] == list(published)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(published[q_proj], before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    for name, tensor in published.items():
        assert tensor.dtype == torch.bfloat16
        # rounded once from the exact fp32 sum: at most half a bf16 step (2^-8 relative) off
        torch.testing.assert_close(tensor.float(), want[name], rtol=2 ** -8, atol=1e-6, msg=name)


@pytest.mark.parametrize("layers", ["linear_with_bias", "embedding", "conv1d"])
def test_published_weights_are_peft_merge_under_base_names(layers):
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    torch.manual_seed(0)
    if layers == "conv1d":  # GPT-2's Conv1D stores weights (in, out): fan_in_fan_out
        config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
        targets, extra = ["c_attn", "c_proj"], {"fan_in_fan_out": True}
    else:  # untied embeddings: a LoRA on embed_tokens must not reach lm_head
        config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
        targets, extra = (["embed_tokens"], {}) if layers == "embedding" else (["q_proj"], {"lora_bias": True})
    policy = lora_policy(AutoModelForCausalLM.from_config(config), targets, **extra)
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    want = expected_merge(policy)
    published = dict(LearnerWeights(policy))
    assert set(published) == set(want)
    assert set(published) == {checkpoint_name(n) for n in before if checkpoint_name(n) is not None}
    for name, tensor in published.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-6, atol=1e-6, msg=name)
    adapted = [n for n in before if n.endswith(".base_layer.weight")]  # published under the base name, with the delta
    assert adapted and all(not torch.equal(published[checkpoint_name(n)], before[n]) for n in adapted)
    assert all(torch.equal(tensor, before[name]) for name, tensor in policy.state_dict().items())


# --------------------------------------------------------------------------------- DeepSpeed
@pytest.fixture
def one_rank_world(monkeypatch):
    """The environment of a single DeepSpeed rank on gloo in this process; its process group is
    destroyed afterwards (a test started later must find none)."""
    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for name, value in world.items():
        monkeypatch.setenv(name, value)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def deepspeed_publishes(model_path: str, args, zero_stage: int, batch, pad_token_id: int) -> dict:
    """A DeepSpeed rank of a LoRA policy takes 3 SGD steps, publishing after each: its last
    published weights, its base weights (ZeRO-3: gathered) before and after, and whether its
    weights were partitioned (ZeRO-3: publishing had to gather them)."""
    from peft import LoraConfig

    from odpo_vllm.learning.deepspeed_rank import DeepSpeedRank, import_deepspeed
    from odpo_vllm.learning.models import prepare_policy_and_reference

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    policy, reference = prepare_policy_and_reference(model_path, None, lora, args)
    rank = DeepSpeedRank(policy, reference, args, pad_token_id, num_training_steps=3, zero_stage=zero_stage)
    module = rank.model_engine.module

    def base_weights():
        with import_deepspeed().zero.GatheredParameters(list(module.parameters()), enabled=zero_stage == 3):
            return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" not in n}

    base = base_weights()
    for _ in range(3):
        rank.step(batch, beta=0.1)
        published = dict(rank.named_weights(bucket_bytes=16 << 10))  # small buckets: several gathers
    partitioned = next(p for n, p in module.named_parameters() if "q_proj.base_layer.weight" in n).numel() == 0
    adapter = dict(rank.adapter_tensors())  # lora_sync='adapter': the LoRA matrices alone, gathered
    meta = {m.name: m.shape for m in rank.adapter_meta()}  # without gathering
    with import_deepspeed().zero.GatheredParameters(list(module.parameters()), enabled=zero_stage == 3):
        from peft import get_peft_model_state_dict

        peft_saved = {n: t.detach().clone() for n, t in get_peft_model_state_dict(module).items()}
    return {"published": published, "base_before": base, "base_after": base_weights(), "partitioned": partitioned,
            "adapter": adapter, "adapter_meta": meta, "peft_saved": peft_saved,
            "unmerged": dict(rank.named_weights(bucket_bytes=16 << 10, merge_lora=False))}


def test_zero2_and_zero3_publish_the_same_lora_weights(model_path, tokenizer, tmp_path, one_rank_world):
    from odpo_vllm.core.batches import PairBatch

    generator = torch.Generator().manual_seed(0)

    def completion(length):
        return torch.randint(5, 300, (length,), generator=generator).tolist()

    batch = PairBatch([tokenizer(f"Review the {s}:")["input_ids"] for s in ("film", "book")],
                      [completion(6), completion(7)], [completion(9), completion(8)])
    args = make_args(tmp_path, optim="sgd", learning_rate=0.5, gradient_checkpointing=False)
    runs = {stage: deepspeed_publishes(model_path, args, stage, batch, tokenizer.pad_token_id) for stage in (2, 3)}
    assert runs[3]["partitioned"] and not runs[2]["partitioned"]  # ZeRO-3 published from gathers
    zero2, zero3 = runs[2]["published"], runs[3]["published"]
    assert set(zero2) == set(zero3)
    gap = max((zero2[n] - zero3[n]).abs().max().item() for n in zero2)
    assert gap < 1e-6, f"ZeRO-2 and ZeRO-3 publish different weights: max abs difference {gap:.3g}"
    for stage, run in runs.items():
        assert all(torch.equal(run["base_after"][n], t) for n, t in run["base_before"].items()), f"ZeRO-{stage}"
    base_q_proj = runs[2]["base_before"]["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    delta = (zero2["model.layers.0.self_attn.q_proj.weight"] - base_q_proj).abs().max().item()
    assert delta > 1e-4  # the steps trained the adapter: a real delta (4e-4 seen), 400x the gap allowed
    # lora_sync='adapter': the adapter alone under PEFT's saved names, equal to what PEFT saves,
    # its sizes known without a gather; the base pushed once is the untouched base
    for stage, run in runs.items():
        assert list(run["adapter"]) == list(run["adapter_meta"]) == list(run["peft_saved"]), f"ZeRO-{stage}"
        assert len(run["adapter"]) == 8  # 2 layers x q, v x A, B
        assert all(torch.equal(run["adapter"][n], t) and tuple(t.shape) == run["adapter_meta"][n]
                   for n, t in run["peft_saved"].items()), f"ZeRO-{stage}"
        base = {checkpoint_name(n): t for n, t in run["base_before"].items()}
        assert set(run["unmerged"]) >= set(base) and all(torch.equal(run["unmerged"][n], t) for n, t in base.items())
    assert max((runs[2]["adapter"][n] - runs[3]["adapter"][n]).abs().max().item() for n in runs[2]["adapter"]) < 1e-6
    assert runs[2]["adapter"]["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 0


def test_lora_sync_choice_names_why_and_refuses_what_vllm_cannot_serve(model, caplog, tmp_path):
    from odpo_vllm.weights.adapter import adapter_weights, choose_lora_sync, vllm_max_lora_rank, write_adapter

    plain = lora_policy(copy.deepcopy(model), ["q_proj", "v_proj"])
    assert choose_lora_sync("auto", plain, on_gpu=True) == "adapter"
    assert choose_lora_sync("adapter", plain, on_gpu=False) == "adapter"
    assert choose_lora_sync("merged", plain, on_gpu=True) == "merged"
    assert choose_lora_sync("auto", model, on_gpu=True) == "merged"  # no adapter at all
    with caplog.at_level("INFO", logger="odpo_vllm.weights.adapter"):
        assert choose_lora_sync("auto", plain, on_gpu=False) == "merged"
        assert choose_lora_sync("auto", plain, on_gpu=True, where="servers take whole weights only") == "merged"
    assert "on CPU vLLM runs LoRA without its kernels" in caplog.messages[0]
    assert "servers take whole weights only" in caplog.messages[1]
    # a Ray placement's driver decides from the PEFT config alone, by the same rules
    from peft import LoraConfig as Config

    assert choose_lora_sync("auto", Config(r=8, target_modules=["q_proj"]), on_gpu=True) == "adapter"
    with pytest.raises(ValueError, match=r"lora_sync='adapter': vLLM does not serve DoRA"):
        choose_lora_sync("adapter", Config(r=8, target_modules=["q_proj"], use_dora=True), on_gpu=True)
    dora = lora_policy(copy.deepcopy(model), ["q_proj", "v_proj"], use_dora=True)
    with pytest.raises(ValueError, match=r"lora_sync='adapter': vLLM does not serve DoRA \(use_dora\).*lora_sync='merged'"):
        choose_lora_sync("adapter", dora, on_gpu=True)
    assert choose_lora_sync("auto", dora, on_gpu=True) == "merged"
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 9, 320, 512)] == [1, 8, 8, 16, 320, 512]
    # what an engine loads: PEFT's own names, the engine's dtype, a config PEFT reads back
    from peft import LoraConfig
    from safetensors.torch import load_file

    adapter = adapter_weights(plain, torch.bfloat16)
    write_adapter(str(tmp_path / "a"), adapter)
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    assert set(saved) == set(get_peft_model_state_dict(plain)) and len(saved) == 8  # 2 layers x q, v x A, B
    assert all(t.dtype == torch.bfloat16 for t in saved.values()) and adapter.nbytes == sum(
        t.numel() * 2 for t in saved.values())
    assert LoraConfig.from_pretrained(str(tmp_path / "a")).r == 4


@pytest.mark.parametrize("where,lora,why", [
    (dict(vllm_mode="server"), {}, r"a vLLM server \(vllm_mode='server'\) takes whole weights only"),
    (dict(placement="dedicated"), dict(use_dora=True), r"vLLM does not serve DoRA \(use_dora\)"),
    (dict(placement="colocated", vllm_tensor_parallel_size=2), {}, r"vllm_tensor_parallel_size > 1")],
    ids=["server", "dora-on-ray", "tensor-parallel-on-ray"])
def test_adapter_pushes_vllm_cannot_take_are_refused_before_anything_starts(model_path, tmp_path, where, lora, why):
    from peft import LoraConfig

    from odpo_vllm import OnlineDPOTrainer, toy

    with pytest.raises(ValueError, match=r"OnlineDPOConfig.lora_sync='adapter': " + why + r".*lora_sync='merged'"):
        OnlineDPOTrainer(model_path, reward_funcs=toy.short_reward,
                         args=make_args(tmp_path, lora_sync="adapter", use_vllm=True, **where),
                         train_dataset=toy.prompt_dataset(4),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM", **lora))
    with pytest.raises(ValueError, match=r"OnlineDPOConfig.lora_sync: 'adapters' is not supported; use one of auto"):
        make_args(tmp_path, lora_sync="adapters")
