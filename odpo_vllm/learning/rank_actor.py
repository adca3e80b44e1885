"""One learner rank as a Ray actor: a `DeepSpeedRank` and its side of the weight push.

The driver-side `LearnerGroup` (`group.py`) starts N of these in a placement group and calls them
together (a ZeRO-3 gather or a DeepSpeed step is a collective of every rank).
"""

from __future__ import annotations

import os

import torch

from odpo_vllm.core.batches import PairBatch
from odpo_vllm.primitives import shared_storage


class RankActor:
    """Loads the policy and reference with the in-process loader (`models.prepare_policy_and_reference`:
    LoRA, model_init_kwargs, trust_remote_code), trains with `DeepSpeedRank`, and sends its
    weights when the weight publisher asks. `keep_published` and `bucket_bytes` are the publisher's
    scheduling facts for this rank's weight source (see `RankWeightSource`)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 args, pad_token_id: int, num_training_steps: int, zero_stage: int, threads: int = 1,
                 peft_config=None, keep_published: bool = False, bucket_bytes: int = 256 << 20):
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size),
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        torch.set_num_threads(threads)  # oversubscribed ranks ran 10x slower on 2 cores
        torch.manual_seed(args.seed)
        from odpo_vllm.learning.deepspeed_rank import DeepSpeedRank
        from odpo_vllm.learning.models import prepare_policy_and_reference
        from odpo_vllm.learning.weight_source import RankWeightSource

        policy, reference = prepare_policy_and_reference(model_path, None, peft_config, args)
        self.learner = DeepSpeedRank(policy, reference, args, pad_token_id, num_training_steps, zero_stage)
        # one source for every transport this rank opens: it holds the published copy
        self.weights = RankWeightSource(self.learner, bucket_bytes, keep_published)
        self.sender = None

    def step(self, batch: PairBatch, beta: float) -> dict[str, float]:
        return self.learner.step(batch, beta)

    def evaluate(self, batch: PairBatch, beta: float) -> dict[str, float]:
        return self.learner.evaluate(batch, beta)

    def sequence_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        return self.learner.sequence_logprobs(token_ids)

    def refresh_reference(self, alpha: float) -> None:
        self.learner.refresh_reference(alpha)

    def gathered_weights(self) -> dict[str, torch.Tensor] | None:
        """The policy's weights under `named_weights`' names (LoRA merged), on rank 0; None on the
        others, which iterate too (ZeRO-3 gathers are collectives). For a sampler in the driver."""
        weights = {name: tensor.cpu() for name, tensor in self.learner.named_weights()}
        return weights if self.learner.rank == 0 else None

    # ---- the weight publisher's calls: every rank together (ZeRO-3 gathers are collectives)
    def open_weight_transport(self, engines: list, wire: dict) -> None:
        """A transport to `engines` (actor handles) over `wire` (backend, address, port, world
        size, timeout, the engines' names for errors)."""
        from odpo_vllm.learning.weight_source import WeightSender

        self.close_weight_transport()
        self.sender = WeightSender(self.learner, engines, wire, self.weights)

    def send_weights(self, published: bool = False, kind: str = "weights") -> dict[str, float]:
        """The live weights to the engines of the open transport, or (`published`) the version
        sent last by a live send (kept only with `keep_published`). `kind`: "weights" (LoRA
        merged in), "base" or "adapter" (`lora_sync='adapter'`: the base once, then adapters)."""
        if self.sender is None:
            raise RuntimeError(f"rank {self.learner.rank}: send_weights before open_weight_transport")
        return self.sender.send(published=published, kind=kind)

    def lora_adapter(self) -> dict | None:
        """The policy's LoRA adapter, None without one: its `adapter_config.json` (what an engine
        needs to serve it) and why vLLM could not serve it (`refusal`, None if it can)."""
        from odpo_vllm.weights.adapter import adapter_config, adapter_refusal

        module = self.learner.model_engine.module
        if not hasattr(module, "peft_config"):
            return None
        refusal = adapter_refusal(module)
        return {"config": None if refusal else adapter_config(module), "refusal": refusal}

    def close_weight_transport(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    def pid(self) -> int:
        return os.getpid()

    def sees_file(self, path: str, token: str) -> tuple[bool, str]:
        """Whether this rank reads `token` in `path` (the driver's shared-storage marker), and its node."""
        return shared_storage.sees_marker_here(path, token)

    def save_pretrained(self, directory: str) -> None:
        """The policy as a `from_pretrained` folder (a LoRA policy: its adapter, as in process);
        a collective under ZeRO-3: every rank joins."""
        module, learner = self.learner.model_engine.module, self.learner
        if hasattr(module, "peft_config"):
            from odpo_vllm.learning.deepspeed_rank import import_deepspeed

            with import_deepspeed().zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                                            enabled=learner.zero_stage == 3):
                if learner.rank == 0:
                    module.save_pretrained(directory)
            return
        weights = dict(learner.named_weights())
        if learner.rank == 0:
            module.save_pretrained(directory, state_dict=weights)

    def save(self, directory: str) -> None:
        self.learner.save(directory)

    def load(self, directory: str) -> None:
        self.learner.load(directory)
