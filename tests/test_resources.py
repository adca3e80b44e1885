"""A placement's resources are checked before anything starts: a demand the cluster cannot hold
fails at once naming each role's share and its flags (it used to wait `ray_timeout_s` in
silence), and the reward workers' default CPUs fit beside the ranks and engines."""

from __future__ import annotations

import logging
import time

import pytest

from odpo_vllm import OnlineDPOTrainer, toy
from odpo_vllm.runtime import resources
from odpo_vllm.runtime.resources import ResourceError, resource_demand, shortfall, totals

from conftest import make_args


def ray_args(tmp_path, **overrides):
    """The README's seed-flag shape by default: dedicated, 1 rank, 1 engine, 1 CPU each."""
    base = dict(placement="dedicated", use_vllm=True, output_dir=tmp_path / "out")
    base.update(overrides)
    return make_args(tmp_path, **base)


# ------------------------------------------------------------------------------ the demand (no Ray)
def test_seed_flag_shape_fits_two_cpus_thanks_to_the_reward_workers_default(tmp_path):
    demand = resource_demand(ray_args(tmp_path), colocated=False, on_gpu=False, num_reward_workers=1,
                             cluster_cpus=2.0)
    assert [(s.role, s.count, s.cpus, s.gpus) for s in demand] == [
        ("learner ranks", 1, 1.0, 0.0), ("vLLM engines", 1, 1.0, 0.0), ("reward workers", 1, 0.0, 0.0)]
    assert totals(demand) == {"CPU": 2.0, "GPU": 0.0}
    assert shortfall("dedicated", demand, {"CPU": 2.0}, [{"CPU": 2.0}]) is None


def test_reward_workers_default_takes_what_is_left_at_most_one_cpu_each(tmp_path):
    def reward_cpus(cluster_cpus, workers, **overrides):
        demand = resource_demand(ray_args(tmp_path, **overrides), False, False, workers, cluster_cpus)
        return demand[-1].cpus

    assert reward_cpus(8.0, 2) == 1.0  # 6 CPUs left: capped at 1 each
    assert reward_cpus(3.5, 3) == 0.5  # 1.5 left for 3
    assert reward_cpus(2.0, 3) == 0.0  # nothing left
    assert reward_cpus(2.0, 1, ray_cpus_per_actor=0.5) == 1.0
    assert reward_cpus(1.0, 1, ray_learner_ranks=2, ray_cpus_per_actor=0.5) == 0.0
    assert reward_cpus(2.0, 1, ray_cpus_per_reward_worker=0.25) == 0.25  # given: used as is
    assert len(resource_demand(ray_args(tmp_path), False, False, 0, 2.0)) == 2  # no reward model: no workers


def test_too_much_names_every_share_and_its_flags(tmp_path):
    args = ray_args(tmp_path, ray_cpus_per_reward_worker=1.0)
    demand = resource_demand(args, colocated=False, on_gpu=False, num_reward_workers=1, cluster_cpus=2.0)
    assert shortfall("dedicated", demand, {"CPU": 2.0}) == (
        "placement dedicated needs 3.0 CPUs and the cluster has 2.0: "
        "learner ranks 1 x 1.0 = 1.0 [ray_learner_ranks, ray_cpus_per_actor] + "
        "vLLM engines 1 x 1.0 = 1.0 [ray_num_engines, ray_cpus_per_actor] + "
        "reward workers 1 x 1.0 = 1.0 [ray_num_reward_workers, ray_cpus_per_reward_worker]")
    assert "--ray_num_cpus" in resources.advice(joined=False)
    assert "--ray_wait_for_resources_s" in resources.advice(joined=True)


def test_fractions_that_add_up_fit(tmp_path):
    args = ray_args(tmp_path, ray_learner_ranks=2, ray_num_engines=4, ray_cpus_per_actor=0.1)
    demand = resource_demand(args, False, False, 0, 0.6)
    assert shortfall("dedicated", demand, {"CPU": 0.6}) is None  # 6 x 0.1 is not above 0.6
    assert "needs 0.6 CPUs and the cluster has 0.5" in shortfall("dedicated", demand, {"CPU": 0.5})


def test_colocated_gpu_shares_engines_in_the_rank_bundles(tmp_path):
    args = ray_args(tmp_path, placement="colocated", ray_learner_ranks=2, ray_cpus_per_actor=2.0)
    demand = resource_demand(args, colocated=True, on_gpu=True, num_reward_workers=1, cluster_cpus=64.0)
    assert totals(demand) == {"CPU": 9.0, "GPU": 2.25}  # 2 ranks + 2 engines at 2 CPUs, 1 reward worker at 1
    message = shortfall("colocated", demand, {"CPU": 64.0, "GPU": 2.0})
    assert message == (
        "placement colocated needs 2.25 GPUs and the cluster has 2.0: "
        "learner ranks 2 x 0.5 = 1.0 [ray_learner_ranks] + "
        "vLLM engines 2 x 0.5 = 1.0, one in each rank's bundle [ray_learner_ranks, vllm_tensor_parallel_size] + "
        "reward workers 1 x 0.25 = 0.25 [ray_num_reward_workers, reward_gpus]")
    # a rank's bundle holds its engine: 4 CPUs and 1 GPU on one node
    assert resources.units(demand)[0] == ("a learner rank's bundle (the rank and its engine)", 2,
                                          {"CPU": 4.0, "GPU": 1.0})


def test_an_actor_larger_than_every_node_fails_even_when_the_total_suffices(tmp_path):
    args = ray_args(tmp_path, vllm_tensor_parallel_size=2)
    demand = resource_demand(args, colocated=False, on_gpu=True, num_reward_workers=0, cluster_cpus=16.0)
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    cluster = {"CPU": 16.0, "GPU": 3.0}
    assert shortfall("dedicated", demand, cluster, nodes) is None  # the engine on node 0, the rank on node 1
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    message = shortfall("dedicated", demand, cluster, nodes)
    assert message.startswith("placement dedicated: one of the vLLM engines needs 1.0 CPUs, 2.0 GPUs on one node, "
                              "and no node has them (the most on one node: 8.0 CPUs, 1.0 GPUs)")
    assert "vLLM engines 1 x 2.0 = 2.0 [ray_num_engines, vllm_tensor_parallel_size]" in message


# ------------------------------------------------------------------------------ on a Ray cluster
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_placement_the_cluster_cannot_hold_fails_at_once(ray_cluster, model_path, tmp_path):
    """3 CPUs asked of a 2-CPU cluster: an error naming each share within seconds, not a silent
    wait of ray_timeout_s; nothing of the placement was started."""
    args = ray_args(tmp_path, ray_learner_ranks=2, ray_timeout_s=600)
    start = time.monotonic()
    with pytest.raises(ResourceError) as info:
        OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                         train_dataset=toy.prompt_dataset(8))
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "placement dedicated needs 3.0 CPUs and the cluster has 2.0" in message
    assert "learner ranks 2 x 1.0 = 2.0 [ray_learner_ranks, ray_cpus_per_actor]" in message
    assert "vLLM engines 1 x 1.0 = 1.0 [ray_num_engines, ray_cpus_per_actor]" in message
    assert "--ray_wait_for_resources_s" in message  # a cluster this run joined (the fixture's)
    assert ray_cluster.util.list_named_actors() == []
    assert all(pg["state"] == "REMOVED" for pg in ray_cluster.util.placement_group_table().values())


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_waiting_for_an_autoscaler_says_so_and_gives_up_at_its_deadline(ray_cluster, tmp_path, caplog):
    args = ray_args(tmp_path, ray_learner_ranks=3, ray_wait_for_resources_s=2)
    demand = resource_demand(args, False, False, 0, 2.0)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="odpo_vllm"), pytest.raises(ResourceError, match="after waiting 2s"):
        resources.ensure_resources("dedicated", demand, joined=True, wait_s=2, timeout_s=600, poll_s=0.2)
    assert 2 <= time.monotonic() - start < 30
    waits = [r for r in caplog.records if r.levelno == logging.WARNING and "waiting for the cluster to grow" in r.message]
    assert waits and "at most 2s, ray_wait_for_resources_s" in waits[0].message
    assert "needs 4.0 CPUs and the cluster has 2.0" in waits[0].message
    # a cluster this run started cannot grow: no wait
    with pytest.raises(ResourceError, match="--ray_num_cpus"):
        resources.ensure_resources("dedicated", demand, joined=False, wait_s=2, timeout_s=600)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_resources_held_by_others_are_waited_for_with_a_log_line(ray_cluster, tmp_path, caplog, monkeypatch):
    @ray_cluster.remote(num_cpus=1.5)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray_cluster.get(holder.ready.remote())
    args = ray_args(tmp_path, ray_cpus_per_actor=0.5)  # 1 CPU of 2, but only 0.5 free
    demand = resource_demand(args, False, False, 0, 2.0)
    monkeypatch.setattr(resources, "HELD_NOTICE_S", 0.5)
    try:
        start = time.monotonic()
        with caplog.at_level(logging.INFO, logger="odpo_vllm"), pytest.raises(TimeoutError) as info:
            resources.ensure_resources("dedicated", demand, joined=True, wait_s=0, timeout_s=2, poll_s=0.2)
        assert 2 <= time.monotonic() - start < 30
        assert "waited 2s (ray_timeout_s) for resources held by other actors or jobs" in str(info.value)
        assert "needs 1.0 CPUs of the cluster's 2.0 CPUs, and 0.5 CPUs are free now" in str(info.value)
        lines = [r.message for r in caplog.records]
        assert any(line.startswith("waiting for resources held by other actors or jobs") and
                   "(at most 2s, ray_timeout_s)" in line for line in lines), lines
        assert any(line.startswith("still waiting for resources held") for line in lines), lines
    finally:
        ray_cluster.kill(holder)
    resources.ensure_resources("dedicated", demand, joined=True, wait_s=0, timeout_s=60, poll_s=0.2)  # freed


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_seed_flag_shape_with_a_reward_model_runs_on_two_cpus(ray_cluster, model_path, reward_model_path, tmp_path):
    """The README's seed-flag command line on a 2-CPU cluster: a learner rank and an engine at the
    default 1 CPU each, and a reward worker. Before `ray_cpus_per_reward_worker` the worker took
    1 CPU too, and the engine waited for a CPU that never came free."""
    args = ray_args(tmp_path, reward_model_path=str(reward_model_path), max_steps=2, per_device_train_batch_size=2,
                    max_new_tokens=8, gradient_checkpointing=False, ray_timeout_s=300)
    with OnlineDPOTrainer(model=model_path, args=args, train_dataset=toy.prompt_dataset(8)) as trainer:
        assert len(trainer.roles.rewards.workers) == 1
        trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["sync/logprob_gap"] < 1e-4 for r in rows)
    assert ray_cluster.util.list_named_actors() == []


def test_free_ports_come_from_below_the_ephemeral_range():
    """A listener's port picked in the range the kernel gives outgoing connections was taken before
    the listener bound (EADDRINUSE, with two Ray clusters on the machine); ours come from below it."""
    import socket

    from odpo_vllm.learning.group import RAY_WORKER_PORTS_END, _ephemeral_start, free_port

    low = _ephemeral_start()
    ports = {free_port() for _ in range(20)}
    assert all(RAY_WORKER_PORTS_END <= port < low for port in ports) and len(ports) > 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free, as promised
