"""Checkpoints that continue the same run: weights, optimizer, scheduler, RNG, data position,
trainer state, policy version and the batches already sampled for later steps (async_steps > 0),
under `<output_dir>/checkpoint-<step>`."""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from transformers.trainer_callback import TrainerState

STATE_FILE = "trainer_state.json"
RUN_FILE = "odpo_state.json"
RNG_FILE = "rng_state.pth"
ROLLOUTS_FILE = "rollouts.pt"


def save(trainer) -> str:
    directory = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    os.makedirs(directory, exist_ok=True)
    # first: it waits for the batches being sampled for later steps (their pairs are saved)
    torch.save(trainer.pipeline.state_dict(), os.path.join(directory, ROLLOUTS_FILE))
    trainer.save_model(directory)
    trainer.learner.save(directory)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, os.path.join(directory, RNG_FILE))
    trainer.state.save_to_json(os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, RUN_FILE), "w") as f:
        json.dump({"data": trainer.batches.state_dict(), "policy_version": trainer.publisher.version}, f)
    _rotate(trainer.args.output_dir, trainer.args.save_total_limit)
    return directory


def load(trainer, directory: str) -> None:
    learner_files = ("optimizer.pt", "scheduler.pt") if trainer.model is not None else ()  # Ray: DeepSpeed's own
    for name in (STATE_FILE, RUN_FILE, ROLLOUTS_FILE) + learner_files:
        if not os.path.exists(os.path.join(directory, name)):
            raise FileNotFoundError(
                f"resume_from_checkpoint: {directory} has no {name}; point it at a checkpoint-<step> folder "
                "written by odpo_vllm"
            )
    # the rollouts first: a checkpoint of another async_steps is refused before any weight is loaded
    trainer.pipeline.load_state_dict(torch.load(os.path.join(directory, ROLLOUTS_FILE), weights_only=False))
    trainer.learner.load(directory)
    loaded = TrainerState.load_from_json(os.path.join(directory, STATE_FILE))
    state = trainer.state
    state.global_step, state.epoch, state.log_history = loaded.global_step, loaded.epoch, loaded.log_history
    with open(os.path.join(directory, RUN_FILE)) as f:
        run = json.load(f)
    trainer.batches.load_state_dict(run["data"])
    rng = torch.load(os.path.join(directory, RNG_FILE), weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    # The engines must serve the resumed weights before they sample again.
    trainer.publisher.publish(run["policy_version"])


def _rotate(output_dir: str, limit: int | None) -> None:
    if not limit or limit <= 0:
        return
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match:
            found.append((int(match.group(1)), name))
    for _, name in sorted(found)[:-limit]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
