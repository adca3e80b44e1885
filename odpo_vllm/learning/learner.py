"""The in-process learner: policy and reference logprobs, the loss, one optimizer step per call.

A Ray/DeepSpeed learner group implements the same `step` / `evaluate` / `save` / `load`
contract; the controller loop does not know which one it drives.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict

import torch

from odpo_vllm.core.batches import PairBatch
from odpo_vllm.core.objective import dpo_loss, policy_metrics, sample_logprob_gap
from odpo_vllm.core.sequences import (
    SequenceLayout,
    logprobs_from_hidden,
    logprobs_from_logits,
    longest_sequence,
    separate_sequences,
    shared_prompt_rows,
    token_logprobs,
)

logger = logging.getLogger(__name__)

# fp32 logits per chunk of completion tokens in the logprob pass (150k vocabulary: ~110 tokens on
# CPU). A GPU takes larger chunks: each chunk is a few kernel launches, and at 64 MiB a 135M model's
# step at short completions was bound by launches (H200, bf16: 0.83x TRL's step at 8 chat pairs).
LOGPROB_CHUNK_BYTES = 64 << 20
LOGPROB_CHUNK_BYTES_GPU = 1 << 30
REFERENCE_FILE = "reference.safetensors"  # a checkpoint's reference weights (sync_ref_model only)


def build_optimizer(model, args):
    """The optimizer named by `args.optim` (transformers' names), weight decay off for biases and norms."""
    from transformers import Trainer

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)


def build_scheduler(optimizer, args, num_training_steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )


class Learner:
    """Owns the policy, the reference, the optimizer and the scheduler of one process.

    `ref_model=None` with a PEFT policy means "the policy with its adapter disabled".
    """

    def __init__(self, model, ref_model, args, pad_token_id: int, num_training_steps: int,
                 optimizer=None, scheduler=None):
        self.model, self.ref_model, self.args = model, ref_model, args
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.optimizer = optimizer or build_optimizer(model, args)
        self.scheduler = scheduler or build_scheduler(self.optimizer, args, num_training_steps)
        self.autocast_dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
        self.scaler = torch.amp.GradScaler(self.device.type) if args.fp16 else None
        self._hidden_path: dict[int, bool] = {}  # per model: logprobs from hidden states (see _final_hidden_states)
        self._shared_ok: dict[int, bool] = {}  # per model: takes shared-prompt rows (see _shares_prompts)
        self._logged: set[str] = set()

    # ---------------------------------------------------------------- logprobs
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _reference_context(self):
        if self.ref_model is None:
            return self.model.disable_adapter()  # PEFT: the base model is the reference
        return contextlib.nullcontext()

    def completion_logprobs(self, model, layout: SequenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Completion-token logprobs under `model`, (S, C) fp32 (row s: sequence s of the block layout,
        column t: its completion token t, zero elsewhere), and the (S, C) completion mask, whichever
        the layout (`core/sequences.py`).

        Where the model allows it (`_final_hidden_states`), the forward stops at the final hidden
        states and the output layer runs on completion positions only, a chunk of tokens at a time:
        no (rows, length, vocabulary) logits exist at any point. Otherwise the full logits are
        computed and the fp32 log-softmax runs on chunks of completion positions.
        """
        inputs = {**layout.model_inputs(_mask_dtype(model), self.device), "use_cache": False}
        for key, value in (getattr(layout, "pixel_inputs", None) or {}).items():
            if value.is_floating_point():  # pixels in the weights' precision (bf16 weights take no fp32 pixels)
                inputs[key] = inputs[key].to(next(model.parameters()).dtype)
        found = self._final_hidden_states(model, inputs)
        if found is not None:
            hidden, project, vocab = found
            return logprobs_from_hidden(hidden, project, layout, _chunk_tokens(vocab, hidden.device))
        with self._autocast():
            logits = model(**inputs).logits
        return logprobs_from_logits(logits, layout, _chunk_tokens(logits.shape[-1], logits.device))

    def _final_hidden_states(self, model, inputs: dict):
        """(final hidden states, output layer, vocabulary size) of `model` on `inputs` (`logits_to_keep=1`),
        or None where logprobs must come from the full logits. The first call per model checks that
        its output layer alone, followed by the config's `final_logit_softcapping` if any, reproduces
        its logits; a model that post-processes them otherwise (logit scaling, custom heads), a forward
        without `logits_to_keep` and ZeRO-3 (partitioned weights must go through the engine's
        forward) get None."""
        key = id(model)
        head = self._output_layer(model) if self._hidden_path.get(key, True) else None
        if head is None:
            return None
        try:
            with self._autocast():
                out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        except TypeError:  # a forward without these arguments (custom code)
            if key in self._hidden_path:
                raise
            self._hidden_path[key] = False
            return None
        hidden = out.hidden_states[-1]
        cap = getattr(getattr(_unwrap(model), "config", None), "final_logit_softcapping", None)

        def project(states):
            with self._autocast():
                logits = head(states)
                if cap:  # Gemma2-style soft-capping after the output layer
                    logits = torch.tanh(logits / cap) * cap
                return logits

        if key not in self._hidden_path:  # the output layer alone must give the model's logits
            with torch.no_grad():
                mine, theirs = project(hidden[:, -1:]).float(), out.logits.float()
            self._hidden_path[key] = mine.shape == theirs.shape and bool(
                (mine - theirs).abs().max() <= 1e-6 * max(1.0, theirs.abs().max().item()))
        return (hidden, project, head.weight.shape[0]) if self._hidden_path[key] else None

    @staticmethod
    def _output_layer(model):
        """The model's output projection (`lm_head`) when logprobs may be computed from hidden states."""
        partitioned = getattr(model, "zero_optimization_partition_weights", None)
        if callable(partitioned) and partitioned():
            return None
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        weight = getattr(head, "weight", None)
        return head if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None

    def _pair_pass(self, batch: PairBatch, beta: float, total_pairs: int, train: bool):
        """Loss (scaled so micro-batches add up to the mean over `total_pairs`) and metric sums."""
        layout = self._layout(batch)
        with torch.no_grad(), self._reference_context():
            ref_model = self.ref_model if self.ref_model is not None else self.model
            ref_logps, _ = self.completion_logprobs(ref_model, layout)
        with torch.set_grad_enabled(train):
            policy_logps, mask = self.completion_logprobs(self.model, layout)
            n = len(batch)
            seq_policy, seq_ref = policy_logps.sum(1), ref_logps.sum(1)
            losses = dpo_loss(seq_policy[:n], seq_policy[n:], seq_ref[:n], seq_ref[n:], beta, self.args.loss_type)
            loss = losses.sum() / total_pairs
        sums = policy_metrics(policy_logps.detach(), ref_logps, mask, n, beta)
        sums["loss"] = losses.detach().sum()
        sampled = batch.sampler_logprobs()
        if sampled is not None:
            sums["sync/sample_logprob_gap"] = sample_logprob_gap(policy_logps, mask, sampled, n)
        return loss, sums, layout.num_truncated_prompts

    # ---------------------------------------------------------------- layouts
    def _layout(self, batch: PairBatch) -> SequenceLayout:
        """The micro-batch's pairs as shared-prompt rows where `_shares_prompts` allows, else as
        separate sequences (`core/sequences.py`); chosen sequences first, then rejected."""
        completions = [[c, r] for c, r in zip(batch.chosen_ids, batch.rejected_ids)]
        if batch.pixel_inputs is not None:
            # Images: separate sequences, each row with its prompt's pixel inputs, and prompts never cut
            # (a cut would drop image tokens that the pixel inputs fill), as in the reference.
            longest = longest_sequence(batch.prompt_ids, completions, 1 << 30)
            return separate_sequences(batch.prompt_ids, completions, max(self.args.max_length, longest),
                                      self.pad_token_id, batch.pixel_inputs)
        build = shared_prompt_rows if self._shares_prompts(batch, completions) else separate_sequences
        return build(batch.prompt_ids, completions, self.args.max_length, self.pad_token_id)

    def _shares_prompts(self, batch: PairBatch, completions: list[list[list[int]]]) -> bool:
        """False when `shared_prompt_passes` is off, when a model failed the one-time check (logged
        once), or when a sequence is longer than the model's sliding window (a single mask cannot hold
        both the full and the windowed pattern; this micro-batch only)."""
        if not getattr(self.args, "shared_prompt_passes", True) or len(batch) == 0:
            return False
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        for model in models:
            if id(model) not in self._shared_ok:
                reason = self._shared_refusal(model, batch)
                self._shared_ok[id(model)] = reason is None
                if reason:
                    logger.warning("shared_prompt_passes: %s %s; it runs separate padded sequences instead",
                                   type(_unwrap(model)).__name__, reason)
            if not self._shared_ok[id(model)]:
                return False
            window = _sliding_window(model)
            if window and longest_sequence(batch.prompt_ids, completions, self.args.max_length) > window:
                self._log_once(f"shared_prompt_passes: sequences longer than the sliding window ({window}) "
                               "run as separate sequences")
                return False
        return True

    def _shared_refusal(self, model, batch: PairBatch) -> str | None:
        """Why `model` cannot take shared-prompt rows, or None. Checked once per model: its attention
        must take a custom 4D mask, and on a small probe made of the first pair's tokens (a prompt of
        8, two different completions of 8) the shared rows must give the separate sequences'
        logprobs; a model that ignores the mask or position ids (ALiBi, its own mask) fails here."""
        impl = getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)
        if impl not in ("eager", "sdpa"):
            return f"uses attention implementation {impl!r}, which takes no 4D attention mask (eager and sdpa do)"
        n = min(8, max(1, (_sliding_window(model) or 16) // 2))  # the probe fits a sliding window
        pool = (batch.prompt_ids[0] + batch.chosen_ids[0] + batch.rejected_ids[0]) * 3 * n
        prompts, completions = [pool[:n]], [[pool[n : 2 * n], pool[2 * n : 3 * n][::-1]]]
        was_training, autocast_dtype = model.training, self.autocast_dtype
        model.eval()
        self.autocast_dtype = None  # compare in the weights' precision (fp32 unless DeepSpeed holds bf16/fp16)
        try:
            with torch.no_grad():
                got, want = [self.completion_logprobs(model, build(prompts, completions, self.args.max_length,
                                                                   self.pad_token_id))[0]
                             for build in (shared_prompt_rows, separate_sequences)]
        except Exception as error:  # noqa: BLE001 (any failure means: not this model)
            return f"failed on a shared-prompt row ({type(error).__name__}: {error})"
        finally:
            model.train(was_training)
            self.autocast_dtype = autocast_dtype
        got, want = got.sum(1), want.sum(1)
        gap = (got - want).abs().max().item()
        exact = next(model.parameters()).dtype == torch.float32
        tolerance = (1e-4 if exact else 5e-2) * max(1.0, want.abs().max().item())
        if not gap <= tolerance:
            return f"gives logprobs {gap:.2e} away from separate sequences with the shared-prompt mask"
        return None

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.warning(message)

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """log p(token_ids[t] | token_ids[:t]) for t >= 1 under the policy (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        ids = torch.tensor([token_ids], device=self.device)
        with self._autocast():
            logits = self.model(input_ids=ids, use_cache=False).logits
        self.model.train(was_training)
        return token_logprobs(logits, ids)[0].cpu()

    # ---------------------------------------------------------------- training
    def step(self, batch: PairBatch, beta: float) -> dict[str, float]:
        """One optimizer step over all pairs, in micro-batches of `per_device_train_batch_size`
        (gradient accumulation); the loss is the mean over pairs whatever the split."""
        self.model.train()
        micro = self.args.per_device_train_batch_size
        totals: dict[str, float] = defaultdict(float)
        truncated = 0
        starts = range(0, len(batch), micro)
        for start in starts:
            loss, sums, cut = self._pair_pass(batch.slice(start, start + micro), beta, len(batch), train=True)
            self._backward(loss, last=start == starts[-1])
            truncated += cut
            for key, value in sums.items():
                totals[key] += float(value)
        learning_rate = self.scheduler.get_last_lr()[0]
        grad_norm = self._apply_update()
        metrics = {key: value / len(batch) for key, value in totals.items()}
        metrics.update(grad_norm=float(grad_norm), learning_rate=learning_rate, truncated_prompts=truncated)
        return metrics

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _apply_update(self) -> float:
        """Clip, step the optimizer and the schedule, clear the gradients; returns the grad norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm or float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @torch.no_grad()
    def evaluate(self, batch: PairBatch, beta: float) -> dict[str, float]:
        self.model.eval()
        totals: dict[str, float] = defaultdict(float)
        micro = self.args.per_device_eval_batch_size
        for start in range(0, len(batch), micro):
            _, sums, _ = self._pair_pass(batch.slice(start, start + micro), beta, len(batch), train=False)
            for key, value in sums.items():
                totals[key] += float(value)
        self.model.train()
        return {key: value / len(batch) for key, value in totals.items()}

    # ---------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str) -> None:
        """The policy as a `from_pretrained` folder (a PEFT policy: its adapter)."""
        self.model.save_pretrained(directory, safe_serialization=True)

    # ---------------------------------------------------------------- reference refresh
    def refresh_reference(self, alpha: float) -> None:
        """TR-DPO's refresh (`sync_ref_model`): reference <- alpha * policy + (1 - alpha) * reference,
        parameter by parameter, in place (TRL's SyncRefModelCallback)."""
        if self.ref_model is None:
            raise RuntimeError("sync_ref_model: this policy has no reference model of its own (a LoRA policy's "
                               "reference is its base model)")
        policy = dict(_unwrap(self.model).named_parameters())
        with torch.no_grad():
            for name, ref in self.ref_model.named_parameters():
                with self._whole(policy[name]):
                    ref.mul_(1.0 - alpha).add_(policy[name].detach().to(ref.device, ref.dtype), alpha=alpha)

    def _whole(self, param):
        """A context in which `param` holds all its values (ZeRO-3 gathers it; here it does)."""
        return contextlib.nullcontext()

    def _save_reference(self, directory: str) -> None:
        if self.args.sync_ref_model and self.ref_model is not None:  # it moved: the checkpoint must hold it
            from safetensors.torch import save_model

            save_model(self.ref_model, os.path.join(directory, REFERENCE_FILE))

    def _load_reference(self, directory: str) -> None:
        if self.args.sync_ref_model and self.ref_model is not None:
            from safetensors.torch import load_model

            load_model(self.ref_model, os.path.join(directory, REFERENCE_FILE), device=str(self.device))

    # ---------------------------------------------------------------- checkpoints
    def save(self, directory: str) -> None:
        torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        torch.save(self.scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
        if self.scaler:
            torch.save(self.scaler.state_dict(), os.path.join(directory, "scaler.pt"))
        self._save_reference(directory)

    def load(self, directory: str) -> None:
        load_model_weights(self.model, directory)
        self.optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), map_location=self.device))
        self.scheduler.load_state_dict(torch.load(os.path.join(directory, "scheduler.pt")))
        if self.scaler and os.path.exists(os.path.join(directory, "scaler.pt")):
            self.scaler.load_state_dict(torch.load(os.path.join(directory, "scaler.pt")))
        self._load_reference(directory)


def _unwrap(model):
    """A DeepSpeed engine's module (the engine does not forward `config`); any other model itself."""
    if callable(getattr(model, "zero_optimization_partition_weights", None)):
        return model.module
    return model


def _chunk_tokens(vocab: int, device: torch.device) -> int:
    """Completion tokens per chunk of the logprob gather: `LOGPROB_CHUNK_BYTES` (CPU) or
    `LOGPROB_CHUNK_BYTES_GPU` of fp32 logits."""
    budget = LOGPROB_CHUNK_BYTES if device.type == "cpu" else LOGPROB_CHUNK_BYTES_GPU
    return max(1, budget // (4 * vocab))


def _mask_dtype(model) -> torch.dtype | None:
    """4D attention-mask form for shared-prompt rows: bool for sdpa, additive float for eager."""
    config = getattr(_unwrap(model), "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa":
        return None
    dtype = next(model.parameters()).dtype
    return dtype if dtype.is_floating_point else torch.float32


def _sliding_window(model) -> int | None:
    config = getattr(_unwrap(model), "config", None)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(t) for t in layer_types):
        return None
    return int(window)


def load_model_weights(model, directory: str) -> None:
    """Load weights written by `save_pretrained` (a full model, one file or sharded, or a PEFT adapter)
    into `model` in place."""
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint
    from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    adapter = os.path.join(directory, ADAPTER_SAFE_WEIGHTS_NAME)
    if os.path.exists(adapter):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter, device=str(next(model.parameters()).device)))
        return
    if os.path.isfile(os.path.join(directory, SAFE_WEIGHTS_NAME)):
        missing, unexpected = model.load_state_dict(load_file(os.path.join(directory, SAFE_WEIGHTS_NAME)), strict=False)
    elif os.path.isfile(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)):
        # transformers' loader: the shards named by the index, one at a time (never the whole state in memory)
        missing, unexpected = load_sharded_checkpoint(model, directory, strict=False)
    else:
        raise FileNotFoundError(f"no model weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}) in checkpoint "
                                f"{directory}")
    if unexpected and hasattr(type(model), "from_pretrained"):
        # save_pretrained wrote the checkpoint's own names (e.g. Llava's "language_model.model.*" in
        # transformers 5): transformers' loader maps them back to this model's parameters
        reloaded = type(model).from_pretrained(directory, dtype=next(model.parameters()).dtype)
        missing, unexpected = model.load_state_dict(reloaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {missing}, unexpected {unexpected}")
