"""The `odpo_gloo` backend as vLLM weight-transfer engines (importing this module needs vLLM).

Same protocol as vLLM's dense NCCL backend, over gloo: update info carries names, dtypes and
shapes; both sides cut the same size-capped buckets from it; each bucket is one broadcast of a
packed uint8 buffer; the worker loads each bucket through the model's `load_weights` inside
vLLM's layerwise-reload lifecycle.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from odpo_vllm.weights.wire import (
    DEFAULT_BUCKET_BYTES,
    GLOO_BACKEND,
    GlooBroadcast,
    _metas_from_update,
    open_gloo_group,
    pack,
    plan_buckets,
    run_with_peer,
    unpack,
)
from odpo_vllm.weights.names import TensorMeta


@dataclass
class GlooWorkerInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 300.0


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = GLOO_BACKEND
    master_address: str = "127.0.0.1"
    master_port: int = 29555
    world_size: int = 2
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 300.0
    engine_name: str = "vLLM engine"


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


class GlooWeightTransferEngine(WeightTransferEngine[GlooWorkerInitInfo, GlooUpdateInfo]):
    """Worker side: receives buckets from trainer rank 0 and loads them."""

    init_info_cls = GlooWorkerInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.group, self.info = None, None

    def init_transfer_engine(self, init_info: GlooWorkerInitInfo) -> None:
        try:
            from vllm.distributed.parallel_state import get_world_group

            worker_rank = get_world_group().rank
        except Exception:
            worker_rank = 0
        self.info = init_info
        self.group = open_gloo_group(init_info.master_address, init_info.master_port,
                                     init_info.rank_offset + worker_rank, init_info.world_size,
                                     init_info.timeout_s, peer="the learner (trainer rank 0)")

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("odpo_gloo: call init_weight_transfer_engine before update_weights")
        metas = _metas_from_update(update_info.names, update_info.dtype_names, update_info.shapes)
        buckets = [[metas[i] for i in bucket] for bucket in plan_buckets([m.nbytes for m in metas],
                                                                          self.info.bucket_bytes)]

        def receive(bucket_metas):
            buffer = torch.empty(sum(m.nbytes for m in bucket_metas), dtype=torch.uint8)
            return GlooBroadcast(self.group, buffer, "the learner (trainer rank 0)", self.info.timeout_s)

        # Bucket k + 1 arrives while bucket k is loaded (at most two buffers alive).
        incoming = receive(buckets[0]) if buckets else None
        for index, bucket_metas in enumerate(buckets):
            buffer = incoming.wait()
            incoming = receive(buckets[index + 1]) if index + 1 < len(buckets) else None
            self.model.load_weights([(n, t.to(self.device)) for n, t in unpack(buffer, bucket_metas)])

    def shutdown(self) -> None:
        self.group = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side (rank 0 sends): drives the engines' update RPCs and broadcasts buckets."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender=True, info: GlooTrainerInitInfo | None = None):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.info, self.group = info, None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("odpo_gloo: the trainer engine needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, info=init_info)
        if not engine.is_sender:
            return engine
        worker_info = asdict(GlooWorkerInitInfo(
            init_info.master_address, init_info.master_port, init_info.world_size, 1,
            init_info.bucket_bytes, init_info.timeout_s,
        ))

        def open_group():
            engine.group = open_gloo_group(init_info.master_address, init_info.master_port, 0,
                                           init_info.world_size, init_info.timeout_s, peer=init_info.engine_name)

        run_with_peer(client.init_weight_transfer_engine, (worker_info,), open_group,
                      init_info.timeout_s, init_info.engine_name)
        return engine

    def send_weights(self) -> None:
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        metas = [TensorMeta(m.name, m.dtype, tuple(m.shape)) for m in self.source.metadata()]
        update = GlooUpdateInfo([m.name for m in metas], [str(m.dtype).split(".")[-1] for m in metas],
                                [list(m.shape) for m in metas])
        info = self.info

        def broadcast():
            tensors = iter(self.source)
            in_flight = None
            for bucket in plan_buckets([m.nbytes for m in metas], info.bucket_bytes):
                chunk = []
                for index in bucket:
                    name, tensor = next(tensors)
                    if name != metas[index].name:
                        raise RuntimeError(f"odpo_gloo: source yielded {name!r}, metadata said {metas[index].name!r}")
                    chunk.append(tensor.cpu())
                buffer = pack(chunk)  # packed while the previous bucket is on the wire
                if in_flight is not None:
                    in_flight.wait()
                in_flight = GlooBroadcast(self.group, buffer, info.engine_name, info.timeout_s)
            if in_flight is not None:
                in_flight.wait()

        self.client.start_weight_update()
        run_with_peer(self.client.update_weights, (asdict(update),), broadcast, info.timeout_s, info.engine_name)
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


def register_gloo_backend() -> None:
    """Register `odpo_gloo` in vLLM's worker and trainer factories (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls in ((WeightTransferEngineFactory, GlooWeightTransferEngine),
                         (WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine)):
        with contextlib.suppress(ValueError):  # already registered
            factory.register_engine(GLOO_BACKEND, cls)


def open_trainer_transport(backend: str, info: dict, *, rank: int, client, source):
    """The trainer-side engine of `backend` (odpo_gloo, vLLM's nccl or ipc), built and joined
    through vLLM's factory. `info`: master_address, master_port, world_size (1 sender + every
    engine worker), bucket_bytes, timeout_s, engine_name. Every trainer rank calls this; rank 0
    sends, the others only take part in the gathers."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from odpo_vllm.weights.wire import call_with_timeout

    if backend == GLOO_BACKEND:
        register_gloo_backend()
        init = GlooTrainerInitInfo(**info, rank=rank)
    elif backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        init = NCCLTrainerInitInfo(info["master_address"], info["master_port"], info["world_size"], rank=rank,
                                   packed=True, packed_buffer_size_bytes=info["bucket_bytes"])
    elif backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        init = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=info["bucket_bytes"])
    else:
        raise ValueError(f"weight transport: unknown backend {backend!r}")
    return call_with_timeout(lambda: WeightTransferTrainerFactory.trainer_init(init, client=client, source=source),
                             info["timeout_s"], f"{info['engine_name']} did not join the {backend} weight transfer")
