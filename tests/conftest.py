"""Shared fixtures: tiny models built once per session, and fast training arguments."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

# Before torch loads OpenMP (what `import odpo_vllm` does for a user): libgomp's spinning threads
# made the async tests 40x slower on a shared 2-core machine (63 s instead of 1.5 s for one).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback

from odpo_vllm import OnlineDPOConfig, toy
from odpo_vllm.learning.group import free_port  # the tests pick listener ports as the trainer does

torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray cluster the tests start (ray.init, `ray start`, ray.cluster_utils) runs its workers at
# the tests' priority, as the trainer's own cluster does (runtime/placement.py, ensure_ray): at Ray's
# default nice 15, a busy loop per core left the engines and ranks 3% of a core and every timeout fired.
os.environ.setdefault("RAY_worker_niceness", "0")


# Fixtures that start a slow tier's machinery, and the marker a test using them must carry.
NEEDS_MARKER = {"ray_cluster": "ray", "engine_setup": "vllm"}


# The longest test files first (seconds of one full run on 2 cores: test_faults 1116, test_placement
# 494, test_preemption 434, ...). The README's command runs them on two pytest-xdist workers that take
# one file at a time in this order (pyproject: --dist loadfile --no-loadscope-reorder): a long file
# started last would leave one worker alone for its whole length at the end of the run.
LONGEST_FIRST = ("test_faults.py", "test_placement.py", "test_preemption.py", "test_multinode.py",
                 "test_joined_cluster.py", "test_learner_group.py", "test_ray_job.py", "test_doctor.py",
                 "test_shared_storage.py",
                 "test_console.py", "test_resources.py", "test_checkpoint_kills.py")


def pytest_collection_modifyitems(config, items):
    """Puts the longest files first (`LONGEST_FIRST`; the rest keep their order), and keeps the
    markers truthful: a test that starts Ray or a vLLM engine through a fixture and lacks the marker
    would run in the fast tier."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
    for item in items:
        for fixture, marker in NEEDS_MARKER.items():
            if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None:
                raise pytest.UsageError(f"{item.nodeid} uses {fixture} but is not marked {marker}")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for one test module (the Ray tiers)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "PYTHONPATH") if k in os.environ}
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False,
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()




ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ray_env() -> dict[str, str]:
    """For `ray start` and the processes that join its head: they (and their jobs) import this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    # Ray 2.60 heads default to token auth while the CLI reads RAY_AUTH_MODE: one mode for both.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", GLOO_SOCKET_IFNAME="lo",
               OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    return env


class RayHead(NamedTuple):
    address: str  # the GCS, for --ray_address
    dashboard: str  # the job server, for `ray job submit --address`
    temp_dir: str  # its --temp-dir (sessions, jobs' working directories)


@contextlib.contextmanager
def ray_head_process(cwd=None):
    """`ray start --head --block` in a child process started in `cwd` (the raylet's working
    directory, and so its workers'): terminating it stops the whole head, and nothing else of the
    user's Ray processes on the machine (unlike `ray stop`)."""
    temp_dir = tempfile.mkdtemp(prefix="odpo_rayjob_")  # short: Ray's socket paths are length-limited
    port, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         # Ray's fixed defaults (52365, 10001) collide with any other cluster on the machine: the second
         # head's job agent then runs without its HTTP server and `ray job submit` answers "No available
         # agent to submit job" for as long as the first cluster lives.
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         "--num-cpus=2", f"--object-store-memory={256 << 20}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        cwd=cwd, env=ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    head_info = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", temp_dir)
    deadline = time.time() + 180
    try:
        while True:  # the job server answers once the dashboard is up
            probe = subprocess.run(["ray", "job", "list", "--address", head_info.dashboard], env=ray_env(),
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head at {head_info.dashboard} did not come up within 180s: "
                                   f"{probe.stderr[-2000:]}")
            time.sleep(2)
        yield head_info
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job_submit(dashboard: str, options: list[str], entrypoint: list[str], timeout: float = 600,
                   agent_wait_s: float = 180) -> subprocess.CompletedProcess:
    """`ray job submit --address dashboard *options -- *entrypoint`. The head's job agent can be
    briefly unavailable on a loaded machine ("No available agent to submit job, please try again
    later"): the submission is retried for up to `agent_wait_s`, as Ray's message asks."""
    deadline = time.time() + agent_wait_s
    while True:
        done = subprocess.run(["ray", "job", "submit", "--address", dashboard, *options, "--", *entrypoint],
                              env=ray_env(), capture_output=True, text=True, timeout=timeout)
        if done.returncode == 0 or "No available agent" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(5)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 for one test module (started by `ray start`, in this folder)."""
    with ray_head_process() as head:
        yield head


# ---------------------------------------------------------------------------------------- a node without the mount
def can_mount_in_a_namespace_of_its_own() -> bool:
    """Whether this machine lets a process mount a tmpfs in a mount namespace of its own (root,
    CAP_SYS_ADMIN): what `cluster_with_a_node_blind_to` needs to give one node another view of a folder."""
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                f"mount -t tmpfs tmpfs {folder}"], capture_output=True)
        return probe.returncode == 0


def stop_process_groups(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to the process groups a test started (`start_new_session`), all at once (a Ray node
    takes seconds to stop), SIGKILL to any still there after 60 s."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):  # already gone (a node that failed to join)
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + 60
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def two_node_env() -> dict[str, str]:
    """`ray_env()` for a cluster a second node joins: Ray only lets a node join a head that allows it
    (`ray_env` turns that off for the one-node heads)."""
    return {**ray_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


def alive_nodes(address: str) -> int:
    status = subprocess.run(["ray", "status", "--address", address], env=ray_env(), capture_output=True, text=True,
                            timeout=60)
    if status.returncode != 0:
        return 0
    active = status.stdout.split("Active:")[-1].split("Pending:")[0]
    return len(re.findall(r"\bnode_[0-9a-f]+", active))


@contextlib.contextmanager
def cluster_with_a_node_blind_to(folder, node_cpus: int = 2):
    """A Ray cluster on this machine whose work runs on a node that sees another `folder`, as a
    node without the shared mount would: a head with no CPUs (nothing runs there) and a second
    node whose raylet, and so every worker it starts, runs in a mount namespace where `folder` is
    an empty tmpfs. Yields the head's address; both are stopped at the end."""
    temp_dir = tempfile.mkdtemp(prefix="odpo_2node_")  # short: Ray's socket paths are length-limited
    address = f"127.0.0.1:{free_port()}"
    common = ["--node-ip-address=127.0.0.1", f"--object-store-memory={256 << 20}", "--disable-usage-stats", "--block"]
    head = subprocess.Popen(["ray", "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=0",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}", *common],
                            env=two_node_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    node = None
    try:
        deadline = time.time() + 180
        while alive_nodes(address) < 1:
            assert head.poll() is None and time.time() < deadline, "the Ray head did not come up within 180 s"
            time.sleep(2)
        node = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs tmpfs "{folder}" && exec ray start --address={address} --num-cpus={node_cpus} '
             f'{" ".join(common)}'],
            env=two_node_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while alive_nodes(address) < 2:
            assert node.poll() is None and time.time() < deadline, "the second node did not join within 180 s"
            time.sleep(2)
        yield address
    finally:
        stop_process_groups([process for process in (node, head) if process is not None])
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def model_path(models_dir):
    """A random-init tiny causal LM (Qwen2-shaped, max_position_embeddings=512) with its tokenizer."""
    return toy.build_model(models_dir / "policy")


@pytest.fixture(scope="session")
def reward_model_path(models_dir):
    """A 1-label sequence-classification reward model with the same tokenizer."""
    return toy.build_model(models_dir / "reward", seed=1, reward_model=True)


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def probe_ids(tokenizer):
    """Token ids whose logprobs tell two copies of the policy apart."""
    return tokenizer("Review the film: it was great fun")["input_ids"] * 2


@pytest.fixture
def model(model_path):
    """A fresh copy of the tiny policy for each test (training mutates it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path)


@pytest.fixture
def fresh_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


FAST = dict(
    per_device_train_batch_size=2,
    per_device_eval_batch_size=2,
    gradient_accumulation_steps=1,
    max_steps=2,
    max_new_tokens=8,
    learning_rate=3e-3,
    logging_steps=1,
    report_to="none",
    disable_tqdm=True,
    save_strategy="no",
    plot_at_end=False,
    seed=0,
    use_vllm=False,  # the transformers sampler; tests/test_vllm*.py cover the engine
)


def make_args(tmp_path, **overrides) -> OnlineDPOConfig:
    """An OnlineDPOConfig with fast test settings; keyword arguments override them."""
    settings = dict(FAST)
    settings["output_dir"] = str(overrides.pop("output_dir", tmp_path / "out"))
    settings.update(overrides)
    return OnlineDPOConfig(**settings)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model) -> set[str]:
    now = dict(model.named_parameters())
    return {name for name, value in before.items() if not torch.equal(value, now[name].detach())}


def saved_weights(trainer, directory) -> dict[str, torch.Tensor]:
    """The policy's weights as the public save path writes them: `trainer.save_model` (or a
    LearnerGroup's `save_pretrained`, which save_model calls) into a fresh folder under
    `directory`, read back from its model.safetensors (a LoRA policy's: adapter_model.safetensors).
    The trainer must still be open."""
    from safetensors.torch import load_file

    folder = tempfile.mkdtemp(prefix="saved-", dir=directory)
    save = trainer.save_model if hasattr(trainer, "save_model") else trainer.save_pretrained
    save(folder)
    adapter = os.path.join(folder, "adapter_model.safetensors")
    return load_file(adapter if os.path.exists(adapter) else os.path.join(folder, "model.safetensors"))


def rank_logprobs(group, token_ids, ranks: int) -> torch.Tensor:
    """The learner ranks' logprobs of `token_ids`, asserted identical on every rank (ranks holding
    the same weights compute the same forward pass); rank 0's."""
    per_rank = group.call("sequence_logprobs", token_ids)
    assert len(per_rank) == ranks
    for rank, logprobs in enumerate(per_rank[1:], start=1):
        assert torch.equal(logprobs, per_rank[0]), f"rank {rank} differs from rank 0"
    return per_rank[0]


def model_logprobs(model, token_ids) -> torch.Tensor:
    """log p(token_ids[t] | token_ids[:t]) for t >= 1 under a transformers model in this process
    (what a learner's `sequence_logprobs` computes)."""
    from odpo_vllm.core.sequences import token_logprobs

    ids = torch.tensor([token_ids])
    with torch.no_grad():
        return token_logprobs(model.eval()(input_ids=ids, use_cache=False).logits, ids)[0].float()


def train_rows(trainer) -> list[dict]:
    """Training log rows (those with the per-step metrics)."""
    return [row for row in trainer.state.log_history if "objective/scores" in row and "loss" in row]


class StopAt(TrainerCallback):
    """Stops training after `step` (what a preemption or a crash looks like to a resumed run: the
    checkpoint of that step, and nothing after it)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def record_prompts(trainer) -> list:
    """The prompts each learner step trains on, in order (wraps the learner's `step`)."""
    seen, step = [], trainer.learner.step

    def recording(batch, beta):
        seen.append([tuple(ids) for ids in batch.prompt_ids])
        return step(batch, beta)

    trainer.learner.step = recording
    return seen
