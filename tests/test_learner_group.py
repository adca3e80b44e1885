"""DeepSpeed learner ranks on Ray (real DeepSpeed on gloo, real Ray): data-parallel ZeRO-2 and
ZeRO-3 steps with shared-prompt rows equal one process training on the whole batch with separate
sequences, and the ranks stay identical; both ranks read the driver's shared-storage marker, and
a save writes the files `checkpoint_files` lists for each stage (what each save is checked for)."""

from __future__ import annotations

import time

import pytest
import torch

from odpo_vllm.core.batches import PairBatch
from odpo_vllm.learning.deepspeed_rank import checkpoint_files
from odpo_vllm.learning.learner import Learner
from odpo_vllm.learning.group import LearnerGroup, shard

from conftest import make_args, model_logprobs, rank_logprobs, saved_weights

pytestmark = pytest.mark.timeout(900)


def test_shard_is_contiguous_and_even():
    batch = PairBatch([[i] for i in range(7)], [[1]] * 7, [[2]] * 7)
    parts = shard(batch, 3)
    assert [len(p) for p in parts] == [3, 2, 2]
    assert [p.prompt_ids for p in parts] == [[[0], [1], [2]], [[3], [4]], [[5], [6]]]


def pairs(tokenizer) -> PairBatch:
    generator = torch.Generator().manual_seed(0)
    prompts = [tokenizer(f"Review the {s}:")["input_ids"] for s in ("film", "book", "song", "show")]
    completion = lambda n: torch.randint(5, 300, (n,), generator=generator).tolist()  # noqa: E731
    return PairBatch(prompts, [completion(6 + i) for i in range(4)], [completion(9 - i) for i in range(4)])


@pytest.mark.ray
def test_a_group_that_fails_to_start_leaves_no_rank_behind(ray_cluster, tmp_path):
    """A rank that cannot load its policy fails the group's start; the ranks and their reserved
    bundles are gone afterwards (the placement that built it never got a handle to close)."""
    args = make_args(tmp_path)
    with pytest.raises(RuntimeError, match=r"doomed-rank. died during start\(\)"):
        LearnerGroup(str(tmp_path / "no-such-model"), args, 0, num_training_steps=1, num_ranks=2, cpus_per_rank=0.5,
                     timeout_s=120, name="doomed")
    assert ray_cluster.util.list_named_actors() == []
    deadline = time.monotonic() + 30  # Ray returns a removed bundle's CPUs a moment later
    while ray_cluster.available_resources().get("CPU") != ray_cluster.cluster_resources().get("CPU"):
        assert time.monotonic() < deadline, ray_cluster.available_resources()
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_data_parallel_step_matches_single_process(ray_cluster, model_path, tokenizer, probe_ids, tmp_path,
                                                   zero_stage):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # SGD: Adam's first step divides by |g| and would magnify float noise between the two runs
    args = make_args(tmp_path, optim="sgd", learning_rate=0.5, per_device_train_batch_size=1,
                     gradient_accumulation_steps=2, gradient_checkpointing=False)
    batch = pairs(tokenizer)
    group = LearnerGroup(model_path, args, tokenizer.pad_token_id, num_training_steps=4, num_ranks=2,
                         zero_stage=zero_stage, cpus_per_rank=1, timeout_s=300, name=f"zero{zero_stage}")
    try:
        metrics = group.step(batch, beta=0.1)
        served = rank_logprobs(group, probe_ids, ranks=2)  # both ranks hold the same weights
        trained = saved_weights(group, tmp_path)
        group.check_shared_storage(str(tmp_path / "out"))  # one machine: every rank reads the driver's file
        group.save(str(tmp_path / "checkpoint"))
    finally:
        group.close()
    assert set(group.nodes) == {f"zero{zero_stage}-rank0", f"zero{zero_stage}-rank1"}
    assert not list((tmp_path / "out").iterdir())  # the marker removed
    states = {str(path.relative_to(tmp_path / "checkpoint")) for path in (tmp_path / "checkpoint").rglob("*_states.pt")}
    assert states == set(checkpoint_files(2, zero_stage, bf16=False))

    policy = AutoModelForCausalLM.from_pretrained(model_path)
    reference = AutoModelForCausalLM.from_pretrained(model_path).eval().requires_grad_(False)
    # the ranks run shared-prompt rows (the default); the single process runs separate sequences
    single_args = make_args(tmp_path, optim="sgd", learning_rate=0.5, per_device_train_batch_size=2,
                            gradient_accumulation_steps=2, gradient_checkpointing=False, shared_prompt_passes=False)
    single = Learner(policy, reference, single_args, tokenizer.pad_token_id, num_training_steps=4)
    expected = single.step(batch, beta=0.1)

    assert metrics["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(expected["logps/chosen"], abs=1e-4)
    assert metrics["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    # the saved policy (ZeRO-3: gathered) has the weights one process gets stepping on the whole batch,
    # under the same names
    policy.save_pretrained(tmp_path / "single")
    single_weights = load_file(tmp_path / "single" / "model.safetensors")
    assert set(trained) == set(single_weights)
    assert max((trained[n] - t).abs().max().item() for n, t in single_weights.items()) < 1e-5
    initial = AutoModelForCausalLM.from_pretrained(model_path).state_dict()
    assert max((trained[n] - initial[n]).abs().max().item() for n in trained) > 1e-4  # the step moved them
    # and the ranks serve what one process serves
    assert (served - model_logprobs(policy, probe_ids)).abs().max().item() < 1e-4


@pytest.mark.ray
@pytest.mark.vllm
def test_publisher_pushes_zero3_buckets_and_replaces_an_engine_with_the_published_version(ray_cluster, model_path,
                                                                                          tokenizer, tmp_path):
    """Learner ranks (ZeRO-3) -> two vLLM engine actors over odpo_gloo in size-capped buckets,
    driven by the weight publisher: both serve the trained weights. After one more learner step
    (not published yet) engine-1 is replaced: the new engine gets the *published* version, which
    rank 0 kept (keep_published), not the live weights; the next push reaches both engines
    (transport reopened on a fresh port). Past ray_max_engine_restarts the replacement is refused."""
    from transformers import AutoConfig

    from odpo_vllm.runtime.engine_pool import ENGINE_CONCURRENCY, EnginePool
    from odpo_vllm.runtime.publisher import RayWeightPublisher
    from odpo_vllm.sampling.vllm_engine import VLLMGenerator

    ray = ray_cluster
    args = make_args(tmp_path, optim="sgd", learning_rate=0.5, per_device_train_batch_size=1,
                     gradient_accumulation_steps=2, gradient_checkpointing=False, use_vllm=True)
    probe = tokenizer("Review the film: it was")["input_ids"] * 2
    Engine = ray.remote(num_cpus=0.25, **ENGINE_CONCURRENCY)(VLLMGenerator)

    def start_engine(name, index, attempt, files_dir):
        return Engine.options(name=f"{name}-{attempt}").remote(
            AutoConfig.from_pretrained(model_path), tokenizer, args, {tokenizer.eos_token_id}, 64,
            probe_ids=probe, name=name, weight_transfer_backend="odpo_gloo", engine_index=index,
            files_dir=files_dir)

    pool = EnginePool(start_engine, 2, timeout_s=300, max_restarts=1)
    engines = pool.engines
    group = LearnerGroup(model_path, args, tokenizer.pad_token_id, num_training_steps=4, num_ranks=2,
                         zero_stage=3, cpus_per_rank=0.5, timeout_s=300, name="pusher", keep_published=True,
                         bucket_bytes=64 << 10)
    publisher = RayWeightPublisher(group, pool, "odpo_gloo", probe, None, torch.float32, timeout_s=300)

    def gaps(learned):
        served = ray.get([h.sequence_logprobs.remote(probe) for h in engines.values()], timeout=300)
        return [(s - learned).abs().max().item() for s in served]

    def versions():
        return ray.get([h.ping.remote() for h in engines.values()])

    try:
        group.step(pairs(tokenizer), beta=0.1)
        stats = publisher.publish(1)
        published = group.sequence_logprobs(probe)
        first_gaps, first_versions = gaps(published), versions()
        group.step(pairs(tokenizer), beta=0.1)  # the learners move on; version 1 is still served
        old = engines["vllm-engine-1"]
        pool.replace("vllm-engine-1", "was replaced by the test")
        stale = set(pool.stale)
        publisher.sync_replacement("vllm-engine-1")
        replaced = engines["vllm-engine-1"]
        replaced_gaps, replaced_versions = gaps(published), versions()
        live_gap = gaps(group.sequence_logprobs(probe))[1]
        pushed = publisher.publish(2)
        pushed_gaps, pushed_versions = gaps(group.sequence_logprobs(probe)), versions()
        with pytest.raises(RuntimeError, match="vllm-engine-1 stuck: it failed 2 times, more than "
                                               "ray_max_engine_restarts=1"):
            pool.replace("vllm-engine-1", "stuck")
    finally:
        publisher.close()
        group.close()
        pool.close()
    assert stats["sync/bytes"] > 64 << 10  # more than one bucket
    assert stats["sync/logprob_gap"] < 1e-4 and max(first_gaps) < 1e-4 and first_versions == [1, 1]
    assert replaced is not old and replaced_versions == [1, 1]
    assert stale == {"vllm-engine-1"} and not pool.stale  # it served nothing until the publisher synced it
    assert max(replaced_gaps) < 1e-4 and live_gap > 1e-3  # the published version, not the live weights
    assert pool.faults["faults/engine_restarts"] == 1 and pool.faults["faults/seconds_lost"] > 0
    assert pushed["sync/logprob_gap"] < 1e-4 and max(pushed_gaps) < 1e-4 and pushed_versions == [2, 2]
