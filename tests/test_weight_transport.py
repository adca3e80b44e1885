"""Weight transport across processes: a vLLM engine in a Ray actor receives the learner's weights
over our `odpo_gloo` backend (vLLM's weight-transfer API, packed size-capped buckets)."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from odpo_vllm.runtime.placement import resolve_weight_transport
from odpo_vllm.weights.wire import pack, plan_buckets, unpack
from odpo_vllm.weights.names import LearnerWeights, TensorMeta

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("on_gpu, colocated, expected", [
    (False, False, "odpo_gloo"), (False, True, "odpo_gloo"), (True, False, "nccl"), (True, True, "ipc")])
def test_auto_transport_follows_device_and_placement(on_gpu, colocated, expected):
    assert resolve_weight_transport("auto", on_gpu, colocated) == expected
    assert resolve_weight_transport("odpo_gloo", on_gpu, colocated) == "odpo_gloo"  # a fallback anywhere


def test_gpu_transports_refused_where_they_cannot_work():
    with pytest.raises(ValueError, match="weight_transport: 'nccl' needs CUDA GPUs"):
        resolve_weight_transport("nccl", on_gpu=False, colocated=False)
    with pytest.raises(ValueError, match="weight_transport: 'ipc' .* placement='colocated'"):
        resolve_weight_transport("ipc", on_gpu=True, colocated=False)
    assert resolve_weight_transport("ipc", on_gpu=True, colocated=True) == "ipc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- pure parts
def test_plan_buckets_caps_size_and_keeps_order():
    sizes = [40, 30, 50, 100, 10, 10, 90]
    buckets = plan_buckets(sizes, cap_bytes=80)
    assert buckets == [[0, 1], [2], [3], [4, 5], [6]]
    assert [i for b in buckets for i in b] == list(range(len(sizes)))
    for bucket in buckets:  # only a single oversized tensor may exceed the cap
        assert sum(sizes[i] for i in bucket) <= 80 or len(bucket) == 1
    assert plan_buckets([], 10) == []


def test_pack_unpack_roundtrip_mixed_dtypes():
    tensors = [torch.randn(3, 4), torch.arange(5, dtype=torch.int64), torch.randn(2).to(torch.bfloat16)]
    metas = [TensorMeta(f"t{i}", t.dtype, tuple(t.shape)) for i, t in enumerate(tensors)]
    buffer = pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.numel() == sum(m.nbytes for m in metas)
    for (name, got), want in zip(unpack(buffer, metas), tensors):
        assert torch.equal(got, want)


def test_learner_weights_cover_tied_head_and_merge_lora(model):
    names = [name for name, _ in LearnerWeights(model)]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    merged = dict(LearnerWeights(peft_model))
    assert set(merged) == set(names)  # adapter names mapped back to base names
    base = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    lora_delta = base.lora_B["default"].weight @ base.lora_A["default"].weight * base.scaling["default"]
    expected = base.base_layer.weight + lora_delta
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    # the merge is out of place: the base weight (the reference) holds no delta
    assert not torch.allclose(base.base_layer.weight, expected)


def test_rendezvous_timeout_names_the_engine():
    """An engine that never joins fails the learner within the timeout, naming the engine."""
    from odpo_vllm.weights.vllm_backend import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine

    class SilentEngine:  # accepts the init call but never opens its end of the group
        def init_weight_transfer_engine(self, info):
            return None

    info = GlooTrainerInitInfo(master_port=free_port(), world_size=2, timeout_s=3, engine_name="engine-7", rank=0)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="engine-7"):
        GlooTrainerWeightTransferEngine.trainer_init(info, client=SilentEngine(), source=[])
    assert time.monotonic() - start < 30


class RecordingModel(torch.nn.Module):
    """Stands in for the vLLM model on the worker side: keeps what each `load_weights` call got."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def load_weights(self, weights):
        self.calls.append([(name, tensor.clone()) for name, tensor in weights])


class InProcessEngine:
    """The calls vLLM's weight-sync client makes on an engine, answered by the `odpo_gloo` worker
    side in this process (no vLLM engine): the two sides meet over a real gloo group."""

    def __init__(self):
        from types import SimpleNamespace

        from odpo_vllm.weights.vllm_backend import GlooWeightTransferEngine

        self.model = RecordingModel()
        vllm_config = SimpleNamespace(parallel_config=None, model_config=None)
        self.worker = GlooWeightTransferEngine(None, vllm_config, torch.device("cpu"), self.model)

    def init_weight_transfer_engine(self, info):
        from odpo_vllm.weights.vllm_backend import GlooWorkerInitInfo

        self.worker.init_transfer_engine(GlooWorkerInitInfo(**info))

    def start_weight_update(self):
        self.model.calls = []

    def update_weights(self, update):
        self.worker.update_weights(update)

    def finish_weight_update(self):
        pass


def test_gloo_delivers_every_tensor_exactly_bucket_by_bucket(model):
    """Every tensor the learner sends arrives under its name with its dtype, shape and bytes, one
    `load_weights` per size-capped bucket; a second send over the same group delivers the new values."""
    from odpo_vllm.weights.vllm_backend import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine

    source, engine, bucket_bytes = LearnerWeights(model), InProcessEngine(), 64 << 10
    buckets = plan_buckets([m.nbytes for m in source.tensor_meta()], bucket_bytes)
    assert len(buckets) > 3  # small buckets, so the tiny model goes in several
    info = GlooTrainerInitInfo(master_port=free_port(), world_size=2, bucket_bytes=bucket_bytes, timeout_s=60,
                               engine_name="in-process", rank=0)
    sender = GlooTrainerWeightTransferEngine.trainer_init(info, client=engine, source=source)
    for round_ in range(2):
        if round_:
            with torch.no_grad():
                model.model.norm.weight.mul_(1.5)
        sender.send_weights()
        sent = list(LearnerWeights(model))
        assert [len(call) for call in engine.model.calls] == [len(bucket) for bucket in buckets]
        received = [item for call in engine.model.calls for item in call]
        assert [name for name, _ in received] == [name for name, _ in sent]
        for (name, got), (_, want) in zip(received, sent):
            assert got.dtype == want.dtype and torch.equal(got, want), name


# ---------------------------------------------------------------------------------- across processes

@pytest.mark.ray
@pytest.mark.vllm
def test_gloo_buckets_across_processes(ray_cluster, model_path, tmp_path):
    ray = ray_cluster
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from odpo_vllm import OnlineDPOConfig
    from odpo_vllm.learning.learner import Learner
    from odpo_vllm.weights.vllm_backend import GlooTrainerInitInfo, register_gloo_backend
    from odpo_vllm.sampling.vllm_engine import VLLMGenerator

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = OnlineDPOConfig(output_dir=str(tmp_path), report_to="none", use_vllm=True)
    probe = tokenizer("Review the film: it was")["input_ids"] * 2
    Engine = ray.remote(num_cpus=1)(VLLMGenerator)
    engine = Engine.options(name="vllm-engine-0").remote(
        AutoConfig.from_pretrained(model_path), tokenizer, args, {tokenizer.eos_token_id}, 128,
        probe_ids=probe, name="vllm-engine-0", weight_transfer_backend="odpo_gloo",
    )

    # The learner (this process) holds weights the engine has never seen.
    policy = AutoModelForCausalLM.from_pretrained(model_path)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    learner = Learner(policy, None, args, tokenizer.pad_token_id, num_training_steps=1)
    source = LearnerWeights(policy)
    bucket_bytes = 64 << 10  # small, so the tiny model goes in several buckets
    assert len(plan_buckets([m.nbytes for m in source.tensor_meta()], bucket_bytes)) > 3

    register_gloo_backend()
    info = GlooTrainerInitInfo(master_port=free_port(), world_size=2, bucket_bytes=bucket_bytes, timeout_s=120,
                               engine_name="vllm-engine-0", rank=0)
    sender = WeightTransferTrainerFactory.trainer_init(info, client=RayVLLMWeightSyncClient(engine), source=source)
    sender.send_weights()

    served = ray.get(engine.sequence_logprobs.remote(probe), timeout=120)
    expected = learner.sequence_logprobs(probe)
    assert (served - expected).abs().max().item() < 1e-4
    # the engine does not count versions: it serves nothing until the publisher names the version
    with pytest.raises(ray.exceptions.RayTaskError, match="generate\\(\\) before the first weight update"):
        ray.get(engine.generate.remote([probe[:8]], 2, 0), timeout=120)
    ray.get(engine.set_policy_version.remote(7), timeout=120)
    rollouts = ray.get(engine.generate.remote([probe[:8]], 2, 0), timeout=120)
    assert rollouts.policy_version == 7

    # a second round moves new weights again (the group is reused)
    with torch.no_grad():
        policy.model.norm.weight.mul_(1.5)
    sender.send_weights()
    served = ray.get(engine.sequence_logprobs.remote(probe), timeout=120)
    assert (served - learner.sequence_logprobs(probe)).abs().max().item() < 1e-4
    ray.kill(engine)


def test_engine_failure_surfaces_at_once_naming_the_engine():
    """An engine whose init call fails does not leave the learner waiting for the full timeout."""
    from odpo_vllm.weights.vllm_backend import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine

    class BrokenEngine:
        def init_weight_transfer_engine(self, info):
            raise ConnectionError("actor died")

    info = GlooTrainerInitInfo(master_port=free_port(), world_size=2, timeout_s=60, engine_name="engine-3", rank=0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="engine-3 failed: actor died"):
        GlooTrainerWeightTransferEngine.trainer_init(info, client=BrokenEngine(), source=[])
    assert time.monotonic() - start < 20
