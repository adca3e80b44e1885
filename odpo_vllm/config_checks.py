"""The checks `OnlineDPOConfig` runs at construction: one named error per bad value, before any
work starts (`config.py` holds the fields and their defaults)."""

from __future__ import annotations

import math

from odpo_vllm.core.objective import LOSS_TYPES

PLACEMENTS = ("in_process", "dedicated", "colocated")
WEIGHT_TRANSPORTS = ("auto", "nccl", "ipc", "odpo_gloo")
LORA_SYNC_MODES = ("auto", "merged", "adapter")


def check_config(args) -> None:
    """Every field's value against what it allows: a ValueError naming the field and the fix."""
    def fail(name, message):
        raise ValueError(f"OnlineDPOConfig.{name}: {message}")

    if args.loss_type not in LOSS_TYPES:
        fail("loss_type", f"{args.loss_type!r} is not supported; use one of {', '.join(LOSS_TYPES)}")
    if isinstance(args.beta, float):
        if not (args.beta > 0 and math.isfinite(args.beta)):
            fail("beta", f"must be > 0, got {args.beta}")
    elif not isinstance(args.beta, list):
        fail("beta", f"must be a number or a list of numbers, got {type(args.beta).__name__}")
    elif not args.beta:
        fail("beta", "the list is empty; give at least one value, e.g. beta=0.1")
    for value in args.beta if isinstance(args.beta, list) else []:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            fail("beta", f"every value must be a number > 0, got {value!r}")
    if not (isinstance(args.learning_rate, (int, float)) and args.learning_rate >= 0
            and math.isfinite(args.learning_rate)):
        fail("learning_rate", f"must be a finite number >= 0, got {args.learning_rate!r}; e.g. learning_rate=5e-7")
    if args.missing_eos_penalty is not None and args.missing_eos_penalty < 0:
        fail("missing_eos_penalty", f"must be >= 0 (it is subtracted), got {args.missing_eos_penalty}")
    if args.max_new_tokens < 1:
        fail("max_new_tokens", f"must be >= 1, got {args.max_new_tokens}")
    if args.max_new_tokens >= args.max_length:
        fail(
            "max_new_tokens",
            f"{args.max_new_tokens} leaves no room for the prompt in max_length={args.max_length}; "
            "raise max_length or lower max_new_tokens",
        )
    if not args.temperature > 0:
        fail("temperature", f"must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        fail("top_p", f"must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        fail("top_k", f"must be >= 0 or None, got {args.top_k}")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        fail("min_p", f"must be in [0, 1], got {args.min_p}")
    if not args.repetition_penalty > 0:
        fail("repetition_penalty", f"must be > 0, got {args.repetition_penalty}")
    if args.num_samples < 2:
        fail("num_samples", f"Online DPO needs at least 2 completions per prompt, got {args.num_samples}")
    if args.generation_batch_size is not None and args.generation_batch_size < 1:
        fail("generation_batch_size", f"must be >= 1, got {args.generation_batch_size}")
    if args.vllm_mode not in ("colocate", "server"):
        fail("vllm_mode", f"must be 'colocate' or 'server', got {args.vllm_mode!r}")
    if args.vllm_mode == "server" and args.use_vllm is not False and args.placement != "in_process":
        fail("vllm_mode", f"'server' trains in this process and samples on the server; placement="
             f"{args.placement!r} starts engines of its own: use placement='in_process' with a server, or "
             "vllm_mode='colocate' with a Ray placement")
    if args.vllm_server_base_url is not None:
        from odpo_vllm.sampling.server_client import check_url

        problem = check_url(args.vllm_server_base_url)
        if problem:
            fail("vllm_server_base_url", f"{problem} (e.g. http://10.0.0.5:8000)")
    for name in ("vllm_server_port", "vllm_group_port"):
        if not 0 < getattr(args, name) < 65536:
            fail(name, f"must be a port in 1-65535, got {getattr(args, name)}")
    if args.vllm_model_impl not in ("vllm", "transformers"):
        fail("vllm_model_impl", f"must be 'vllm' or 'transformers', got {args.vllm_model_impl!r}")
    if args.vllm_structured_outputs_regex is not None:
        import re

        try:
            re.compile(args.vllm_structured_outputs_regex)
        except re.error as err:
            fail("vllm_structured_outputs_regex", f"is not a regular expression ({err})")
    if args.vllm_server_timeout <= 0:
        fail("vllm_server_timeout", f"must be > 0 seconds, got {args.vllm_server_timeout}")
    if not 0 < args.vllm_gpu_memory_utilization <= 1:
        fail("vllm_gpu_memory_utilization", f"must be in (0, 1], got {args.vllm_gpu_memory_utilization}")
    if args.vllm_tensor_parallel_size < 1:
        fail("vllm_tensor_parallel_size", f"must be >= 1, got {args.vllm_tensor_parallel_size}")
    if args.vllm_kv_cache_memory_bytes is not None and args.vllm_kv_cache_memory_bytes < 1 << 20:
        fail("vllm_kv_cache_memory_bytes", f"{args.vllm_kv_cache_memory_bytes} is below 1 MiB; give bytes, e.g. 67108864")
    if args.vllm_max_model_len is not None and args.vllm_max_model_len <= args.max_new_tokens:
        fail("vllm_max_model_len", f"must exceed max_new_tokens={args.max_new_tokens}")
    if args.placement not in PLACEMENTS:
        fail("placement", f"{args.placement!r} is not supported; use one of {', '.join(PLACEMENTS)}")
    if args.ray_zero_stage not in (2, 3):
        fail("ray_zero_stage", f"must be 2 or 3, got {args.ray_zero_stage}")
    for name in ("ray_learner_ranks", "ray_num_engines"):
        if getattr(args, name) < 1:
            fail(name, f"must be >= 1, got {getattr(args, name)}")
    if not args.ray_cpus_per_actor > 0:
        fail("ray_cpus_per_actor", f"must be > 0, got {args.ray_cpus_per_actor}")
    if args.ray_threads_per_actor is not None and args.ray_threads_per_actor < 1:
        fail("ray_threads_per_actor", f"must be >= 1, got {args.ray_threads_per_actor}")
    if not args.ray_timeout_s > 0:
        fail("ray_timeout_s", f"must be > 0, got {args.ray_timeout_s}")
    if args.ray_max_engine_restarts < 0:
        fail("ray_max_engine_restarts", f"must be >= 0 (0: a dead engine stops the run), got "
                                        f"{args.ray_max_engine_restarts}")
    if args.weight_transport not in WEIGHT_TRANSPORTS:
        fail("weight_transport", f"{args.weight_transport!r} is not supported; use one of {', '.join(WEIGHT_TRANSPORTS)}")
    if args.lora_sync not in LORA_SYNC_MODES:
        fail("lora_sync", f"{args.lora_sync!r} is not supported; use one of {', '.join(LORA_SYNC_MODES)}")
    if args.async_steps < 0:
        fail("async_steps", f"must be >= 0 (0: synchronous), got {args.async_steps}")
    if not isinstance(args.weight_sync_steps, int) or args.weight_sync_steps < 1:
        fail("weight_sync_steps", f"must be an integer >= 1 (1: push after every step), got {args.weight_sync_steps!r}")
    if not 0.0 <= args.ref_model_mixup_alpha <= 1.0:
        fail("ref_model_mixup_alpha", f"must be in [0, 1] (the policy's share in a reference refresh), got "
                                      f"{args.ref_model_mixup_alpha}")
    if not isinstance(args.ref_model_sync_steps, int) or args.ref_model_sync_steps < 1:
        fail("ref_model_sync_steps", f"must be an integer >= 1, got {args.ref_model_sync_steps!r}")
    if args.ray_num_reward_workers is not None and args.ray_num_reward_workers < 1:
        fail("ray_num_reward_workers", f"must be >= 1, got {args.ray_num_reward_workers}")
    if args.ray_cpus_per_reward_worker is not None and not args.ray_cpus_per_reward_worker >= 0:
        fail("ray_cpus_per_reward_worker", f"must be >= 0 (0: it shares the cores of the others), got "
                                           f"{args.ray_cpus_per_reward_worker}")
    if not args.preemption_grace_s > 0:
        fail("preemption_grace_s", f"must be > 0 seconds (the scheduler's grace period), got "
                                   f"{args.preemption_grace_s}")
    if not args.ray_start_timeout_s > 0:
        fail("ray_start_timeout_s", f"must be > 0 seconds, got {args.ray_start_timeout_s}")
    if not args.ray_wait_for_resources_s >= 0:
        fail("ray_wait_for_resources_s", f"must be >= 0 (0: fail at once when the cluster is too small), got "
                                         f"{args.ray_wait_for_resources_s}")
    if args.reward_gpus < 0:
        fail("reward_gpus", f"must be >= 0, got {args.reward_gpus}")
    if args.reward_weights is not None and any(not isinstance(w, (int, float)) for w in args.reward_weights):
        fail("reward_weights", "must be a list of numbers")
    if args.generation_kwargs is not None and not isinstance(args.generation_kwargs, dict):
        fail("generation_kwargs", "must be a dict")
