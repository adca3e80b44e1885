"""Bad input fails before any training step, with an error that names the field, row, file or
function and says what to do (issue 11). Real components only: tiny models, real datasets files."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from conftest import changed, make_args, snapshot
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from odpo_vllm import OnlineDPOTrainer, toy
from odpo_vllm.run.checkpoint import CheckpointError
from odpo_vllm.data import load_prompt_dataset
from odpo_vllm.rewards.scorer import Rewards


def trainer_for(model, tmp_path, reward_funcs=toy.sentiment_reward, dataset=None, **kwargs):
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in ("ref_model", "processing_class",
                                                              "reward_processing_classes")}
    return OnlineDPOTrainer(model, reward_funcs=reward_funcs, args=make_args(tmp_path, **kwargs),
                            train_dataset=dataset if dataset is not None else toy.prompt_dataset(4), **extra)


# ------------------------------------------------------------------------------------- reward values
def _constant(values):
    def bad_reward(prompts, completions, completion_ids, **kwargs):
        return list(values) + [0.0] * (len(completions) - len(values))

    return bad_reward


@pytest.mark.parametrize("value, error, shown", [
    (math.nan, ValueError, "nan"),
    (math.inf, ValueError, "inf"),
    (-math.inf, ValueError, "-inf"),
    ("0.5", TypeError, "'0.5'"),
    ([1.0], TypeError, "[1.0]"),
])
def test_bad_reward_value_names_function_value_and_completion(value, error, shown):
    rewards = Rewards(_constant([1.0, value]))
    with pytest.raises(error) as info:
        rewards.score(["p"] * 4, ["a", "b", "c", "d"], [[1], [2], [3], [4]], {}, torch.ones(4, dtype=torch.bool))
    message = str(info.value)
    assert "'bad_reward'" in message and shown in message and "completion 1" in message


def test_bad_reward_value_stops_before_the_first_optimizer_step(model, tmp_path):
    trainer = trainer_for(model, tmp_path, reward_funcs=_constant([math.nan]))
    before = snapshot(trainer.model)
    with pytest.raises(ValueError, match="'bad_reward' returned nan for completion 0"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, dict(trainer.model.named_parameters())[k]) for k, v in before.items())


def test_step_without_any_score_stops_naming_the_functions():
    def never(prompts, completions, completion_ids, **kwargs):
        return [None] * len(completions)

    with pytest.raises(ValueError, match=r"no completion of this step got a score: 'never'"):
        Rewards(never).score(["p"] * 2, ["a", "b"], [[1], [2]], {}, torch.ones(2, dtype=torch.bool))


def test_partly_unscored_step_warns_and_scores(caplog):
    def some(prompts, completions, completion_ids, **kwargs):
        return [1.0, None, None, None]

    with caplog.at_level(logging.WARNING, logger="odpo_vllm"):
        scores, _ = Rewards(some).score(["p"] * 4, list("abcd"), [[1]] * 4, {}, torch.ones(4, dtype=torch.bool))
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert "3 of 4 completions got None from every reward function" in caplog.text


def test_reward_model_with_broken_weights_names_the_model(reward_model_path, tokenizer):
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_path)
    with torch.no_grad():
        reward_model.score.weight.fill_(math.nan)
    rewards = Rewards(reward_model, reward_processing_classes=tokenizer)
    with pytest.raises(ValueError, match=r"reward model '.*reward' scored completion 0 nan"):
        rewards.score(["p"] * 2, ["a", "b"], [[1], [2]], {}, torch.ones(2, dtype=torch.bool))


# ------------------------------------------------------------------------------------- models and tokenizers
def test_tokenizer_without_pad_or_eos_fails_at_construction(model, fresh_tokenizer, tmp_path):
    fresh_tokenizer.pad_token = None
    fresh_tokenizer.eos_token = None
    with pytest.raises(ValueError, match="processing_class: the tokenizer has neither a pad token nor an EOS"):
        trainer_for(model, tmp_path, processing_class=fresh_tokenizer)


def test_tokenizer_without_pad_uses_eos(model, fresh_tokenizer, tmp_path):
    fresh_tokenizer.pad_token = None
    trainer = trainer_for(model, tmp_path, processing_class=fresh_tokenizer)
    assert trainer.processing_class.pad_token == fresh_tokenizer.eos_token


@pytest.mark.parametrize("use_vllm", [False, pytest.param(True, marks=pytest.mark.vllm)])
def test_tokenizer_larger_than_the_policy_vocabulary_trains(model, fresh_tokenizer, tmp_path, use_vllm):
    """As in the reference: ids past the embedding that never occur do no harm (e.g. a Qwen2
    tokenizer class that adds `<|endoftext|>` on load to a small BPE), with either sampler."""
    fresh_tokenizer.add_special_tokens({"additional_special_tokens": ["<|added_on_load|>"]})
    assert len(fresh_tokenizer) == 321
    before = snapshot(model)
    trainer = trainer_for(model, tmp_path, processing_class=fresh_tokenizer, max_steps=2, use_vllm=use_vllm)
    with trainer:
        trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 2 and changed(before, model)


def test_prompt_with_an_id_outside_the_vocabulary_names_row_and_token(model, fresh_tokenizer, tmp_path):
    fresh_tokenizer.add_tokens(["<extra_a>", "<extra_b>"])  # ids 320, 321: the embedding has 320 rows
    rows = toy.prompts(4)
    rows[2]["prompt"] = "Review the <extra_b> film:"
    with pytest.raises(ValueError, match=r"train_dataset row 2: the prompt holds token '<extra_b>' \(id 321\), which "
                                         r"is outside the policy's vocabulary of 320"):
        trainer_for(model, tmp_path, processing_class=fresh_tokenizer, dataset=Dataset.from_list(rows))


def test_pad_token_outside_the_vocabulary_is_refused(model, fresh_tokenizer, tmp_path):
    fresh_tokenizer.add_special_tokens({"pad_token": "<new_pad>"})
    with pytest.raises(ValueError, match=r"processing_class: its pad_token '<new_pad>' has id 320, outside the "
                                         r"policy's vocabulary of 320"):
        trainer_for(model, tmp_path, processing_class=fresh_tokenizer)


def test_reference_with_another_vocabulary_fails_at_construction(model, tokenizer, tmp_path):
    reference = AutoModelForCausalLM.from_config(toy.model_config(tokenizer, vocab_size=400))
    with pytest.raises(ValueError, match=r"ref_model: its vocabulary has 400 tokens but the policy's has 320"):
        trainer_for(model, tmp_path, ref_model=reference)


def test_reward_model_with_several_labels_object(model, tokenizer, tmp_path):
    config = toy.model_config(tokenizer)
    config.num_labels = 3
    three = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(ValueError, match=r"reward_funcs\[0\] .*num_labels=3"):
        trainer_for(model, tmp_path, reward_funcs=[three], reward_processing_classes=[tokenizer])


def test_reward_model_with_several_labels_path(model, tokenizer, tmp_path):
    config = toy.model_config(tokenizer)
    config.num_labels = 3
    path = tmp_path / "three_labels"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    with pytest.raises(ValueError, match=r"reward_funcs \(.*three_labels\): its score head does not have one label"):
        trainer_for(model, tmp_path, reward_funcs=str(path))


def test_reward_tokenizer_larger_than_reward_model(model, reward_model_path, fresh_tokenizer, tmp_path):
    fresh_tokenizer.add_tokens(["<extra_a>"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_path)
    with pytest.raises(ValueError, match=r"reward_processing_classes\[0\] .*321 tokens but reward model"):
        trainer_for(model, tmp_path, reward_funcs=reward_model, reward_processing_classes=fresh_tokenizer)


# ------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize("field", ["model", "ref_model", "reward_funcs", "reward_model_path"])
def test_missing_local_path_says_no_such_file(model, model_path, tmp_path, field):
    missing = str(tmp_path / "no" / "such_model")
    kwargs = {"model": model, "reward_funcs": toy.sentiment_reward}
    if field == "reward_model_path":
        kwargs["args"] = make_args(tmp_path, reward_model_path=missing)
        kwargs["reward_funcs"] = None
    else:
        kwargs[field] = missing
    kwargs.setdefault("args", make_args(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{field}: no such file or folder: '{missing}'"):
        OnlineDPOTrainer(train_dataset=toy.prompt_dataset(4), **kwargs)


@pytest.mark.parametrize("name", ["runs/none/prompts.jsonl", "./prompts", "data/x/y"])
def test_missing_local_dataset_says_no_such_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"dataset_name: no such file or folder: '{name}'"):
        load_prompt_dataset(name)


# ------------------------------------------------------------------------------------- data
def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "three",,}\n{"prompt": "four"}\n')
    with pytest.raises(ValueError) as info:
        load_prompt_dataset(str(path))
    assert f"{path} line 3 is not valid JSON" in str(info.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n["a list"]\n')
    with pytest.raises(ValueError, match=r"line 2 is a JSON list, not an object"):
        load_prompt_dataset(str(path))


@pytest.mark.parametrize("messages, missing", [
    ([{"role": "user", "content": "hi"}, {"content": "no role here"}], "'role'"),
    ([{"role": "system", "content": "be nice"}, {"role": "user"}], "'content'"),
    ([{"content": "first lacks a role"}], "'role'"),
])
def test_conversation_message_without_role_or_content_names_row_and_message(model, tmp_path, messages, missing):
    from datasets import Dataset

    good = [{"role": "user", "content": "Review the film:"}]
    rows = [{"prompt": good}, {"prompt": good}, {"prompt": messages}, {"prompt": good}]
    with pytest.raises(ValueError) as info:
        trainer_for(model, tmp_path, dataset=Dataset.from_list(rows))
    message = str(info.value)
    assert "train_dataset row 2" in message and f"message {len(messages) - 1}" in message and missing in message


# ------------------------------------------------------------------------------------- generation settings
@pytest.mark.parametrize("use_vllm", [False, True])
def test_unknown_generation_kwargs_fail_at_construction(model, tmp_path, use_vllm):
    with pytest.raises(ValueError) as info:
        trainer_for(model, tmp_path, use_vllm=use_vllm, generation_kwargs={"temprature": 0.5})
    message = str(info.value)
    assert "OnlineDPOConfig.generation_kwargs: 'temprature' (did you mean 'temperature'?)" in message
    assert ("SamplingParams" if use_vllm else "GenerationConfig") in message


@pytest.mark.parametrize("use_vllm, key", [(False, "no_repeat_ngram_size"), (True, "presence_penalty"),
                                           (True, "max_new_tokens"), (False, "max_new_tokens")])
def test_backend_generation_kwargs_are_accepted(use_vllm, key):
    from odpo_vllm.validation import check_generation_kwargs

    check_generation_kwargs({key: 2}, use_vllm)  # no error
    with pytest.raises(ValueError, match="not known to"):  # each backend's own keys only
        check_generation_kwargs({"presence_penalty" if not use_vllm else "no_repeat_ngram_size": 1}, use_vllm)


def test_generation_kwargs_set_by_the_trainer_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match="'n' is set by the trainer .*OnlineDPOConfig.num_samples"):
        trainer_for(model, tmp_path, generation_kwargs={"n": 4})


# ------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, model_path):
    """Two steps with a checkpoint after each: checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("ckpt_run")
    trainer = trainer_for(AutoModelForCausalLM.from_pretrained(model_path), out, save_strategy="steps",
                          save_steps=1, output_dir=out / "run")
    trainer.train()
    return out / "run"


def _damage(path, how):
    if how == "truncate":
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    else:
        with open(path, "wb") as f:
            f.write(b"\x00garbage" * 10)


def _fresh_trainer(model_path, out):
    return trainer_for(AutoModelForCausalLM.from_pretrained(model_path), out.parent, output_dir=out, max_steps=3)


@pytest.mark.parametrize("name, how", [("model.safetensors", "truncate"), ("optimizer.pt", "truncate"),
                                       ("rng_state.pth", "garbage"), ("trainer_state.json", "truncate"),
                                       ("odpo_state.json", "garbage"), ("scheduler.pt", "garbage")])
def test_damaged_checkpoint_file_is_named_and_nothing_is_loaded(saved_run, model_path, tmp_path, name, how):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    _damage(out / "checkpoint-2" / name, how)
    trainer = _fresh_trainer(model_path, out)
    before = snapshot(trainer.model)
    with pytest.raises(CheckpointError) as info:
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    message = str(info.value)
    assert os.path.join("checkpoint-2", name) in message and "is damaged" in message
    # nothing was loaded: weights and step are those of the fresh trainer
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, dict(trainer.model.named_parameters())[k]) for k, v in before.items())


def test_resume_true_falls_back_to_the_newest_complete_checkpoint(saved_run, model_path, tmp_path, caplog):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    _damage(out / "checkpoint-2" / "model.safetensors", "truncate")
    trainer = _fresh_trainer(model_path, out)
    with caplog.at_level(logging.WARNING, logger="odpo_vllm"):
        trainer.train(resume_from_checkpoint=True)
    assert "checkpoint-2" in caplog.text and "falling back to an earlier checkpoint" in caplog.text
    steps = [row["step"] for row in trainer.state.log_history if "loss" in row]
    assert steps == [1, 2, 3]  # step 1 from checkpoint-1's history, then 2 and 3 trained again


def test_checkpoint_of_another_model_is_refused_before_loading(saved_run, tokenizer, tmp_path):
    wider = AutoModelForCausalLM.from_config(toy.model_config(tokenizer, hidden_size=96, heads=3))
    trainer = trainer_for(wider, tmp_path, processing_class=tokenizer)
    with pytest.raises(CheckpointError, match=r"model.safetensors is damaged .*the model expects"):
        trainer.train(resume_from_checkpoint=str(saved_run / "checkpoint-1"))


def test_missing_checkpoint_folder_says_no_such_folder(model, tmp_path):
    trainer = trainer_for(model, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"resume_from_checkpoint: no such folder: '.*nowhere'"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------- config
def test_negative_learning_rate_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match=r"OnlineDPOConfig.learning_rate: must be a finite number >= 0, got -0.001"):
        make_args(tmp_path, learning_rate=-1e-3)



@pytest.mark.parametrize("value", [0, 1.5])
def test_weight_sync_steps_below_one_or_fractional_is_a_config_error(tmp_path, value):
    with pytest.raises(ValueError, match=r"OnlineDPOConfig.weight_sync_steps: must be an integer >= 1 \(1: push "
                                         rf"after every step\), got {value}"):
        make_args(tmp_path, weight_sync_steps=value)
