"""Several nodes on one machine: a head without CPUs and four nodes of 1 CPU each (Ray's own
`cluster_utils.Cluster`; removing a node kills its raylet and every process on it at once).
The learner rank and the vLLM engine land on different nodes.
- The node holding the engine is killed mid-run: the engine is started again on a spare node and
  the run ends with the weights of the same run without the fault.
- The node holding the learner rank is killed: the run stops naming the rank, and a resume from
  its last checkpoint on the nodes left ends with the fault-free weights."""

from __future__ import annotations

import os

import pytest

from odpo_vllm import OnlineDPOTrainer, toy

from conftest import make_args, saved_weights

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def three_nodes():
    """Ray and the worker nodes by the custom resource that names each (`ray.cluster_utils.Cluster`:
    every node its own raylet and object store on this machine)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 << 20})
    try:
        nodes = {name: cluster.add_node(num_cpus=1, resources={name: 1}, object_store_memory=200 << 20)
                 for name in ("node_a", "node_b", "node_c", "node_d")}
        cluster.wait_for_nodes()
        env = {key: os.environ[key] for key in ("PYTHONPATH", "OMP_WAIT_POLICY") if key in os.environ}
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
        yield ray, cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def node_of(ray, actor_name: str) -> str:
    """The custom resource ("node_a", ...) of the node the named actor runs on."""
    from ray._private.state import actors  # the GCS's actor table (the state API needs a dashboard)

    node_id = next(info["Address"]["NodeID"] for info in actors(actor_state_name="ALIVE").values()
                   if info.get("Name") == actor_name)
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return next(key for key in node["Resources"] if key.startswith("node_"))


def node_marked_dead(ray, name: str, timeout_s: float = 90.0) -> bool:
    """Whether the GCS lists the node holding the custom resource `name` as dead within `timeout_s`.
    The run may end before the GCS's health checks notice a killed raylet (seconds, longer under load:
    the engine's replacement does not wait for it), so the test waits for the GCS here."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(n["Alive"] and name in n["Resources"] for n in ray.nodes()):
            return True
        time.sleep(0.5)
    return False


def train(model_path, args, fault=None, resume=None):
    with OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(24)) as trainer:
        if fault is not None:
            fault(trainer)
        trainer.train(resume_from_checkpoint=resume)
        weights = saved_weights(trainer, args.output_dir)
    return weights, [r for r in trainer.state.log_history if "loss" in r]


def settings(tmp_path, name, **overrides):
    return make_args(tmp_path, use_vllm=True, placement="dedicated", ray_learner_ranks=1, ray_num_engines=1,
                     ray_cpus_per_actor=1.0, ray_timeout_s=60, max_steps=6, per_device_train_batch_size=4,
                     max_new_tokens=8, learning_rate=1e-2, gradient_checkpointing=False, lr_scheduler_type="constant",
                     output_dir=tmp_path / name, **overrides)


@pytest.fixture(scope="module")
def clean_run(three_nodes, model_path, tmp_path_factory):
    return train(model_path, settings(tmp_path_factory.mktemp("clean"), "clean"))


def kill_node_after_step(trainer, ray, cluster, nodes, actor: str, step: int, placed: dict) -> None:
    """Kill, after `step`, the node holding `actor` (its raylet and every process on it, at once);
    `placed` records where the rank and the engine were."""
    from transformers import TrainerCallback

    class KillNode(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step and not placed:
                placed["rank"] = node_of(ray, "learner-rank0")
                placed["engine"] = node_of(ray, "vllm-engine-0")
                cluster.remove_node(nodes[placed[actor]], allow_graceful=False)
                # the next step must meet the loss: a worker of a killed raylet can take seconds to
                # notice under load (and finish the short run); the GCS marks its actors dead with the node
                assert node_marked_dead(ray, placed[actor])

    trainer.add_callback(KillNode())


def test_losing_the_node_of_an_engine_re_places_it_and_the_run_ends_as_without_the_fault(three_nodes, clean_run,
                                                                                          model_path, tmp_path):
    ray, cluster, nodes = three_nodes
    expected, clean_rows = clean_run
    placed = {}

    weights, rows = train(model_path, settings(tmp_path, "faulty"),
                          lambda trainer: kill_node_after_step(trainer, ray, cluster, nodes, "engine", 3, placed))
    assert placed and placed["engine"] != placed["rank"]
    assert node_marked_dead(ray, placed["engine"])
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["faults/engine_restarts"] == 1
    assert max(r["sync/logprob_gap"] for r in rows) < 1e-4
    for key in ("loss", "objective/scores"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in clean_rows], abs=1e-6), key
    assert max((weights[n] - expected[n]).abs().max().item() for n in expected) <= 1e-6


def test_losing_the_node_of_a_rank_stops_naming_it_and_resume_ends_as_without_the_fault(three_nodes, clean_run,
                                                                                        model_path, tmp_path):
    ray, cluster, nodes = three_nodes
    expected, _ = clean_run
    placed = {}
    args = settings(tmp_path, "rank_lost", save_strategy="steps", save_steps=2)
    with pytest.raises(RuntimeError, match=r"learner group: learner-rank0 died during \w+\(\)"):
        train(model_path, args, lambda trainer: kill_node_after_step(trainer, ray, cluster, nodes, "rank", 3, placed))
    assert placed and placed["rank"] != placed["engine"]
    assert (tmp_path / "rank_lost" / "checkpoint-2").is_dir()
    weights, rows = train(model_path, args, resume=True)  # on the nodes left
    assert [r["step"] for r in rows][-1] == 6
    assert max((weights[n] - expected[n]).abs().max().item() for n in expected) <= 1e-5
