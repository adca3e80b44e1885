"""TRL's own callbacks on our trainer, as the reference's documentation tells users to write them
(`LogCompletionsCallback(trainer, num_prompts=8)` + `add_callback`), and what TRL's trainer takes
as a dataset (a list of dicts). In process here; the dedicated placement's version is in
tests/test_placement.py."""

from __future__ import annotations

import os

import pytest
from conftest import make_args
from trl.trainer.callbacks import LogCompletionsCallback, SyncRefModelCallback

from odpo_vllm import OnlineDPOTrainer, toy


def trainer_for(model_path, tmp_path, **overrides):
    settings = dict(use_vllm=False, max_steps=2, per_device_train_batch_size=2, max_new_tokens=8,
                    save_strategy="no", output_dir=tmp_path / "out")
    settings.update(overrides)
    return OnlineDPOTrainer(model=model_path, reward_funcs=toy.short_reward, args=make_args(tmp_path, **settings),
                            train_dataset=toy.prompts(8), eval_dataset=toy.prompt_dataset(4, seed=1))


def test_the_seeds_log_completions_lines_train_and_fill_the_table(model_path, tmp_path):
    trainer = trainer_for(model_path, tmp_path)
    completions_callback = LogCompletionsCallback(trainer, num_prompts=3, freq=1)  # the seed's lines, freq=1
    trainer.add_callback(completions_callback)
    trainer.train()
    table = completions_callback.table  # (step, prompt, completion) rows, what TRL logs to its trackers
    assert [row[0] for row in table] == ["1"] * 3 + ["2"] * 3
    eval_prompts = [row["prompt"] for row in toy.prompts(4, seed=1)][:3]
    assert [row[1] for row in table[:3]] == eval_prompts
    assert all(isinstance(row[2], str) for row in table) and any(row[2].strip() for row in table)
    # the default frequency is eval_steps (500 here): the constructor's form logs nothing in 2 steps
    quiet = trainer_for(model_path, tmp_path / "quiet")
    default = LogCompletionsCallback(quiet, num_prompts=2)
    quiet.add_callback(default)
    quiet.train()
    assert default.table == []


def test_a_list_of_dicts_is_a_dataset_as_in_trl(model_path, tmp_path):
    trainer = OnlineDPOTrainer(model=model_path, reward_funcs=toy.short_reward,
                               args=make_args(tmp_path, use_vllm=False, max_steps=2, per_device_train_batch_size=2,
                                              max_new_tokens=8, save_strategy="no"),
                               train_dataset=toy.prompts(6), eval_dataset={"plain": toy.prompts(2, seed=1),
                                                                           "chat": toy.prompts(2, True, seed=2)})
    trainer.train()
    results = trainer.evaluate()
    assert "eval_plain_loss" in results and "eval_chat_loss" in results
    with pytest.raises(ValueError, match=r"train_dataset: row 1 is a str, not a dict"):
        OnlineDPOTrainer(model=model_path, reward_funcs=toy.short_reward, args=make_args(tmp_path, use_vllm=False),
                         train_dataset=[{"prompt": "a"}, "b"])


def test_sync_ref_model_callback_is_refused_naming_the_config_fields(model_path, tmp_path):
    trainer = trainer_for(model_path, tmp_path)
    with pytest.raises(ValueError, match=r"SyncRefModelCallback .*OnlineDPOConfig\(sync_ref_model=True"):
        trainer.add_callback(SyncRefModelCallback(ref_model=None, accelerator=None))
    with pytest.raises(ValueError, match=r"SyncRefModelCallback"):
        trainer_for(model_path, tmp_path / "again").add_callback(SyncRefModelCallback)


def test_trackers_get_the_scalars_and_the_completions_tables(model_path, tmp_path, monkeypatch):
    """report_to wandb (offline), trackio (local) and tensorboard, the real packages: the training
    scalars reach all three; TRL's completions table reaches wandb (TRL logs it to wandb and comet
    only), and with log_completions our table of each logged step's pairs reaches all three."""
    import glob
    import json
    import sqlite3
    import time

    import trackio
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    project = f"odpo_vllm_test_{tmp_path.name}_{os.getpid()}"  # trackio's folder is fixed at import: a project
    trainer = trainer_for(model_path, tmp_path, report_to=["wandb", "trackio", "tensorboard"], logging_steps=1,
                          log_completions=True, project=project)
    trainer.add_callback(LogCompletionsCallback(trainer, num_prompts=2, freq=1))
    trainer.train()
    wandb.finish()  # what the end of a user's script does: the run's records are written out
    run_dir = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))[0]
    tables = sorted(glob.glob(f"{run_dir}/files/media/table/completions_*.json"))
    assert len(tables) == 2  # TRL's: one per logging step, each the whole table so far
    with open(tables[-1]) as f:
        table = json.load(f)
    assert table["columns"] == ["step", "prompt", "completion"] and len(table["data"]) == 4
    pairs = sorted(glob.glob(f"{run_dir}/files/media/table/completion_pairs_*.json"))
    assert len(pairs) == 2  # ours: each logged step's pairs
    with open(pairs[0]) as f:
        assert json.load(f)["columns"][:4] == ["step", "prompt", "chosen", "rejected"]
    (run_file,) = glob.glob(f"{run_dir}/*.wandb")
    deadline = time.monotonic() + 60  # wandb's service writes the file shortly after finish() returns
    while True:
        with open(run_file, "rb") as f:
            records = f.read()  # protobuf records: the history keys are stored as plain strings
        if b"train/loss" in records or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert b"train/loss" in records and b"train/objective/scores" in records
    (events,) = glob.glob(str(tmp_path / "out" / "runs" / "*" / "events.out.tfevents.*"))
    tags = EventAccumulator(events).Reload().Tags()
    assert "train/loss" in tags["scalars"] and "train/objective/scores" in tags["scalars"]
    assert "completion_pairs/text_summary" in tags["tensors"]
    database = trackio.utils.TRACKIO_DIR / f"{project}.db"
    try:
        with sqlite3.connect(database) as db:
            logged = [json.loads(row[0]) for row in db.execute("select metrics from metrics")]
    finally:
        for leftover in trackio.utils.TRACKIO_DIR.glob(f"{project}.*"):
            leftover.unlink()
    assert any("train/loss" in row for row in logged) and sum("completion_pairs" in row for row in logged) == 2
