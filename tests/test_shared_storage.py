"""`output_dir` shared by the driver and every learner rank (`primitives/shared_storage.py`):
- fast: DeepSpeed's per-rank checkpoint files, the missing ones listed, the errors' words (rank,
  node, files, the shared-storage hint), the marker read back or not, and `checkpoint.save`
  refusing to rename a save whose rank files the driver cannot see (a stand-in trainer);
- Ray: a real second node whose processes see another folder at output_dir's path (a tmpfs
  mounted over it in the node's own mount namespace, as a node without the NFS mount would): the
  run fails at start, before any engine, naming the rank and its node."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers.trainer_callback import TrainerState

from conftest import can_mount_in_a_namespace_of_its_own, cluster_with_a_node_blind_to, ray_env
from odpo_vllm import toy
from odpo_vllm.learning.deepspeed_rank import checkpoint_files
from odpo_vllm.primitives import shared_storage
from odpo_vllm.run import checkpoint
from odpo_vllm.primitives.shared_storage import SharedStorageError

HINT = "output_dir must be shared storage mounted at the same path on every node"


# ---------------------------------------------------------------------------------------- fast
def test_checkpoint_files_are_deepspeeds_names_per_rank():
    assert checkpoint_files(2, 2, bf16=False) == {
        "deepspeed/mp_rank_00_model_states.pt": 0,  # ZeRO-2: rank 0 writes the whole module
        "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
    }
    assert checkpoint_files(2, 3, bf16=True) == {
        "deepspeed/zero_pp_rank_0_mp_rank_00_model_states.pt": 0,  # ZeRO-3: each rank its partition
        "deepspeed/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
        "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt": 1,
        "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
    }


def write(folder: Path, names) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")


def test_missing_files_lists_what_a_rank_did_not_write_here(tmp_path):
    expected = checkpoint_files(3, 3, bf16=False)
    write(tmp_path, [name for name, rank in expected.items() if rank != 1])
    assert checkpoint.missing_files(str(tmp_path), tuple(expected)) == [
        "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    write(tmp_path, expected)
    assert checkpoint.missing_files(str(tmp_path), tuple(expected)) == []


def test_missing_rank_files_error_names_ranks_nodes_files_and_the_hint():
    missing = {"deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt": "learner-rank1",
               "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt": "learner-rank1",
               "deepspeed/zero_pp_rank_2_mp_rank_00_optim_states.pt": "learner-rank2"}
    text = str(shared_storage.missing_rank_files("/x/y", "/x/y/checkpoint-3.incomplete", missing,
                                                 {"learner-rank1": "10.0.0.5 (node-b)"}))
    assert text.startswith("output_dir /x/y: learner-rank1 on node 10.0.0.5 (node-b) wrote "
                           "deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt, "
                           "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt into /x/y/checkpoint-3.incomplete "
                           "and the driver cannot see them; learner-rank2 wrote ")  # rank 2's node: not known
    assert HINT in text


def test_blind_ranks_names_only_the_ranks_that_did_not_read_the_marker():
    assert shared_storage.blind_ranks("/x/y", ["learner-rank0", "learner-rank1"], [(True, "a"), (True, "b")]) is None
    error = shared_storage.blind_ranks("/x/y", ["learner-rank0", "learner-rank1"],
                                       [(True, "10.0.0.4 (a)"), (False, "10.0.0.5 (b)")])
    assert isinstance(error, SharedStorageError)
    assert str(error).startswith("output_dir /x/y: learner-rank1 on node 10.0.0.5 (b) cannot see the file the "
                                 f"driver wrote there; {HINT}")
    assert "learner-rank0" not in str(error)


def test_marker_is_read_back_only_where_the_driver_wrote_it(tmp_path):
    path, token = shared_storage.write_marker(str(tmp_path / "out"))  # creates output_dir
    assert os.path.dirname(path) == str(tmp_path / "out")
    assert shared_storage.sees_marker(path, token, wait_s=0)
    assert not shared_storage.sees_marker(path, "another run's token", wait_s=0)
    assert not shared_storage.sees_marker(str(tmp_path / "elsewhere" / os.path.basename(path)), token, wait_s=0)


class RankGroupStandIn:
    """A learner group's save: the ranks whose files reach the driver's folder (`shared`); the
    others wrote on a node of their own."""

    def __init__(self, shared: set[int]):
        self.names, self.nodes, self.shared = ["learner-rank0", "learner-rank1"], {"learner-rank1": "10.0.0.5 (b)"}, shared

    def save(self, directory: str) -> None:
        write(Path(directory), [name for name, rank in checkpoint_files(2, 2, False).items() if rank in self.shared])


def ray_trainer(output_dir: Path, learner) -> SimpleNamespace:
    """What `checkpoint.save` uses of a trainer under a Ray placement (no model in the driver)."""
    args = SimpleNamespace(output_dir=str(output_dir), save_total_limit=None, ray_learner_ranks=2, ray_zero_stage=2,
                           bf16=False, sync_ref_model=False)
    state = TrainerState()
    state.global_step = 3
    return SimpleNamespace(args=args, state=state, model=None, learner=learner,
                           pipeline=SimpleNamespace(state_dict=lambda deadline, version: {"data": {}}), save_model=lambda directory: None,
                           batches=SimpleNamespace(state_dict=lambda: {}), publisher=SimpleNamespace(version=3))


def test_save_is_not_renamed_when_a_ranks_files_are_not_in_the_drivers_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "wait_for_files",
                        lambda directory, required: checkpoint.missing_files(directory, required))
    with pytest.raises(SharedStorageError, match=re.escape(
            f"output_dir {tmp_path}: learner-rank1 on node 10.0.0.5 (b) wrote "
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt into ")) as caught:
        checkpoint.save(ray_trainer(tmp_path, RankGroupStandIn(shared={0})))
    assert HINT in str(caught.value)
    assert not (tmp_path / "checkpoint-3").exists()  # nothing that looks like a checkpoint
    assert checkpoint.checkpoint_folders(str(tmp_path)) == [
        checkpoint.CheckpointFolder(str(tmp_path / "checkpoint-3.incomplete"), 3, complete=False)]

    # every rank's files there: renamed, and the load-time check accepts what the save-time one did
    trainer = ray_trainer(tmp_path, RankGroupStandIn(shared={0, 1}))
    saved = checkpoint.save(trainer)
    assert saved == str(tmp_path / "checkpoint-3") and not (tmp_path / "checkpoint-3.incomplete").exists()
    assert checkpoint.required_files(trainer)[-3:] == tuple(checkpoint_files(2, 2, False))
    assert checkpoint.missing_files(saved, checkpoint.required_files(trainer)) == []


def test_resume_names_every_missing_rank_file(tmp_path):
    trainer = ray_trainer(tmp_path, RankGroupStandIn(shared={0}))
    folder = tmp_path / "checkpoint-3"
    write(folder, [checkpoint.STATE_FILE, checkpoint.RUN_FILE, checkpoint.RNG_FILE, checkpoint.ROLLOUTS_FILE])
    trainer.learner.save(str(folder))
    with pytest.raises(checkpoint.MissingCheckpointError,
                       match="has no deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt: the checkpoint is incomplete"):
        checkpoint.verify(str(folder), checkpoint.required_files(trainer))


# ---------------------------------------------------------------------------------------- Ray: a node without the mount
@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.skipif(not can_mount_in_a_namespace_of_its_own(),
                    reason="needs `unshare --mount` and tmpfs mounts (root with CAP_SYS_ADMIN)")
def test_a_rank_on_a_node_without_the_shared_mount_stops_the_start_naming_it(tmp_path):
    """A head with no CPUs (nothing runs there) and a second node, both on this machine; the second
    node's raylet, and so every worker it starts, runs in a mount namespace where output_dir is an
    empty tmpfs: the learner rank placed there sees another folder at the same path."""
    work, out = tmp_path / "work", tmp_path / "work" / "out"
    toy.build_model(work / "m" / "policy")
    toy.write_prompts(work / "data" / "prompts.jsonl", n=8)
    out.mkdir()
    with cluster_with_a_node_blind_to(out) as address:
        started = time.time()
        run = subprocess.run(
            [sys.executable, "-m", "odpo_vllm.train", "--placement", "dedicated", "--ray_address", address,
             "--ray_learner_ranks", "1", "--ray_num_engines", "1", "--ray_cpus_per_actor", "0.5",
             "--model_name_or_path", "m/policy", "--dataset_name", "data/prompts.jsonl",
             "--reward_funcs", "odpo_vllm.toy:sentiment_reward", "--output_dir", "out", "--max_steps", "1",
             "--per_device_train_batch_size", "2", "--max_new_tokens", "8", "--report_to", "none",
             "--disable_tqdm", "true", "--plot_at_end", "false", "--ray_timeout_s", "300"],
            cwd=work, env=ray_env(), capture_output=True, text=True, timeout=600)
        seconds = time.time() - started
    output = run.stdout[-5000:] + run.stderr[-5000:]
    print(f"the run failed {seconds:.0f} s after it started")
    assert run.returncode != 0, output
    # the node as the rank reports it: Ray's IP of the node (this machine's) and the host name
    assert re.search(rf"SharedStorageError: output_dir {re.escape(str(out))}: learner-rank0 on node [0-9.]+ "
                     r"\(\S+\) cannot see the file the driver wrote there; " + HINT, output), output
    assert "vllm-engine-0" not in output  # stopped before any engine started
    assert os.listdir(out) == []  # the driver removed its marker
