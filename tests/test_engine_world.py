"""vLLM's process groups beside another torch.distributed user in one process: an in-process engine
starts after a DeepSpeed rank's process group came and went, whether the engine before it closed
or failed part-way through starting. Its own module: no other engine may be alive meanwhile."""

from __future__ import annotations

import pytest
import torch

from odpo_vllm.learning.learner import Learner
from odpo_vllm.sampling.vllm_engine import VLLMGenerator
from odpo_vllm.runtime.publisher import LocalWeightPublisher

from conftest import free_port, make_args

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


def start_engine(model_path, tmp_path, kv_cache_bytes: int | None = None) -> VLLMGenerator:
    """An engine with the policy's weights loaded (through the publisher, as in a run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    policy = AutoModelForCausalLM.from_pretrained(model_path)
    args = make_args(tmp_path, use_vllm=True)
    args.vllm_kv_cache_memory_bytes = kv_cache_bytes  # past the config's check: a size vLLM refuses
    engine = VLLMGenerator(policy, tokenizer, args, {tokenizer.eos_token_id}, max_model_len=64, max_sequences=4)
    learner = Learner(policy, None, args, tokenizer.pad_token_id, num_training_steps=1)
    LocalWeightPublisher(engine, learner, [1, 2, 3], None).publish(0)
    return engine


def samples(engine: VLLMGenerator) -> list:
    return engine.generate([[1, 2, 3]], num_samples=2, seed=0).completion_ids


def one_rank_group(monkeypatch) -> None:
    """A default process group as a single DeepSpeed rank on gloo makes one."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def test_engine_starts_after_a_learner_group_came_and_went(model_path, tmp_path, monkeypatch):
    """An engine closed, then a DeepSpeed rank made and destroyed the default group: the next engine
    starts and samples as the first did (a closed engine leaves no process group behind)."""
    assert not torch.distributed.is_initialized(), "an earlier test left a process group behind"
    first = start_engine(model_path, tmp_path / "first")
    assert torch.distributed.is_initialized()  # vLLM made the default group for its engine
    before = samples(first)
    first.close()
    assert not torch.distributed.is_initialized()  # the last engine took vLLM's groups with it

    one_rank_group(monkeypatch)
    torch.distributed.destroy_process_group()

    second = start_engine(model_path, tmp_path / "second")
    try:
        assert samples(second) == before  # same weights, same seed: the same engine again
    finally:
        second.close()
    assert not torch.distributed.is_initialized()


def test_engine_starts_after_a_failed_start_and_a_learner_group(model_path, tmp_path, monkeypatch):
    """The CI failure of stop 23: an engine that failed once its process groups existed (here a KV
    cache too small for one sequence; there a custom-code model vLLM could not build) left them in
    vLLM's globals, a DeepSpeed rank then made and destroyed the default group, and every later
    engine failed to start ("... not initialized in the world group map")."""
    with pytest.raises(RuntimeError, match="vllm_kv_cache_memory_bytes"):
        start_engine(model_path, tmp_path / "failed", kv_cache_bytes=1 << 10)
    assert not torch.distributed.is_initialized()

    one_rank_group(monkeypatch)
    torch.distributed.destroy_process_group()

    engine = start_engine(model_path, tmp_path / "second")
    try:
        assert len(samples(engine)) == 2
    finally:
        engine.close()
