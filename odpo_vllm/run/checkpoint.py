"""Checkpoints that continue the same run: weights, optimizer, scheduler, RNG, data position,
trainer state, policy version and the batches already sampled for later steps (async_steps > 0),
under `<output_dir>/checkpoint-<step>`."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from typing import NamedTuple

import numpy as np
import torch
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from odpo_vllm.learning.deepspeed_rank import checkpoint_files
from odpo_vllm.learning.learner import REFERENCE_FILE
from odpo_vllm.primitives import shared_storage

STATE_FILE = "trainer_state.json"
RUN_FILE = "odpo_state.json"
RNG_FILE = "rng_state.pth"
ROLLOUTS_FILE = "rollouts.pt"

logger = logging.getLogger(__name__)

# `checkpoint-<step>`, or what a killed save (`.incomplete`) or deletion (`.deleting[.<ns>]`) left.
# (transformers' own listing, `sort_checkpoints`, takes those leftovers for checkpoints.)
FOLDER_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)(\.incomplete|\.deleting(?:\.\d+)?)?")


class CheckpointFolder(NamedTuple):
    path: str
    step: int
    complete: bool  # False: a leftover, never resumed from and removed by the next save


def checkpoint_folders(output_dir: str) -> list[CheckpointFolder]:
    """The checkpoint folders of `output_dir`, leftovers included, oldest step first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = FOLDER_NAME.fullmatch(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append(CheckpointFolder(path, int(match.group(1)), complete=match.group(2) is None))
    return sorted(found, key=lambda folder: (folder.step, folder.path))


def complete_folder(output_dir: str, step: int) -> str | None:
    """`checkpoint-<step>` in `output_dir` if a complete one is there (renamed at the end of its save)."""
    path = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
    return path if os.path.isdir(path) else None


def save(trainer, deadline: float | None = None) -> str:
    """Write `checkpoint-<step>` atomically: everything goes to a temporary folder beside it, which
    is renamed once complete, so a save killed halfway never leaves a `checkpoint-<step>` folder
    that looks complete (resume and `save_total_limit` only see renamed ones). `deadline`: a
    preemption's, for the batches in flight (`RolloutPipeline.state_dict`). The checkpoint's policy
    version is the learners' (the steps taken): the engines may serve an older one between two
    pushes of `weight_sync_steps`, or when a stop cut the push short.
    Under Ray, a save whose learner-rank files the driver cannot see (`output_dir` not shared with
    a rank's node) raises `SharedStorageError` and is not renamed."""
    policy_version = trainer.state.global_step
    output_dir = trainer.args.output_dir
    final = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
    directory = f"{final}.incomplete"
    shutil.rmtree(directory, ignore_errors=True)  # left by a save that was killed
    os.makedirs(directory)
    # first: it waits for the batches being sampled for later steps (their pairs are saved)
    rollouts = trainer.pipeline.state_dict(deadline, policy_version)
    data = rollouts.pop("data")  # the prompt order's position, before any batch dropped at the deadline
    torch.save(rollouts, os.path.join(directory, ROLLOUTS_FILE))
    trainer.save_model(directory)
    trainer.learner.save(directory)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, os.path.join(directory, RNG_FILE))
    trainer.state.save_to_json(os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, RUN_FILE), "w") as f:
        json.dump({"data": data, "policy_version": policy_version}, f)
    written_by = rank_files(trainer)
    missing = wait_for_files(directory, tuple(written_by))
    if missing:
        raise shared_storage.missing_rank_files(output_dir, directory, {name: written_by[name] for name in missing},
                                                getattr(trainer.learner, "nodes", {}))
    old = _set_aside(final) if os.path.exists(final) else None  # the same step saved again (a resumed run)
    os.replace(directory, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _rotate(output_dir, trainer.args.save_total_limit)  # only after the new checkpoint is complete
    for folder in checkpoint_folders(output_dir):  # what killed saves and deletions left
        if not folder.complete:
            shutil.rmtree(folder.path, ignore_errors=True)
    return final


def _set_aside(directory: str) -> str:
    """Rename a checkpoint folder out of the `checkpoint-<step>` pattern (one atomic step), so
    that a kill while it is deleted never leaves a partly deleted checkpoint; the new name."""
    doomed = f"{directory}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    if os.path.exists(doomed):  # could not be emptied (e.g. files held open on NFS): another name
        doomed = f"{doomed}.{time.time_ns()}"
    os.replace(directory, doomed)
    return doomed


def rank_files(trainer) -> dict[str, str]:
    """Under a Ray placement, the files the learner ranks write into a checkpoint, each with the
    name of the rank that writes it; in process, none (this process writes every file)."""
    if trainer.model is not None:
        return {}
    args = trainer.args
    files = checkpoint_files(args.ray_learner_ranks, args.ray_zero_stage, args.bf16, reference=args.sync_ref_model)
    return {name: trainer.learner.names[rank] for name, rank in files.items()}


def required_files(trainer) -> tuple[str, ...]:
    """What a checkpoint of this trainer must hold: what `save` writes here, and every rank's files."""
    learner_files = (("optimizer.pt", "scheduler.pt") + ((REFERENCE_FILE,) if trainer.args.sync_ref_model else ())
                     if trainer.model is not None else tuple(rank_files(trainer)))
    return (STATE_FILE, RUN_FILE, RNG_FILE, ROLLOUTS_FILE) + learner_files


def missing_files(directory: str, required: tuple[str, ...]) -> list[str]:
    """The `required` files (relative paths) that `directory` lacks, in the order given."""
    return [name for name in required if not os.path.exists(os.path.join(directory, name))]


def wait_for_files(directory: str, required: tuple[str, ...], wait_s: float = 10.0, poll_s: float = 1.0) -> list[str]:
    """`missing_files`, looked at again for up to `wait_s` while some are missing: a network file
    system may show another node's new files to this one a moment late."""
    deadline = time.monotonic() + wait_s
    while True:
        missing = missing_files(directory, required)
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(poll_s)


def load(trainer, directory: str) -> None:
    # Every file is read and checked before anything is loaded: a damaged checkpoint fails here
    # and leaves the model, optimizer and data position as they were.
    verify(directory, required_files(trainer), trainer.model)
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


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or damaged."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The folder, or a file a checkpoint must have, does not exist."""


def _check_file(path: str, expected_shapes: dict | None) -> None:
    """Read `path` the way resuming will (json, safetensors, torch pickles); raise on damage."""
    if path.endswith(".json"):
        with open(path) as f:
            json.load(f)
    elif path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)  # reads the bytes: a truncated file fails here
                want = (expected_shapes or {}).get(name)
                if want is not None and tuple(tensor.shape) != tuple(want):
                    raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}, the model expects {tuple(want)}")
    elif path.endswith((".pt", ".pth", ".bin")):
        torch.load(path, map_location="cpu", weights_only=False)


def verify(directory: str, required: tuple[str, ...] = (STATE_FILE, RUN_FILE), model=None) -> None:
    """Check that `directory` is a complete, readable checkpoint: the `required` files exist and
    every weight, optimizer, RNG and state file in it parses (and, given `model`, its weights fit
    the model's shapes). Raises `CheckpointError` naming the file."""
    if not os.path.isdir(directory):
        raise MissingCheckpointError(f"resume_from_checkpoint: no such folder: {directory!r}; give a checkpoint-<step> "
                              "folder written by odpo_vllm, or True for the newest one in output_dir")
    missing = missing_files(directory, required)
    if missing:
        raise MissingCheckpointError(f"resume_from_checkpoint: {directory} has no {', '.join(missing)}: the checkpoint "
                                     "is incomplete (interrupted while saving, or saved with other ray_learner_ranks or "
                                     "ray_zero_stage?); resume from an earlier checkpoint-<step> folder")
    shapes = None
    if model is not None:
        shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                _check_file(path, shapes)
            except Exception as err:  # any library error: the file is damaged
                raise CheckpointError(
                    f"resume_from_checkpoint: {path} is damaged ({type(err).__name__}: {str(err)[:200]}); the "
                    "checkpoint cannot be resumed: resume from an earlier checkpoint-<step> folder "
                    "(resume_from_checkpoint=True picks the newest complete one)"
                ) from err


def has_checkpoints(output_dir: str) -> bool:
    return any(folder.complete for folder in checkpoint_folders(output_dir))


def newest_complete(output_dir: str, required: tuple[str, ...] = (STATE_FILE, RUN_FILE), model=None) -> str:
    """The newest checkpoint-<step> folder of `output_dir` that `verify` accepts; a damaged newer
    one is skipped with a warning that names it."""
    folders = checkpoint_folders(output_dir)
    for folder in folders:
        if not folder.complete:
            logger.warning("resume_from_checkpoint: skipping %s (a save or a deletion that was interrupted; it is "
                           "not a checkpoint)", folder.path)
    complete = [folder for folder in folders if folder.complete]
    if not complete:
        raise MissingCheckpointError(f"resume_from_checkpoint=True: no checkpoint-* folder in {output_dir}")
    for folder in reversed(complete):
        try:
            verify(folder.path, required, model)
            return folder.path
        except CheckpointError as err:
            logger.warning("%s; falling back to an earlier checkpoint", err)
    raise CheckpointError(f"resume_from_checkpoint=True: every checkpoint in {output_dir} is damaged or incomplete "
                          "(see the warnings above); start without resume_from_checkpoint")


def _rotate(output_dir: str, limit: int | None) -> None:
    if not limit or limit <= 0:
        return
    complete = [folder for folder in checkpoint_folders(output_dir) if folder.complete]
    for folder in complete[:-limit]:
        shutil.rmtree(_set_aside(folder.path), ignore_errors=True)
