"""The LoRA adapters one vLLM engine serves (`lora_sync='adapter'`): one per published version.

Each version's adapter gets a folder under the engine's own files (removed with the engine) and a
LoRA name and integer id that this engine never used before: vLLM caches prefixes per adapter, so
a new id per version keeps KV computed by an older adapter from being served. Loading happens at
the push (a bad adapter fails the push, naming the engine, not a later sample); versions no longer
sampled are unloaded and their folders removed.

An engine in a Ray actor receives the adapter over the run's weight transport: `receive_adapter`
points the engine's worker-side transfer engine (any backend: odpo_gloo, NCCL, CUDA IPC) at an
`AdapterCollector` instead of the model for that one update, so the tensors arrive by the same
wire as whole weights and land in host memory, never in the base weights.
"""

from __future__ import annotations

import os
import shutil

from odpo_vllm.weights.adapter import AdapterWeights, write_adapter


class AdapterCollector:
    """Stands in for the model as the target of one weight update: keeps what arrives (copies in
    host memory: the transfer's buffers are reused for the next bucket)."""

    def __init__(self):
        self.tensors: dict = {}

    def load_weights(self, weights) -> set[str]:
        for name, tensor in weights:
            self.tensors[name] = tensor.detach().to("cpu", copy=True)
        return set(self.tensors)


def receive_adapter(worker, update_info: dict, collector: AdapterCollector) -> None:
    """Run in the engine's worker (`collective_rpc`): one update of the open weight transport
    received into `collector`, the model untouched."""
    transfer = getattr(getattr(worker, "worker", worker), "weight_transfer_engine", None)
    if transfer is None:
        raise RuntimeError("an adapter push before init_weight_transfer_engine")
    transfer.set_weight_update_target(collector, transfer.model_config)
    try:
        transfer.update_weights(update_info)
    finally:
        transfer.reset_weight_update_target()


class EngineAdapters:
    def __init__(self, llm, folder: str, engine: str):
        self.llm, self.folder, self.engine = llm, folder, engine
        self.loaded = 0  # adapters loaded so far: the next one's id (vLLM ids start at 1)
        self.current = None  # the LoRARequest every sample and probe uses

    def load(self, adapter: AdapterWeights) -> int:
        """Serve `adapter` from now on; returns the bytes it took."""
        from vllm.lora.request import LoRARequest

        self.loaded += 1
        path = os.path.join(self.folder, f"adapter-{self.loaded}")
        nbytes = write_adapter(path, adapter)
        request = LoRARequest(f"policy-{self.loaded}", self.loaded, path)
        try:
            self.llm.llm_engine.add_lora(request)
        except Exception as err:
            shutil.rmtree(path, ignore_errors=True)
            raise RuntimeError(f"{self.engine}: vLLM could not load the policy's LoRA adapter ({err}); "
                               "use lora_sync='merged' to send the merged weights instead") from err
        previous, self.current = self.current, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return nbytes

    def served_ids(self) -> set[int]:
        return set(self.llm.llm_engine.list_loras())
