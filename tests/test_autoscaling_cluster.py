"""A run on an autoscaling cluster: a head with no CPUs started by `ray start --autoscaling-config`
with Ray's fake multi-node provider (its autoscaler starts each "node" as a raylet on this
machine). The dedicated placement needs two 1-CPU actors the cluster does not have; with
`--ray_wait_for_resources_s` the run asks the autoscaler for them, waits for the two worker nodes
it launches, and trains.

The head runs in its own process group with its own ports and temp folder: stopping it (and any
process left that names its temp folder) touches no other Ray cluster on the machine.
`ray.cluster_utils.AutoscalingCluster` is not used: its start and shutdown run `ray stop --force`,
which kills every Ray cluster of the user."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from conftest import ray_env
from odpo_vllm import toy
from odpo_vllm.learning.group import free_port
from test_deploy_files import cluster_errors

WORKER_TYPE = "ray.worker.cpu"


def autoscaling_config(gcs_address: str) -> dict:
    """Up to two worker nodes of 1 CPU. The monitor reads this file as it is (no defaults filled
    in, unlike `ray up`), so every field Ray's autoscaler reads is here."""
    return {
        "cluster_name": "odpo-autoscaling-test",
        "max_workers": 2,
        # gcs_address: the fake nodes join this head rather than one at port 6379; use_node_id_as_ip:
        # the nodes share one IP, so the autoscaler tells them apart by node id. (launch_multiple,
        # which starts a launch's nodes at once, overshot here: 3 nodes for 2 bundles.)
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1, "object_store_memory": 128 << 20}, "node_config": {},
                          "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": 10,  # no node leaves while the test runs
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def autoscaler_env() -> dict[str, str]:
    # RAY_FAKE_CLUSTER: the fake provider refuses to start without it; the monitor looks every second
    return {**ray_env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}


def monitor_log(temp_dir: str) -> str:
    """The autoscaler's log: its config when it starts, each launch, and the cluster's status."""
    # session_[0-9]*: the session folder, not its session_latest link to it
    return "".join(path.read_text(errors="replace") for path in Path(temp_dir).glob("session_[0-9]*/logs/monitor.log"))


def active_nodes(log: str) -> dict[str, int]:
    """The node types and counts of the last status the autoscaler logged ("Active:" block)."""
    block = log.rpartition("Active:")[2].partition("Pending:")[0]
    return {name: int(count) for count, name in re.findall(r"^\s*(\d+) (\S+)$", block, re.MULTILINE)}


def pids_naming(folder: str) -> list[int]:
    """The processes whose command line names `folder` (the head's temp folder: the
    raylets, agents and workers of its nodes pass their session folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if folder.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(head: subprocess.Popen, temp_dir: str) -> None:
    """The head's process group: the GCS, the monitor, and the fake nodes the monitor started (its
    children, in the group), workers included; then anything that names the cluster's temp folder.
    SIGKILL at once: a graceful stop (SIGTERM) with fake nodes up took 30 s, and the cluster's
    files go with its temp folder."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
    for pid in pids_naming(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30  # the killed ones that lost their parent wait for init to reap them
    while group_alive(head.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


class Head(NamedTuple):
    address: str  # the GCS, for --ray_address
    temp_dir: str  # its --temp-dir: the sessions of the head and of the fake nodes
    process: subprocess.Popen  # `ray start --block`, leader of the cluster's process group


def wait_for_autoscaler(head: Head, timeout_s: float = 120) -> None:
    """Until the autoscaler has started (its log shows its config; `ray status` would tell too, at
    seconds of imports a call)."""
    deadline = time.monotonic() + timeout_s
    while "StandardAutoscaler: {" not in monitor_log(head.temp_dir):
        assert head.process.poll() is None, f"the head at {head.address} stopped"
        assert time.monotonic() < deadline, f"no autoscaler at {head.address} within {timeout_s:.0f}s"
        time.sleep(0.5)


@contextlib.contextmanager
def autoscaling_head(cwd: Path):
    """`ray start --head --block` with no CPUs and the fake provider's autoscaler, as it starts
    (`wait_for_autoscaler`); stopped with everything it started at the end."""
    temp_dir = tempfile.mkdtemp(prefix="odpo_as_")  # short: Ray's socket paths are length-limited
    address = f"127.0.0.1:{free_port()}"
    config = cwd / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(address)))
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={address.split(':')[1]}",
         "--num-cpus=0", f"--autoscaling-config={config}", "--include-dashboard=false",
         # Ray's fixed defaults would collide with another cluster on the machine (the dashboard's
         # process runs without the dashboard too, at 8265 unless told)
         f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}",
         f"--object-store-memory={128 << 20}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        cwd=cwd, env=autoscaler_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield Head(address, temp_dir, head)
    finally:
        stop(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def train_command(work: Path, address: str) -> list[str]:
    """One learner rank and one vLLM engine of 1 CPU each: two nodes' worth on a head with none."""
    return [sys.executable, "-m", "odpo_vllm.train", "--placement", "dedicated", "--ray_address", address,
            "--ray_wait_for_resources_s", "180", "--ray_timeout_s", "180", "--ray_learner_ranks", "1",
            "--ray_num_engines", "1", "--ray_cpus_per_actor", "1", "--model_name_or_path", str(work / "policy"),
            "--dataset_name", str(work / "prompts.jsonl"), "--reward_funcs", "odpo_vllm.toy:sentiment_reward",
            "--output_dir", str(work / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--max_new_tokens", "8", "--learning_rate", "3e-3", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", "0", "--plot_at_end", "false", "--disable_tqdm", "true"]


def test_autoscaling_config_is_a_valid_cluster_file():
    assert cluster_errors(autoscaling_config("127.0.0.1:6379")) == []


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)  # 80-120 s beside a benchmark; 180-310 s with two busy loops more
def test_a_run_waits_for_the_autoscalers_nodes_and_trains(tmp_path):
    work, head_dir = tmp_path / "work", tmp_path / "head"
    head_dir.mkdir()
    with autoscaling_head(head_dir) as head:
        toy.build_model(work / "policy")  # while the head starts
        toy.write_prompts(work / "prompts.jsonl", n=16)
        wait_for_autoscaler(head)  # with no worker node: min_workers 0, they come on demand
        done = subprocess.run(train_command(work, head.address), cwd=work, env=ray_env(), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
        time.sleep(2)  # the autoscaler's next status line (it logs one a second)
        log = monitor_log(head.temp_dir)
    assert "waiting for the cluster to grow, its autoscaler asked for the bundles" in done.stderr, done.stderr[-3000:]
    assert re.search(rf"Adding \d+ node\(s\) of type {re.escape(WORKER_TYPE)}", log), log[-3000:]
    assert active_nodes(log).get(WORKER_TYPE) == 2, log[-3000:]  # both up at the end: the run trained on them
    steps = [row["step"] for row in map(json.loads, (work / "out" / "metrics.jsonl").read_text().splitlines())
             if "loss" in row]
    assert steps == [1, 2]
    assert pids_naming(head.temp_dir) == [] and not group_alive(head.process.pid)  # nothing of the cluster outlived it
