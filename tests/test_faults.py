"""Faults on the dedicated Ray placement, with real processes killed: a vLLM engine actor's process
SIGKILLed mid-run is replaced (same seeds, current weights before it samples) and the run ends
with the weights of a run without the fault; past `ray_max_engine_restarts` the run stops naming
the engine."""

from __future__ import annotations

import os
import signal

import pytest
from transformers import TrainerCallback

from odpo_vllm import OnlineDPOTrainer, toy

from conftest import make_args, saved_weights

pytestmark = [pytest.mark.timeout(1200), pytest.mark.ray]  # and vllm on the tests that start an engine


def settings(tmp_path, name, **overrides):
    base = dict(use_vllm=True, placement="dedicated", ray_learner_ranks=1, ray_cpus_per_actor=0.5,
                ray_timeout_s=120, max_steps=8, per_device_train_batch_size=4, max_new_tokens=8,
                learning_rate=1e-2, gradient_checkpointing=False, lr_scheduler_type="constant",
                output_dir=tmp_path / name)
    base.update(overrides)
    return make_args(tmp_path, **base)


def kill_engine(trainer, name: str, sig: int = signal.SIGKILL) -> int:
    """Send `sig` to the process of engine `name` (a Ray actor on this machine); its pid."""
    import ray

    pid = ray.get(trainer.roles.engine_pool.engines[name].pid.options(concurrency_group="control").remote())
    os.kill(pid, sig)
    return pid


class KillEngineAfterStep(TrainerCallback):
    """Kills an engine at the end of `step`: it is sampling the next batch (or, async, a later one)."""

    def __init__(self, trainer, name: str, step: int, sig: int = signal.SIGKILL):
        self.trainer, self.name, self.step, self.sig, self.killed = trainer, name, step, sig, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.killed.append(kill_engine(self.trainer, self.name, self.sig))


def kill_engine_while_learning(trainer, name: str, step: int) -> list[int]:
    """Kills an engine while the learner trains `step`: with async_steps=0 it has nothing to
    sample then, so its death shows only when the next weight push needs it."""
    killed, learn = [], trainer.learner.step

    def learning(batch, beta):
        if len(killed) == 0 and trainer.state.global_step == step:
            killed.append(kill_engine(trainer, name))
        return learn(batch, beta)

    trainer.learner.step = learning
    return killed


def kill_engine_with_batch_in_flight(trainer, name: str, step: int) -> list[int]:
    """Kills an engine right after the batch of `step` is submitted to it: with async_steps >= 1
    the learners then take a step while that batch is lost, and its replacement must still sample
    it with the version it was scheduled for."""
    killed, submit, submitted = [], trainer.generator.submit, []

    def submitting(*args, **kwargs):
        handle = submit(*args, **kwargs)
        submitted.append(1)
        if len(submitted) == step + 1 and not killed:
            killed.append(kill_engine(trainer, name))
        return handle

    trainer.generator.submit = submitting
    return killed


def kill_engine_at(trainer, name: str, moment: str, push: int, sig: int = signal.SIGKILL) -> list[int]:
    """Kills engine `name` at a moment of the weight publisher's work: right before the `push`-th
    weight push reaches the ranks ("push": the transport to it is open, the send not begun) or
    its probe ("probe": the weights arrived), or ("replacement sync") the replacement of an
    engine killed while sampling after step `push`, right before its own sync."""
    killed, publisher = [], trainer.roles.publisher
    if moment == "replacement sync":
        callback = KillEngineAfterStep(trainer, name, step=push, sig=sig)
        callback.killed = killed
        trainer.add_callback(callback)
    calls = {"send_weights": 0, "probe": 0}
    send, probe, sync_alone = trainer.roles.learner.call_with_timeout, publisher._probe, publisher._sync_alone

    def sending(method, *args, **kwargs):
        # a live push (args[1], the published flag, is set by a replacement's sync)
        if method == "send_weights" and not (args[1:] and args[1]):
            calls["send_weights"] += 1
            if moment == "push" and calls["send_weights"] == push and not killed:
                killed.append(kill_engine(trainer, name, sig))
        return send(method, *args, **kwargs)

    def probing(names, version, learned, *rest):
        calls["probe"] += 1
        if moment == "probe" and calls["probe"] == push and not killed:
            killed.append(kill_engine(trainer, name, sig))
        return probe(names, version, learned, *rest)

    def syncing(engine):
        if moment == "replacement sync" and len(killed) == 1:
            killed.append(kill_engine(trainer, engine, sig))
        return sync_alone(engine)

    trainer.roles.learner.call_with_timeout = sending
    publisher._probe, publisher._sync_alone = probing, syncing
    return killed


# Six steps, and a stopped engine found within 30 s
SHORT = dict(max_steps=6, ray_timeout_s=30)
CLEAN: dict = {}  # the fault-free runs by setting, shared by the tests of this module


def clean_run(model_path, tmp_path, common: dict, peft_config=None):
    """The fault-free run of the setting `common` (run once per module)."""
    key = tuple(sorted(common.items())) + (repr(peft_config),)
    if key not in CLEAN:
        CLEAN[key] = run(model_path, settings(tmp_path, "clean", **common), peft_config=peft_config)
    return CLEAN[key]


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def run(model_path, args, fault=None, reward_funcs=toy.sentiment_reward, peft_config=None):
    """Train; the final weights, the logged rows, the pids of the killed engines and the engines' pids
    at the end. Checks that a replaced engine's folder went when it was replaced, and the folder of
    the run's engines when they were closed."""
    import ray

    with OnlineDPOTrainer(model=model_path, reward_funcs=reward_funcs, args=args,
                          train_dataset=toy.prompt_dataset(24), peft_config=peft_config) as trainer:
        killed = fault(trainer) if fault is not None else []
        trainer.train()
        weights = saved_weights(trainer, args.output_dir)
        pool = trainer.roles.engine_pool
        pids = {name: ray.get(engine.pid.remote()) for name, engine in pool.engines.items()}
        assert sorted(os.listdir(pool.files_root)) == [f"{name}.{pool.incarnation(name)}" for name in pool.names]
    assert not os.path.exists(pool.files_root)  # the killed engines' folders included
    rows = [r for r in trainer.state.log_history if "loss" in r]
    return weights, rows, killed, pids


@pytest.mark.vllm
@pytest.mark.parametrize("engines,async_steps,when,lora_sync",
                         [(1, 0, "sampling", None), (2, 0, "idle", None), (2, 1, "in flight", None),
                          (2, 1, "in flight", "adapter")],
                         ids=["1-engine-sync", "2-engines-sync-idle", "2-engines-async-in-flight-between-pushes",
                              "lora-adapter-2-engines-async-in-flight"])
def test_killed_engine_is_replaced_and_the_run_ends_as_without_the_fault(ray_cluster, model_path, tmp_path, engines,
                                                                          async_steps, when, lora_sync):
    """The async case also pushes every 2 steps only (weight_sync_steps=2): the batch of step 5 is
    scheduled for version 2, and the learners take steps 3 and 4 before it is sampled again, so the
    replacement must serve the published version, not the learners' newest. With a LoRA policy
    and lora_sync='adapter', that replacement gets the base weights and the published adapter."""
    # the fault-free run of each setting is shared with the other tests of this module (`CLEAN`)
    common = {**SHORT, **({} if engines == 1 else dict(ray_num_engines=engines)),
              **({} if async_steps == 0 else dict(async_steps=async_steps, weight_sync_steps=2)),
              **({} if lora_sync is None else dict(lora_sync=lora_sync))}
    peft_config = lora() if lora_sync else None
    expected, clean_rows, _, _ = clean_run(model_path, tmp_path, common, peft_config)
    victim = f"vllm-engine-{engines - 1}"

    def fault(trainer):
        if when == "idle":
            return kill_engine_while_learning(trainer, victim, step=3)
        if when == "in flight":
            return kill_engine_with_batch_in_flight(trainer, victim, step=4)
        callback = KillEngineAfterStep(trainer, victim, step=3)
        trainer.add_callback(callback)
        return callback.killed

    weights, rows, killed, pids = run(model_path, settings(tmp_path, "faulty", **common), fault,
                                      peft_config=peft_config)

    assert len(killed) == 1 and pids[victim] != killed[0]  # a new process serves in its place
    assert [r["step"] for r in rows] == list(range(1, SHORT["max_steps"] + 1))
    assert "faults/engine_restarts" not in rows[2] and rows[-1]["faults/engine_restarts"] == 1
    assert rows[-1]["faults/seconds_lost"] > 0
    assert max(r["sync/logprob_gap"] for r in rows if "sync/logprob_gap" in r) < 1e-4
    assert [r["async/staleness"] for r in rows] == [r["async/staleness"] for r in clean_rows]
    if when == "in flight":  # the staleness of weight_sync_steps=2 with async_steps=1
        assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 2.0, 1.0, 2.0, 1.0]
    if lora_sync:  # every push carried the adapter alone (the replacement got the base in its own sync)
        assert {r["sync/bytes"] for r in rows if "sync/bytes" in r} == {
            float(sum(t.numel() * t.element_size() for t in weights.values()))}
    for key in ("loss", "objective/scores"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in clean_rows], abs=1e-6), key
    assert max((weights[n] - expected[n]).abs().max().item() for n in expected) <= 1e-6


def assert_as_without_the_fault(rows, weights, clean_rows, expected):
    assert [r["step"] for r in rows] == [r["step"] for r in clean_rows]
    assert max(r["sync/logprob_gap"] for r in rows) < 1e-4
    for key in ("loss", "objective/scores"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in clean_rows], abs=1e-6), key
    assert max((weights[n] - expected[n]).abs().max().item() for n in expected) <= 1e-6




@pytest.mark.vllm
@pytest.mark.parametrize("moment,sig", [("push", signal.SIGKILL), ("push", signal.SIGSTOP), ("probe", signal.SIGKILL),
                                        ("replacement sync", signal.SIGKILL)],
                         ids=["killed-during-push", "stopped-during-push", "killed-during-probe",
                              "killed-during-its-own-replacement-sync"])
def test_engine_lost_inside_the_publishers_work_is_replaced(ray_cluster, model_path, tmp_path, moment, sig):
    """A fault does not choose its moment: an engine killed (or stopped: alive, silent) during a
    weight push, during the sync probe, or a replacement killed during its own sync, is replaced
    within its restart budget and the run ends with the weights of a run without the fault."""
    common = SHORT  # one clean run for every case, and the single-engine case above
    expected, clean_rows, _, _ = clean_run(model_path, tmp_path, common)
    weights, rows, killed, pids = run(model_path, settings(tmp_path, "faulty", **common),
                                      lambda trainer: kill_engine_at(trainer, "vllm-engine-0", moment, push=3, sig=sig))
    assert len(killed) == (2 if moment == "replacement sync" else 1)
    assert pids["vllm-engine-0"] not in killed
    assert rows[-1]["faults/engine_restarts"] == len(killed)
    assert_as_without_the_fault(rows, weights, clean_rows, expected)


@pytest.mark.vllm
def test_engine_stopped_during_a_push_past_its_budget_is_named(ray_cluster, model_path, tmp_path):
    """The error for a hung push names the engine (rank 0 waits for it less long than the driver
    waits for rank 0, and the publisher's ping tells which engine stopped answering)."""
    args = settings(tmp_path, "budget-push", ray_max_engine_restarts=0, max_steps=4, ray_timeout_s=30)
    with pytest.raises(RuntimeError, match=r"vllm-engine-0 did not answer ping\(\) within 30s during the weight push: "
                                           r"it failed 1 times, more than ray_max_engine_restarts=0"):
        run(model_path, args, lambda trainer: kill_engine_at(trainer, "vllm-engine-0", "push", 2, signal.SIGSTOP))
    assert ray_cluster.util.list_named_actors() == []


@pytest.mark.vllm
def test_killed_reward_worker_is_replaced_and_its_rows_scored_again(ray_cluster, model_path, reward_model_path,
                                                                     tmp_path):
    """A reward worker holds no state: SIGKILLed after step 2 (between two scorings), the next
    scoring finds it dead, a replacement loads the reward model and scores those rows again."""
    import ray

    common = dict(max_steps=5, reward_model_path=str(reward_model_path))
    expected, clean_rows, _, _ = run(model_path, settings(tmp_path, "clean", **common), reward_funcs=None)
    killed = []

    class KillRewardWorker(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and not killed:
                worker = self.trainer.roles.rewards.workers[0]
                killed.append(ray.get(worker.pid.remote()))
                os.kill(killed[0], signal.SIGKILL)

    def fault(trainer):
        trainer.add_callback(KillRewardWorker(trainer))
        return killed

    weights, rows, _, _ = run(model_path, settings(tmp_path, "faulty", **common), fault, reward_funcs=None)
    assert len(killed) == 1
    assert "faults/reward_worker_restarts" not in rows[1] and rows[-1]["faults/reward_worker_restarts"] == 1
    assert_as_without_the_fault(rows, weights, clean_rows, expected)


@pytest.mark.vllm
def test_stuck_engine_past_its_restart_budget_stops_the_run_naming_it(ray_cluster, model_path, tmp_path):
    """SIGSTOP: the engine's process is alive but answers nothing; after ray_timeout_s (its batch
    or the liveness check before the next push) it counts as failed. With no restarts allowed the
    run stops, naming the engine, and closes its roles."""
    def fault(trainer):
        trainer.add_callback(KillEngineAfterStep(trainer, "vllm-engine-0", step=2, sig=signal.SIGSTOP))

    args = settings(tmp_path, "budget", ray_max_engine_restarts=0, max_steps=6, ray_timeout_s=30)
    with pytest.raises(RuntimeError, match=r"vllm-engine-0 did not answer (generate|ping)\(\) within 30s: it failed 1 "
                                           r"times, more than ray_max_engine_restarts=0"):
        run(model_path, args, fault)
    assert ray_cluster.util.list_named_actors() == []  # the stopped engine was killed with the rest


def test_dead_rank_is_named_while_the_others_wait_for_it(ray_cluster):
    """Two ranks in a step: rank 0 blocks (as in a collective waiting for its peer) and rank 1's
    process is SIGKILLed; the group reports rank 1 by name at once, not rank 0 after the timeout."""
    import time

    from odpo_vllm.learning.group import LearnerGroup

    @ray_cluster.remote(num_cpus=0.1)
    class Rank:
        def pid(self):
            return os.getpid()

        def step(self):
            time.sleep(300)

    ranks = [Rank.remote(), Rank.remote()]
    group = LearnerGroup.__new__(LearnerGroup)  # only the waiting logic, no DeepSpeed
    group.ray, group.timeout_s, group.names, group.workers = ray_cluster, 120, ["learner-rank0", "learner-rank1"], []
    pids = ray_cluster.get([rank.pid.remote() for rank in ranks])  # (before the steps: calls run in order)
    refs = [rank.step.remote() for rank in ranks]
    os.kill(pids[1], signal.SIGKILL)
    start = time.time()
    with pytest.raises(RuntimeError, match=r"learner group: learner-rank1 died during step\(\)"):
        group._gather(refs, "step")
    assert time.time() - start < 30
    for rank in ranks:
        ray_cluster.kill(rank)
