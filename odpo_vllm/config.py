"""`OnlineDPOConfig`: every argument of the reference trainer, validated at construction."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from odpo_vllm.config_checks import check_config

logger = logging.getLogger(__name__)



def _gpu_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class OnlineDPOConfig(TrainingArguments):
    r"""Configuration of [`OnlineDPOTrainer`]. Standard `TrainingArguments` apply too.

    Defaults that differ from `TrainingArguments` (as in the reference):
    `logging_steps=10`, `gradient_checkpointing=True`, `learning_rate=5e-7`,
    `remove_unused_columns=False`, and `bf16=True` unless `fp16` is set.

    bf16 on a machine without a GPU: when `bf16` is left at its default, it resolves to True only
    where a CUDA device supports bf16, and to False (fp32) elsewhere, so the defaults train on a
    laptop. Asking for `bf16=True` explicitly on CPU is honoured (CPU autocast, slower than fp32).
    """

    # --- the reference's changed defaults
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps (float < 1: ratio)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Default: True on a bf16-capable GPU unless fp16, else False."},
    )
    learning_rate: float = field(default=5e-7, metadata={"help": "Initial AdamW learning rate."})
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Kept False: extra dataset columns are passed to reward functions."}
    )

    # --- models and rewards
    reward_model_path: str | None = field(default=None, metadata={"help": "Path or hub id of the reward model."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments for `from_pretrained` when `model` is a string."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function (default: all 1.0)."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of completions without EOS. Must be >= 0."}
    )

    # --- generation
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens generated per completion."})
    max_length: int = field(
        default=256,
        metadata={"help": "Max prompt+completion tokens for the logprob pass; the prompt is cut from the left."},
    )
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability mass, in (0, 1]."})
    top_k: int | None = field(default=0, metadata={"help": "Keep the k most likely tokens (0 or None: all)."})
    min_p: float | None = field(default=None, metadata={"help": "Minimum token probability relative to the top."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeating tokens."})
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra sampling settings; they override the fields above."}
    )
    num_samples: int = field(
        default=2, metadata={"help": "Completions per prompt (k). k > 2 pairs the best against the worst."}
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts per generate call (default: the whole step's prompts at once)."},
    )
    cache_implementation: str | None = field(
        default=None, metadata={"help": "transformers sampler: the KV-cache implementation of generate()."}
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={"help": "Accepted for the reference's configs. Sampling never reads ZeRO-3 shards here: the engine "
                          "(or the in-process sampler) holds whole weights, so there is nothing to gather."},
    )

    # --- vLLM engine
    use_vllm: bool | None = field(
        default=None, metadata={"help": "Sample with a vLLM engine. Default: True where vLLM is installed."}
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={"help": "colocate: the engine runs beside the learner (in process, or the Ray placements); "
                          "server: a vLLM server started apart (`python -m odpo_vllm.serve --model ...`), "
                          "the learner in this process."},
    )
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "vllm_mode=server: the server's URL."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vllm_mode=server: the server's host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vllm_mode=server: the server's port."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "vllm_mode=server: seconds to wait for the server."}
    )
    vllm_group_port: int = field(
        default=51216, metadata={"help": "vllm_mode=server: port of the weight-update group's rendezvous, on the "
                                     "trainer's host (the server connects to it)."}
    )
    vllm_model_impl: str = field(
        default="vllm",
        metadata={"help": "vllm: vLLM's own model code; transformers: vLLM's Transformers backend (any model "
                          "transformers can run, e.g. custom code)."},
    )
    vllm_structured_outputs_regex: str | None = field(
        default=None, metadata={"help": "vLLM engine: completions must match this regular expression."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.55, metadata={"help": "Share of GPU memory the engine may take (weights + KV cache)."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per engine (tensor parallel)."})
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={"help": "Free the engine's GPU memory while the learner trains (GPU only; no-op on CPU)."},
    )
    vllm_kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={
            "help": "KV-cache size in bytes. Default on CPU: room for a step's completions at full length "
            "(at least 64 MiB, at most a quarter of memory); on GPU: from vllm_gpu_memory_utilization."
        },
    )
    vllm_enforce_eager: bool | None = field(
        default=None, metadata={"help": "Disable CUDA graphs (default: True on CPU, False on GPU)."}
    )
    vllm_max_model_len: int | None = field(
        default=None, metadata={"help": "Engine context (default: longest prompt + max_new_tokens, capped by the model)."}
    )
    vllm_sync_tolerance: float | None = field(
        default=None,
        metadata={"help": "Warn when engine and learner logprobs of the probe differ by more (default 1e-3 fp32, 0.1 bf16)."},
    )

    # --- placement
    placement: str = field(
        default="in_process",
        metadata={"help": "in_process (one process); dedicated (Ray: vLLM engine actors apart from DeepSpeed "
                          "learner ranks); colocated (Ray: one engine beside each rank, sharing its GPU)."},
    )
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: start a local one)."})
    ray_num_cpus: int | None = field(default=None, metadata={"help": "CPUs of a local Ray cluster (default: all)."})
    ray_learner_ranks: int = field(default=1, metadata={"help": "DeepSpeed data-parallel learner ranks."})
    ray_zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage of the learners: 2 or 3."})
    ray_num_engines: int = field(default=1, metadata={"help": "vLLM engine actors."})
    ray_cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per learner rank and per engine (fractions allowed)."})
    ray_threads_per_actor: int | None = field(
        default=None,
        metadata={"help": "torch threads of each learner rank and reward worker (default: its CPUs, at least 1). "
                          "More than its CPUs lets a rank use the cores an idle engine leaves free."},
    )
    ray_timeout_s: float = field(default=600.0, metadata={"help": "Longest wait for any actor call before failing."})
    preemption_grace_s: float = field(
        default=25.0,
        metadata={"help": "Seconds a scheduler leaves between its stop signal (SIGTERM) and SIGKILL, less a margin "
                          "(default 25: a 30 s grace period). On a stop signal the checkpoint waits for no actor "
                          "that may be dead or hung: batches still being sampled are waited for up to two fifths of it, "
                          "then dropped and sampled again on resume."},
    )
    ray_start_timeout_s: float = field(
        default=900.0,
        metadata={"help": "Longest wait for an actor to start (learner ranks loading the policy and meeting, a vLLM "
                          "engine or a reward worker loading its model, a replacement coming up), apart from "
                          "ray_timeout_s: a short ray_timeout_s finds a hung engine sooner without failing a start "
                          "on a slow node."},
    )
    ray_wait_for_resources_s: float = field(
        default=0.0,
        metadata={"help": "On a cluster the run joins: when the placement needs more CPUs or GPUs than the cluster "
                          "has, ask its autoscaler for them and wait up to this many seconds for the nodes. 0: fail "
                          "at once, naming each role's share and the flags that set it."},
    )
    ray_max_engine_restarts: int = field(
        default=3,
        metadata={"help": "Times each vLLM engine actor (and each reward worker) may be replaced after its process "
                          "died or a call to it (sampling, a weight push, the sync probe, its own replacement sync, "
                          "scoring) went unanswered for ray_timeout_s. A replacement engine gets the published "
                          "weights before it samples and the lost batch is sampled again with the same seeds; a "
                          "replacement reward worker scores the lost rows again. Past it the run stops. With "
                          "async_steps >= 1 or weight_sync_steps > 1, learner rank 0 keeps a copy of the published "
                          "weights in host memory for this; 0 turns both off."},
    )
    weight_transport: str = field(
        default="auto",
        metadata={"help": "How learner ranks send weights to engine actors: nccl (GPUs, dedicated), ipc (CUDA IPC, "
                          "colocated on one GPU), odpo_gloo (CPU, or anywhere as a fallback); auto picks by device "
                          "and placement."},
    )

    lora_sync: str = field(
        default="auto",
        metadata={"help": "With a LoRA policy, what each push sends the vLLM engine: merged (the whole model with the "
                          "adapter merged in), adapter (the engine loads the base once and each push sends only the "
                          "adapter's tensors, served as a new vLLM LoRA adapter per version; in process and on Ray engine "
                          "actors, not to a vLLM server), or auto: adapter on GPU engines, merged otherwise (on CPU vLLM "
                          "runs LoRA without its kernels and samples slower than the merged push costs)."},
    )

    # --- asynchronous actor/learner pipeline
    async_steps: int = field(
        default=0,
        metadata={"help": "K: sample (and score) the batches of the next K steps while the learners train the "
                          "current one. The batch of step t is sampled by policy version max(0, t - K), exactly "
                          "(reproducible, resumable). 0: synchronous, as the reference."},
    )
    weight_sync_steps: int = field(
        default=1,
        metadata={"help": "s: the engines receive the learners' weights after every s-th step only (semi-online "
                          "DPO); the batch of step t is sampled by version s * floor(max(0, t - K) / s) with "
                          "K = async_steps, exactly. Evaluation and the end of training bring the engines to the "
                          "learners' weights. 1: every step, as the reference."},
    )
    # --- reference refresh (TR-DPO; DPOConfig's fields and defaults)
    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "Every ref_model_sync_steps steps the reference becomes ref_model_mixup_alpha * policy + "
                          "(1 - ref_model_mixup_alpha) * reference (TR-DPO, Gorbatovski et al. 2024). Saved in "
                          "checkpoints. Not with a LoRA policy, whose reference is its base model."},
    )
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "The policy's share in each reference refresh (sync_ref_model), in [0, 1]."})
    ref_model_sync_steps: int = field(
        default=512, metadata={"help": "Steps between two reference refreshes (sync_ref_model)."})
    ray_num_reward_workers: int | None = field(
        default=None,
        metadata={"help": "Reward-model actors under a Ray placement (default 1 when a reward model is given; "
                          "callables and judges run in the driver)."},
    )
    reward_gpus: float = field(default=0.25, metadata={"help": "GPU share of each reward-model actor on GPU clusters."})
    ray_cpus_per_reward_worker: float | None = field(
        default=None,
        metadata={"help": "CPUs of each reward-model actor (fractions allowed; 0: it shares the others' cores). "
                          "Default: the cluster's CPUs left beside the learner ranks and engines, split across the "
                          "reward workers, at most 1 each; 0 when none are left (a synchronous step scores while "
                          "the engines and ranks wait)."},
    )

    # --- objective
    # A float (default 0.1) or a list, kept as given. Annotated as a list so that the command line
    # takes `--beta 0.1 0.05`; HfArgumentParser then passes None when the flag is absent.
    beta: list[float] = field(
        default=0.1,
        metadata={"help": "KL coefficient (default 0.1); a list gives one value per epoch, the last one after."},
    )
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in policy and reference."})

    shared_prompt_passes: bool = field(
        default=True,
        metadata={
            "help": "Policy and reference run each prompt once for both completions of its pair (one row, a "
            "4D attention mask, position ids restarting after the prompt), with several pairs packed per "
            "row instead of padding. Same logprobs as separate sequences; a model that cannot take the "
            "mask falls back to separate padded sequences with a log line. False: always separate."
        },
    )

    # --- logging
    log_completions: bool = field(
        default=True, metadata={"help": "Write sampled pairs to <output_dir>/completions.jsonl at each log."}
    )
    plot_at_end: bool = field(default=True, metadata={"help": "Save the reward and KL curves as a PNG at the end."})

    def __post_init__(self):
        if self.beta is None:  # the command line without --beta
            self.beta = 0.1
        elif isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool):
            self.beta = float(self.beta)
        elif isinstance(self.beta, tuple):
            self.beta = list(self.beta)
        if self.disable_tqdm is None:
            # TrainingArguments decides from transformers' logger, which a quiet console silences:
            # the progress bar follows log_level instead (off for error/critical only).
            self.disable_tqdm = str(self.log_level).lower() in ("error", "critical")
        if self.bf16 is None:
            self.bf16 = (not self.fp16) and _gpu_supports_bf16()
            if not self.bf16 and not self.fp16:
                logger.info("bf16 left at its default and no bf16-capable GPU here: training in fp32.")
        if self.bf16 and not torch.cuda.is_available():
            # An explicit bf16 request on CPU: run it with CPU autocast instead of refusing.
            self.use_cpu = True

        for name in ("generation_kwargs", "model_init_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{name}: not valid JSON ({err}); pass a dict or a JSON object string") from err
        check_config(self)
        super().__post_init__()

    @property
    def data_parallel_ranks(self) -> int:
        """Learner ranks that share a step's prompts (one in process)."""
        return 1 if self.placement == "in_process" else self.ray_learner_ranks

    def beta_at(self, epoch: float) -> float:
        from odpo_vllm.core.objective import beta_for_epoch

        return beta_for_epoch(self.beta, epoch)

    def sampling_settings(self) -> dict[str, Any]:
        """The sampling parameters, `generation_kwargs` last so that it wins."""
        settings = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or 0,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.cache_implementation is not None:  # transformers sampler only
            settings["cache_implementation"] = self.cache_implementation
        settings.update(self.generation_kwargs or {})
        return settings
