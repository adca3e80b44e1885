"""OnlineDPOTrainer end to end on a tiny random model: each test trains a few steps and checks
something that would break if the behaviour were wrong."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import changed, make_args, snapshot, train_rows
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from odpo_vllm import OnlineDPOTrainer, PairwiseJudge, toy

SEED_METRICS = [
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "objective/scores_margin",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "val/contain_eos_token",
    "beta",
    "loss",
]
LN2 = 0.6931471805599453


def make_trainer(model, tmp_path, reward_funcs=toy.sentiment_reward, dataset=None, **overrides):
    trainer_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in (
        "ref_model", "eval_dataset", "processing_class", "reward_processing_classes", "peft_config",
        "callbacks", "compute_metrics")}
    return OnlineDPOTrainer(
        model,
        reward_funcs=reward_funcs,
        args=make_args(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else toy.prompt_dataset(8),
        **trainer_kwargs,
    )


def read_completions(trainer):
    with open(os.path.join(trainer.args.output_dir, "completions.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------- basics
def test_standard_prompts(model, tmp_path):
    trainer = make_trainer(model, tmp_path, max_steps=3)
    before = snapshot(trainer.model)
    output = trainer.train()
    assert output.global_step == 3 and trainer.state.global_step == 3
    assert changed(before, trainer.model) == set(before)  # every parameter moved (all are trainable)

    rows = train_rows(trainer)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        for name in SEED_METRICS:
            assert name in row, name
            assert math.isfinite(row[name]), name
        assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-5)
        # the reference's conventions: non_score_reward = -beta * KL, rlhf_reward = score + non_score_reward
        assert row["objective/non_score_reward"] == pytest.approx(-row["beta"] * row["objective/kl"], abs=1e-5)
        assert row["objective/rlhf_reward"] == pytest.approx(
            row["objective/scores"] + row["objective/non_score_reward"], abs=1e-5)
        # entropy is the mean negative logprob of a pair's two sequences
        assert row["objective/entropy"] == pytest.approx(-(row["logps/chosen"] + row["logps/rejected"]) / 2, abs=1e-4)
    # the logged pairs are the pairs trained on: scores_margin is the mean chosen - rejected score of
    # the step's pairs as written to completions.jsonl
    logged = read_completions(trainer)
    for row in rows:
        pairs = [e for e in logged if e["step"] == row["step"]]
        assert len(pairs) == 2
        margin = sum(e["chosen_score"] - e["rejected_score"] for e in pairs) / 2
        assert row["objective/scores_margin"] == pytest.approx(margin, abs=1e-5)
    # step 1: the policy still equals its frozen copy -> h = 0 -> loss = log 2, kl = 0
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # later steps: the policy moved away from the reference
    assert rows[-1]["objective/kl"] != pytest.approx(0.0, abs=1e-4)

    last = trainer.state.log_history[-1]
    assert "train_loss" in last
    assert last["train_loss"] == pytest.approx(sum(r["loss"] for r in rows) / 3, abs=1e-5)
    assert output.training_loss == pytest.approx(last["train_loss"], abs=1e-5)
    # the reference stays frozen
    reference = AutoModelForCausalLM.from_pretrained(trainer.model.config._name_or_path)
    assert not changed(snapshot(reference), trainer.ref_model)


def test_ipo_first_step_loss(model, tmp_path):
    # h = 0 at step 1 -> IPO loss (0 - 1/(2*0.1))^2 = 25
    trainer = make_trainer(model, tmp_path, max_steps=2, loss_type="ipo", beta=0.1)
    before = snapshot(trainer.model)
    trainer.train()
    rows = train_rows(trainer)
    assert rows[0]["loss"] == pytest.approx(25.0, abs=1e-3)
    assert changed(before, trainer.model)


def test_conversational_prompts(model, tmp_path, tokenizer):
    seen = []

    def reward(prompts, completions, **kwargs):
        seen.append((prompts, completions))
        return toy.sentiment_reward(prompts, completions)

    dataset = toy.prompt_dataset(8, conversational=True)
    trainer = make_trainer(model, tmp_path, reward_funcs=reward, dataset=dataset)
    expected = tokenizer.apply_chat_template(dataset[0]["prompt"], add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert trainer.train_dataset[0]["prompt_ids"] == list(expected)
    text = tokenizer.decode(trainer.train_dataset[0]["prompt_ids"])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")

    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    assert len(train_rows(trainer)) == 2
    prompts, completions = seen[0]
    assert prompts[0][0]["role"] == "user"
    assert completions[0][0]["role"] == "assistant"  # conversational completions


def test_model_as_path(model_path, tmp_path):
    trainer = make_trainer(model_path, tmp_path)
    assert isinstance(trainer.model, torch.nn.Module)
    initial = snapshot(AutoModelForCausalLM.from_pretrained(model_path))
    assert not changed(initial, trainer.model)
    trainer.train()
    assert changed(initial, trainer.model)
    assert not changed(initial, trainer.ref_model)


def test_explicit_ref_model(model, model_path, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(model_path)
    ref_before = snapshot(ref)
    trainer = make_trainer(model, tmp_path, ref_model=ref)
    assert trainer.ref_model is ref
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    assert not changed(ref_before, ref)
    assert all(not p.requires_grad for p in ref.parameters())


def test_ref_model_same_object_raises(model, tmp_path):
    with pytest.raises(ValueError, match="ref_model"):
        make_trainer(model, tmp_path, ref_model=model)


def test_missing_reward_raises(model, tmp_path):
    with pytest.raises(ValueError, match="reward_funcs"):
        make_trainer(model, tmp_path, reward_funcs=None)


# ------------------------------------------------------------------------------------- PEFT
def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _check_only_lora_changed(before, model):
    moved = changed(before, model)
    assert moved, "no parameter changed"
    assert all("lora_" in name for name in moved), sorted(n for n in moved if "lora_" not in n)
    assert any("lora_B" in name for name in moved)
    base = {name for name in before if "lora_" not in name}
    assert base and not (base & moved)


def test_peft_without_ref_model(model, tmp_path):
    trainer = make_trainer(model, tmp_path, peft_config=_lora(), max_steps=3)
    assert trainer.ref_model is None  # the adapter-free base is the reference
    before = snapshot(trainer.model)
    trainer.train()
    _check_only_lora_changed(before, trainer.model)
    rows = train_rows(trainer)
    # lora_B starts at zero, so at step 1 policy == base == reference
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert rows[-1]["objective/kl"] != pytest.approx(0.0, abs=1e-5)


def test_peft_with_ref_model(model, model_path, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(model_path)
    ref_before = snapshot(ref)
    trainer = make_trainer(model, tmp_path, peft_config=_lora(), ref_model=ref)
    before = snapshot(trainer.model)
    trainer.train()
    _check_only_lora_changed(before, trainer.model)
    assert not changed(ref_before, ref)


def test_peft_model_with_a_new_peft_config_trains_only_the_new_adapter(model, tmp_path, probe_ids):
    """A PeftModel with a peft_config: its adapter is merged into the base (which is then also the
    reference) and only the new adapter trains; no adapter is nested inside another."""
    from peft import get_peft_model

    earlier = get_peft_model(model, _lora())
    with torch.no_grad():  # a trained-looking first adapter, so that merging it changes the outputs
        for name, param in earlier.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        ids = torch.tensor([probe_ids])
        logits_with_adapter = earlier(ids).logits
        with earlier.disable_adapter():
            assert not torch.allclose(earlier(ids).logits, logits_with_adapter, atol=1e-4)
    trainer = make_trainer(earlier, tmp_path, peft_config=_lora(), max_steps=3)
    names = [name for name, _ in trainer.model.named_parameters()]
    assert not any("base_model.model.base_model" in name for name in names), names[:3]
    with torch.no_grad():  # the new adapter starts at zero: the policy is the merged model
        assert torch.allclose(trainer.model(ids).logits, logits_with_adapter, atol=1e-4)
    before = snapshot(trainer.model)
    trainer.train()
    _check_only_lora_changed(before, trainer.model)
    rows = train_rows(trainer)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # reference = merged model = start


# ------------------------------------------------------------------------------------- rewards
def test_two_reward_functions_weighted(model, tmp_path):
    trainer = make_trainer(model, tmp_path, reward_funcs=[toy.sentiment_reward, toy.short_reward],
                           reward_weights=[0.7, 0.3], max_steps=3)
    trainer.train()
    rows = train_rows(trainer)
    assert len(rows) == 3
    for row in rows:
        sentiment, short = row["rewards/sentiment_reward"], row["rewards/short_reward"]
        assert short < 0  # -len/64 for every completion
        assert row["objective/scores"] == pytest.approx(0.7 * sentiment + 0.3 * short, abs=1e-5)


def test_reward_weights_with_nonzero_rewards(model, tmp_path):
    def length_reward(prompts, completions, completion_ids=None, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    trainer = make_trainer(model, tmp_path, reward_funcs=[length_reward, toy.short_reward],
                           reward_weights=[2.0, -1.0])
    trainer.train()
    for row in train_rows(trainer):
        length, short = row["rewards/length_reward"], row["rewards/short_reward"]
        assert length > 0
        assert short == pytest.approx(-length / 64, abs=1e-5)
        assert row["objective/scores"] == pytest.approx(2.0 * length - short, abs=1e-4)


def test_reward_weights_length_mismatch_raises(model, tmp_path):
    with pytest.raises(ValueError, match="reward_weights"):
        make_trainer(model, tmp_path, reward_funcs=[toy.sentiment_reward, toy.short_reward], reward_weights=[1.0])


def test_extra_columns_reach_reward_functions(model, tmp_path):
    seen = []

    def reward(prompts, completions, completion_ids, target, **kwargs):
        seen.append((list(prompts), list(target)))
        return [1.0 if t == "a" else 0.0 for t in target]

    rows = [{"prompt": f"Review the {subject}:", "target": "a" if i % 2 else "b"}
            for i, subject in enumerate(["film", "book", "song", "show"])]
    trainer = make_trainer(model, tmp_path, reward_funcs=reward, dataset=Dataset.from_list(rows))
    trainer.train()
    lookup = {row["prompt"]: row["target"] for row in rows}
    for prompts, targets in seen:
        assert len(targets) == 2 * 2  # k * B, block layout
        assert targets == [lookup[p] for p in prompts]


def _rm_score(model, tokenizer, text):
    batch = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**batch).logits[0, 0].item()


def test_reward_model_as_path(model, reward_model_path, tmp_path):
    trainer = make_trainer(model, tmp_path, reward_funcs=reward_model_path)
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    rows = train_rows(trainer)
    assert all("rewards/reward" in row for row in rows)  # named after the model directory
    assert any(row["objective/scores"] != 0.0 for row in rows)
    # the logged scores are the reward model's scores of prompt + completion
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_path, num_labels=1).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(reward_model_path)
    logged = read_completions(trainer)
    assert logged
    for entry in logged[:4]:
        assert entry["chosen_score"] >= entry["rejected_score"]
        assert entry["chosen_score"] == pytest.approx(_rm_score(rm, rm_tokenizer, entry["prompt"] + entry["chosen"]),
                                                      abs=1e-4)
        assert entry["rejected_score"] == pytest.approx(
            _rm_score(rm, rm_tokenizer, entry["prompt"] + entry["rejected"]), abs=1e-4)


def test_reward_model_as_object(model, reward_model_path, tmp_path):
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_path, num_labels=1)
    rm_tokenizer = AutoTokenizer.from_pretrained(reward_model_path)
    rm_before = snapshot(rm)
    trainer = make_trainer(model, tmp_path, reward_funcs=rm, reward_processing_classes=rm_tokenizer,
                           missing_eos_penalty=None)
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    assert not changed(rm_before, rm)
    rows = train_rows(trainer)
    assert any(row["objective/scores_margin"] > 0 for row in rows)
    entry = read_completions(trainer)[0]
    assert entry["chosen_score"] == pytest.approx(
        _rm_score(rm, rm_tokenizer, entry["prompt"] + entry["chosen"]), abs=1e-4)


def test_reward_processing_classes_count_mismatch(model, reward_model_path, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="reward_processing_classes"):
        make_trainer(model, tmp_path, reward_funcs=[reward_model_path, toy.sentiment_reward],
                     reward_processing_classes=[tokenizer])


@pytest.mark.parametrize("winner", [0, 1])
def test_pairwise_judge(model, tmp_path, winner):
    calls = []

    def judge(prompts, pairs):
        calls.append((prompts, pairs))
        return [winner] * len(pairs)

    trainer = make_trainer(model, tmp_path, reward_funcs=PairwiseJudge(judge))
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    rows = train_rows(trainer)
    assert len(rows) == 2
    for row in rows:
        assert row["objective/scores"] == pytest.approx(0.5)  # one of the two samples scores 1
        assert row["objective/scores_margin"] == pytest.approx(1.0)
        assert row["rewards/judge"] == pytest.approx(0.5)
    # every logged pair: chosen is the sample the judge picked
    logged = read_completions(trainer)
    last_step = [e for e in logged if e["step"] == 2]
    prompts, pairs = calls[-1]
    assert len(last_step) == len(pairs) == 2
    for entry, pair, prompt in zip(last_step, pairs, prompts):
        assert entry["prompt"] == prompt
        assert entry["chosen"] == pair[winner]
        assert entry["rejected"] == pair[1 - winner]
        assert (entry["chosen_score"], entry["rejected_score"]) == (1.0, 0.0)


def test_judge_with_other_rewards_raises(model, tmp_path):
    with pytest.raises(ValueError, match="judge"):
        make_trainer(model, tmp_path, reward_funcs=[PairwiseJudge(lambda p, c: [0] * len(c)), toy.short_reward])


# ------------------------------------------------------------------------------------- generation
def test_generation_kwargs_override(model, tmp_path):
    lengths_seen = []

    def reward(prompts, completions, completion_ids, **kwargs):
        lengths_seen.extend(len(ids) for ids in completion_ids)
        return toy.sentiment_reward(prompts, completions)

    trainer = make_trainer(model, tmp_path, reward_funcs=reward, max_new_tokens=8,
                           generation_kwargs={"max_new_tokens": 3})
    prompt_ids = trainer.train_dataset["prompt_ids"][:4]
    rollouts = trainer.generator.generate(prompt_ids, 2, 123)
    lengths = [len(c) for c in rollouts.completion_ids]
    assert len(lengths) == 8
    assert max(lengths) == 3  # the override wins over max_new_tokens=8

    plain = make_trainer(AutoModelForCausalLM.from_pretrained(trainer.model.config._name_or_path),
                         tmp_path / "plain", max_new_tokens=8)
    assert max(len(c) for c in plain.generator.generate(prompt_ids, 2, 123).completion_ids) > 3

    trainer.train()  # completions sampled during training obey the override too
    assert len(lengths_seen) == 2 * 2 * 2 and max(lengths_seen) <= 3


def test_generation_is_seeded_and_block_layout(model, tmp_path):
    trainer = make_trainer(model, tmp_path)
    prompt_ids = trainer.train_dataset["prompt_ids"][:3]
    a = trainer.generator.generate(prompt_ids, 2, 7)
    b = trainer.generator.generate(prompt_ids, 2, 7)
    c = trainer.generator.generate(prompt_ids, 2, 8)
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids
    assert a.num_prompts == 3 and len(a.completion_ids) == 6
    assert a.contains_eos.tolist() == [trainer.processing_class.eos_token_id in ids for ids in a.completion_ids]


@pytest.mark.parametrize("top_k, bound", [(None, None), (0, None), (10, 10)])
def test_top_k_none_samples_from_whole_vocabulary(model, tmp_path, top_k, bound):
    """top_k None (or 0) means no top-k filter: at a very high temperature the tiny random model's
    next-token distribution is close to uniform over ~320 tokens, so 400 draws from one prompt hit
    far more than 50 distinct tokens (transformers' default top_k). An explicit top_k caps them."""
    trainer = make_trainer(model, tmp_path, top_k=top_k, temperature=100.0,
                           generation_kwargs={"max_new_tokens": 1})
    prompt = trainer.train_dataset["prompt_ids"][0]
    rollouts = trainer.generator.generate([prompt] * 200, 2, 0)
    distinct = {ids[0] for ids in rollouts.completion_ids}
    if bound is None:
        assert len(distinct) > 100, f"only {len(distinct)} distinct tokens: a top-k filter is active"
    else:
        assert len(distinct) <= bound


# ------------------------------------------------------------------------------------- evaluation
def test_eval_dataset(model, tmp_path):
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"custom": 1.5}

    trainer = make_trainer(model, tmp_path, eval_dataset=toy.prompt_dataset(4, seed=5),
                           compute_metrics=compute_metrics)
    before = snapshot(trainer.model)
    results = trainer.evaluate()
    assert not changed(before, trainer.model)  # evaluation never updates the weights
    assert results["eval_loss"] == pytest.approx(LN2, abs=1e-5)  # policy == reference before training
    assert results["eval_objective/kl"] == pytest.approx(0.0, abs=1e-5)
    for name in SEED_METRICS:
        if name != "beta":
            assert f"eval_{name}" in results, name
    assert results["eval_custom"] == 1.5 and seen
    assert trainer.state.log_history[-1]["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-6)


def test_eval_dataset_dict(model, tmp_path):
    """Each part of a dict is evaluated on its own: the same numbers as evaluating it alone."""
    parts = {"a": toy.prompt_dataset(2, seed=1), "b": toy.prompt_dataset(3, seed=2)}
    trainer = make_trainer(model, tmp_path, eval_dataset=parts)
    results = trainer.evaluate()
    assert "eval_loss" not in results
    for name, part in parts.items():
        alone = trainer.evaluate(part)
        for key in ("loss", "objective/scores", "objective/kl", "logps/chosen"):
            assert results[f"eval_{name}_{key}"] == pytest.approx(alone[f"eval_{key}"], abs=1e-6), (name, key)


def test_evaluate_without_eval_dataset_raises(model, tmp_path):
    trainer = make_trainer(model, tmp_path)
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.evaluate()


def test_evaluation_runs_during_training(model, tmp_path):
    trainer = make_trainer(model, tmp_path, eval_dataset=toy.prompt_dataset(2, seed=9), eval_strategy="steps",
                           eval_steps=1, max_steps=2)
    trainer.train()
    evals = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert [row["step"] for row in evals] == [1, 2]
    assert all(math.isfinite(row["eval_loss"]) for row in evals)
    # after the first update the policy differs from the reference
    assert evals[0]["eval_objective/kl"] != pytest.approx(0.0, abs=1e-6)


def test_evaluation_with_dict_during_training(model, tmp_path):
    trainer = make_trainer(model, tmp_path, eval_dataset={"x": toy.prompt_dataset(2, seed=1),
                                                           "y": toy.prompt_dataset(2, seed=2)},
                           eval_strategy="steps", eval_steps=2, max_steps=2)
    trainer.train()
    evals = [row for row in trainer.state.log_history if "eval_x_loss" in row or "eval_y_loss" in row]
    assert [row["step"] for row in evals] == [2, 2]  # at eval_steps=2 only, one row per part
    logged = {key: value for row in evals for key, value in row.items() if key.startswith("eval_")}
    # evaluated with the weights of step 2 (the final ones): evaluating again now gives the same
    again = trainer.evaluate()
    for key in ("eval_x_loss", "eval_y_loss", "eval_x_objective/kl", "eval_y_objective/kl"):
        assert logged[key] == pytest.approx(again[key], abs=1e-5), key
    assert logged["eval_x_objective/kl"] != pytest.approx(0.0, abs=1e-6)  # the policy had moved


# ------------------------------------------------------------------------------------- beta, EOS
def test_beta_list_two_steps_per_epoch(model, tmp_path):
    # 4 prompts, 2 per step -> 2 steps per epoch; 2 epochs
    trainer = make_trainer(model, tmp_path, dataset=toy.prompt_dataset(4), beta=[0.1, 0.05],
                           num_train_epochs=2, max_steps=-1)
    trainer.train()
    rows = train_rows(trainer)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["beta"] for row in rows] == [0.1, 0.1, 0.05, 0.05]
    for row in rows:  # the logged epoch progress and beta agree: epoch 0 ends at 1.0
        assert row["beta"] == (0.1 if row["epoch"] <= 1.0 else 0.05)
        assert row["objective/non_score_reward"] == pytest.approx(-row["beta"] * row["objective/kl"], abs=1e-5)


def test_beta_list_one_step_per_epoch(model, tmp_path):
    trainer = make_trainer(model, tmp_path, dataset=toy.prompt_dataset(2), beta=[0.1, 0.05],
                           num_train_epochs=3, max_steps=-1)
    trainer.train()
    assert [row["beta"] for row in train_rows(trainer)] == [0.1, 0.05, 0.05]


def test_missing_eos_penalty_shifts_scores(model_path, tmp_path):
    def first_row(penalty, directory):
        model = AutoModelForCausalLM.from_pretrained(model_path)
        trainer = make_trainer(model, directory, reward_funcs=toy.short_reward, max_steps=1,
                               missing_eos_penalty=penalty)
        trainer.train()
        return train_rows(trainer)[0]

    plain = first_row(None, tmp_path / "plain")
    penalised = first_row(1.0, tmp_path / "penalised")
    eos = plain["val/contain_eos_token"]
    assert penalised["val/contain_eos_token"] == eos  # same seed, same completions
    assert penalised["rewards/short_reward"] == pytest.approx(plain["rewards/short_reward"], abs=1e-6)
    assert penalised["objective/scores"] == pytest.approx(plain["objective/scores"] - 1.0 * (1 - eos), abs=1e-5)
    assert penalised["objective/scores"] < plain["objective/scores"] or eos == 1.0


# ------------------------------------------------------------------------------------- outputs
def test_completions_log_and_plot(model, tmp_path):
    trainer = make_trainer(model, tmp_path, plot_at_end=True, max_steps=2)
    trainer.train()
    out = tmp_path / "out"
    png = out / "training_curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = read_completions(trainer)
    assert [e["step"] for e in logged] == [1, 1, 2, 2]  # 2 pairs per logged step
    for entry in logged:
        assert set(entry) >= {"step", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert entry["prompt"] in set(toy.prompt_dataset(8)["prompt"])
        # the logged texts are the ones scored: the reward of each gives its logged score
        scores = toy.sentiment_reward([entry["prompt"]] * 2, [entry["chosen"], entry["rejected"]])
        assert scores == pytest.approx([entry["chosen_score"], entry["rejected_score"]], abs=1e-6)


def test_no_completions_log_when_disabled(model, tmp_path):
    trainer = make_trainer(model, tmp_path, log_completions=False)
    trainer.train()
    assert not (tmp_path / "out" / "completions.jsonl").exists()
    assert not (tmp_path / "out" / "training_curves.png").exists()  # plot_at_end=False in make_args


def test_save_model_roundtrip(model, tmp_path):
    trainer = make_trainer(model, tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not changed(snapshot(trainer.model), reloaded)
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == toy.CHAT_TEMPLATE


def test_custom_callback(model, tmp_path):
    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs, self.steps, self.began, self.ended = [], [], 0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.began += 1

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

        def on_train_end(self, args, state, control, **kwargs):
            self.ended += 1

    recorder = Recorder()
    trainer = make_trainer(model, tmp_path, max_steps=3)
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.steps == [1, 2, 3]
    assert recorder.began == 1 and recorder.ended == 1
    step_logs = [log for log in recorder.logs if "loss" in log]
    assert len(step_logs) == 3
    assert "objective/scores" in step_logs[0]
    assert "train_loss" in recorder.logs[-1]


def test_callback_can_stop_training(model, tmp_path):
    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    trainer = make_trainer(model, tmp_path, max_steps=4, callbacks=[Stop()])
    trainer.train()
    assert trainer.state.global_step == 2


def test_epoch_callbacks_once_per_epoch(model, tmp_path):
    class Epochs(TrainerCallback):
        def __init__(self):
            self.events = []

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.events.append("begin")

        def on_epoch_end(self, args, state, control, **kwargs):
            self.events.append("end")

    recorder = Epochs()
    trainer = make_trainer(model, tmp_path, dataset=toy.prompt_dataset(4), num_train_epochs=2, max_steps=-1,
                           callbacks=[recorder])
    trainer.train()
    assert trainer.state.global_step == 4
    assert recorder.events == ["begin", "end", "begin", "end"]


def test_logging_strategy_epoch(model, tmp_path):
    trainer = make_trainer(model, tmp_path, dataset=toy.prompt_dataset(4), num_train_epochs=2, max_steps=-1,
                           logging_strategy="epoch")
    trainer.train()
    rows = train_rows(trainer)
    assert [row["step"] for row in rows] == [2, 4]  # one row per epoch, averaging its 2 steps
    assert rows[0]["loss"] != pytest.approx(LN2, abs=1e-6)  # mean of step 1 (log 2) and step 2


def test_explicit_bf16_on_cpu_trains(model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    trainer = make_trainer(model, tmp_path, bf16=True, max_steps=1)
    assert trainer.args.use_cpu and trainer.learner.autocast_dtype == torch.bfloat16
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    assert math.isfinite(train_rows(trainer)[0]["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, fp32 master weights


def test_more_than_two_samples(model, tmp_path):
    """With 4 samples per prompt the pair is the best and the worst of the prompt's 4."""
    scored = []

    def reward(prompts, completions, completion_ids, **kwargs):
        scores = toy.short_reward(prompts, completions, completion_ids)
        scored.append(scores)
        return scores

    trainer = make_trainer(model, tmp_path, reward_funcs=reward, num_samples=4, max_steps=2)
    before = snapshot(trainer.model)
    trainer.train()
    assert changed(before, trainer.model)
    rows, logged = train_rows(trainer), read_completions(trainer)
    assert len(rows) == len(scored) == 2
    for row, scores in zip(rows, scored):
        assert len(scores) == 8  # 2 prompts x 4 samples, block layout: sample j of prompt i at j * 2 + i
        per_prompt = [scores[i::2] for i in range(2)]
        pairs = [e for e in logged if e["step"] == row["step"]]
        assert [(e["chosen_score"], e["rejected_score"]) for e in pairs] == [(max(s), min(s)) for s in per_prompt]
        assert row["objective/scores_margin"] == pytest.approx(sum(max(s) - min(s) for s in per_prompt) / 2,
                                                               abs=1e-5)
        assert row["objective/scores"] == pytest.approx(sum(scores) / 8, abs=1e-5)  # over all 8 samples


def test_iterable_dataset(model, tmp_path):
    rows = toy.prompts(6)
    dataset = IterableDataset.from_generator(lambda: iter(rows))
    trainer = make_trainer(model, tmp_path, dataset=dataset, max_steps=2)
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2
    assert changed(before, trainer.model)


# ------------------------------------------------------------------------------------- Rewards unit
def test_rewards_combination_by_hand():
    from odpo_vllm.rewards.scorer import Rewards

    def f1(prompts, completions, completion_ids, **kwargs):
        return [1.0, None, 3.0, None]

    def f2(prompts, completions, completion_ids, **kwargs):
        return [10.0, 20.0, None, None]

    rewards = Rewards([f1, f2], reward_weights=[0.5, 2.0], missing_eos_penalty=1.0)
    scores, per_function = rewards.score(["p"] * 4, ["a", "b", "c", "d"], [[1], [2], [3], [4]], {},
                                         torch.tensor([True, False, True, False]))
    # weighted sums skipping None: 0.5+20, 40, 1.5, 0 (no opinion at all); minus 1 where no EOS
    torch.testing.assert_close(scores, torch.tensor([20.5, 39.0, 1.5, -1.0]))
    assert per_function == {"rewards/f1": pytest.approx(2.0), "rewards/f2": pytest.approx(15.0)}


def test_rewards_wrong_number_of_values_raises():
    from odpo_vllm.rewards.scorer import Rewards

    rewards = Rewards(lambda prompts, completions, completion_ids, **kw: [0.0])
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        rewards.score(["p", "p"], ["a", "b"], [[1], [2]], {}, torch.tensor([False, False]))


def test_judge_invalid_answer_raises():
    from odpo_vllm.rewards.scorer import Rewards

    rewards = Rewards(PairwiseJudge(lambda prompts, pairs: [2] * len(pairs)))
    with pytest.raises(ValueError, match="judge returned 2"):
        rewards.score(["p", "p"], ["a", "b"], [[1], [2]], {}, torch.tensor([False, False]))


@pytest.mark.parametrize("use_vllm", [False, pytest.param(True, marks=pytest.mark.vllm)])
def test_reference_attributes(model, tmp_path, use_vllm):
    """The attributes the reference trainer exposes, with the config's values; `eval_dataset`
    is the object passed (as in transformers.Trainer), and evaluate() still reads it."""
    eval_dataset = toy.prompt_dataset(4, seed=3)
    args = make_args(tmp_path, use_vllm=use_vllm, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1,
                     reward_weights=[2.0, 0.5], max_new_tokens=6, per_device_eval_batch_size=2)
    with OnlineDPOTrainer(model, reward_funcs=[toy.sentiment_reward, toy.short_reward], args=args,
                          train_dataset=toy.prompt_dataset(4), eval_dataset=eval_dataset) as trainer:
        assert trainer.use_vllm is use_vllm and trainer.vllm_mode == ("colocate" if use_vllm else None)
        assert (trainer.llm is not None) is use_vllm and trainer.vllm_client is None
        assert (trainer.temperature, trainer.top_p, trainer.top_k, trainer.repetition_penalty) == (0.7, 0.9, 20, 1.1)
        assert trainer.reward_funcs == [toy.sentiment_reward, toy.short_reward]
        assert torch.equal(trainer.reward_weights, torch.tensor([2.0, 0.5]))
        assert trainer.eval_dataset is eval_dataset and "prompt_ids" not in eval_dataset.column_names
        config = trainer.generation_config
        if use_vllm:
            from vllm import SamplingParams

            assert isinstance(config, SamplingParams) and config.n == 2 and config.max_tokens == 6
            assert (config.temperature, config.top_p, config.top_k) == (0.7, 0.9, 20)
        else:
            from transformers import GenerationConfig

            assert isinstance(config, GenerationConfig) and config.do_sample and config.max_new_tokens == 6
            assert (config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (0.7, 0.9, 20, 1.1)
        metrics = trainer.evaluate()
        assert metrics["eval_samples_per_second"] > 0 and "eval_objective/scores" in metrics
        assert trainer.optimizer is not None and trainer.lr_scheduler is not None
