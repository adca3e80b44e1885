"""`OnlineDPOTrainer`: the reference's API around one readable loop.

    for each step:  sample -> score -> pair -> learn -> sync -> log -> save (-> evaluate)

Who does each step is decided at construction by the placement's builder (`runtime/placement.py`:
in process, Ray actors dedicated or colocated, or a vLLM server the user started); the loop is
the same for every placement.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import replace

import torch
from transformers.trainer_callback import (
    CallbackHandler,
    DefaultFlowCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerControl,
    TrainerState,
)
from transformers.trainer_utils import TrainOutput

from odpo_vllm.run import checkpoint, log_files
from odpo_vllm import multimodal, validation
from odpo_vllm.config import OnlineDPOConfig
from odpo_vllm.primitives.console import configure_logging
from odpo_vllm.data import IterablePromptBatches, PromptBatches, PromptEncoder, encode_dataset, engine_context
from odpo_vllm.learning.models import context_length
from odpo_vllm.core.objective import rlhf_reward
from odpo_vllm.sampling.pipeline import RolloutPipeline, pushes_after
from odpo_vllm.runtime.placement import RunSpec, build_roles
from odpo_vllm.run.evaluation import evaluate_prompts
from odpo_vllm.run.tracker_tables import log_completion_pairs
from odpo_vllm.primitives.preemption import Preempted, StopRequest, StopWaiting, stop_signals

logger = logging.getLogger(__name__)

class OnlineDPOTrainer:
    """Online DPO (Guo et al. 2024): sample two completions per prompt from the current policy,
    let the reward functions pick the better one, and take a DPO step on that pair."""

    def __init__(self, model, ref_model=None, reward_funcs=None, args: OnlineDPOConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 reward_processing_classes=None, peft_config=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None):
        if ref_model is not None and ref_model is model:
            raise ValueError(
                "ref_model: `model` and `ref_model` are the same object; pass ref_model=None to get a frozen "
                "copy of the model (or the adapter-free base with peft_config)"
            )
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = OnlineDPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-OnlineDPO")
        if train_dataset is None:
            raise ValueError("train_dataset: Online DPO needs a dataset with a 'prompt' column")
        self.args = args
        self.separate_reference = ref_model is not None  # else the reference is the starting policy
        configure_logging(args.log_level, own_handler=False)
        # absolute before any role (a Ray worker in another working directory) receives a path
        model, ref_model, reward_funcs = validation.resolve_paths(model, ref_model, reward_funcs, args)
        validation.check_inputs(model, ref_model, reward_funcs, args)
        if args.sync_ref_model and (peft_config is not None or hasattr(model, "peft_config")):
            raise ValueError("OnlineDPOConfig.sync_ref_model: a LoRA policy's reference is its base model (the adapter "
                             "disabled), which a refresh cannot mix the policy into; train all weights, or turn "
                             "sync_ref_model off (TRL refuses the same)")
        server = args.vllm_mode == "server" and args.use_vllm is not False
        if args.lora_sync == "adapter" and server and (
                peft_config is not None or hasattr(model, "peft_config")):
            raise ValueError("OnlineDPOConfig.lora_sync='adapter': a vLLM server (vllm_mode='server') takes whole "
                             "weights only; use lora_sync='merged' or 'auto', or a Ray placement or in_process "
                             "with vllm_mode='colocate'")
        if args.lora_sync == "auto" and server and (
                peft_config is not None or hasattr(model, "peft_config")):
            logger.info("lora_sync=auto: the server gets merged weights (a vLLM server takes whole weights only)")
        if args.lora_sync == "adapter" and args.placement != "in_process" and peft_config is not None:
            # refused here, before any actor starts, where the config alone says vLLM cannot serve it
            from odpo_vllm.weights.adapter import choose_lora_sync, engine_refusal

            choose_lora_sync("adapter", peft_config, on_gpu=True, where=engine_refusal(args.vllm_tensor_parallel_size))
        self.data_collator = data_collator
        self.compute_metrics = compute_metrics
        self._set_reference_attributes(reward_funcs if reward_funcs is not None else args.reward_model_path)
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        torch.manual_seed(args.seed)

        # ---- what the policy is (its config and tokenizer); the placement loads the weights
        from transformers import AutoConfig

        if isinstance(model, str):
            config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
        elif isinstance(model, torch.nn.Module):
            config = model
        else:
            raise ValueError(f"model: expected a hub id, a path or a PreTrainedModel, got {type(model).__name__}")
        if processing_class is None:  # a vision-language model's processor, else its tokenizer
            processing_class = multimodal.load_processing_class(
                model if isinstance(model, str) else model.config._name_or_path, config, args.trust_remote_code)
        multimodal.check_placement(processing_class, args)
        # ids, padding, EOS and decoding: the tokenizer (a processor's own tokenizer, `multimodal.py`)
        tokenizer = self.tokenizer = multimodal.text_tokenizer(processing_class)
        validation.check_tokenizer(tokenizer)  # pad = EOS where there is no pad token
        self.processing_class = processing_class
        self.model_config = config if not isinstance(config, torch.nn.Module) else config.config
        validation.check_models(model if isinstance(model, torch.nn.Module) else None,
                                ref_model if isinstance(ref_model, torch.nn.Module) else None, tokenizer, config)
        self.eos_token_ids = self._eos_token_ids(config)
        if reward_funcs is None and not args.reward_model_path:
            raise ValueError("reward_funcs: give a reward model, a callable or a judge (or set reward_model_path)")

        # ---- data
        context = context_length(config)
        self.encoder = PromptEncoder(tokenizer, context - args.max_new_tokens, args.max_new_tokens,
                                     vocab_size=validation.vocab_size(config),
                                     processor=processing_class if multimodal.is_processor(processing_class) else None)
        self.train_dataset = encode_dataset(train_dataset, self.encoder)
        self.eval_dataset = eval_dataset  # as passed, as in transformers.Trainer; encoded copy below
        self._eval_encoded = self._encode_eval(eval_dataset)
        self.prompts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * \
            args.data_parallel_ranks
        if hasattr(self.train_dataset, "__len__"):
            self.batches = PromptBatches(self.train_dataset, self.prompts_per_step, args.data_seed or args.seed)
            steps_per_epoch = len(self.batches)
        else:
            if args.max_steps <= 0:
                raise ValueError("max_steps: a streaming (iterable) train_dataset has no length; set max_steps > 0")
            self.batches = IterablePromptBatches(self.train_dataset, self.prompts_per_step, self.encoder)
            steps_per_epoch = args.max_steps
        self.steps_per_epoch = steps_per_epoch
        self.max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)

        # ---- roles: who samples, scores, learns and moves the weights (built by the placement)
        max_model_len, probe = engine_context(self.train_dataset, self._eval_encoded, context, args,
                                              multimodal.image_token_ids(processing_class), tokenizer.eos_token_id)
        spec = RunSpec(model, ref_model, peft_config, tokenizer, args, self.eos_token_ids, max_model_len,
                       probe, self.max_steps, self.prompts_per_step,
                       reward_funcs if reward_funcs is not None else args.reward_model_path,
                       reward_processing_classes, optimizers, self.encoder.processor)
        self.roles = build_roles(spec)
        self.training_epoch = 0  # the epoch of the batch trained last (beta follows it)
        try:
            self.learner, self.generator = self.roles.learner, self.roles.generator
            self.rewards, self.publisher = self.roles.rewards, self.roles.publisher
            self.model, self.ref_model = getattr(self.learner, "model", None), getattr(self.learner, "ref_model", None)
            self.vllm_client = getattr(self.generator, "client", None)  # vllm_mode="server": the server's client
            self.publisher.publish(0)  # engines start with dummy weights
            self.pipeline = RolloutPipeline(self.batches, self.roles, tokenizer, args, self._rows)
        except BaseException:
            self.roles.close()
            raise

        # ---- callbacks, state
        from transformers.integrations import get_reporting_integration_callbacks

        default = [DefaultFlowCallback] + get_reporting_integration_callbacks(args.report_to)
        default.append(PrinterCallback if args.disable_tqdm else ProgressCallback)
        for callback in callbacks or []:
            self._check_callback(callback)
        self.callback_handler = CallbackHandler(
            default + list(callbacks or []), self.model, processing_class,
            getattr(self.learner, "optimizer", None), getattr(self.learner, "scheduler", None),
        )
        self.state = TrainerState(is_local_process_zero=True, is_world_process_zero=True)
        self.control = TrainerControl()
        self.control = self.callback_handler.on_init_end(args, self.state, self.control)
        os.makedirs(args.output_dir, exist_ok=True)

    # ------------------------------------------------------------------------------ helpers
    def _set_reference_attributes(self, reward_funcs) -> None:
        """The reference trainer's public attributes, read from the config (the placement holds
        the working objects): which sampler, its settings, the reward functions and weights."""
        args = self.args
        self.use_vllm = args.placement != "in_process" or (
            args.use_vllm if args.use_vllm is not None else validation.vllm_available())
        self.vllm_mode = args.vllm_mode if self.use_vllm else None  # colocate: the engine beside the learner
        self.vllm_client = None  # vllm_mode="server": the server's client, set once the roles are built
        self.temperature, self.top_p, self.top_k = args.temperature, args.top_p, args.top_k
        self.repetition_penalty = args.repetition_penalty
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

    @property
    def generation_config(self):
        """What each completion is sampled with: vLLM's `SamplingParams` (n = num_samples) when
        the engine samples, else transformers' `GenerationConfig`, as in the reference."""
        if self.use_vllm:
            from odpo_vllm.sampling.vllm_engine import sampling_params

            return sampling_params(self.args, self.eos_token_ids, self.args.num_samples, None)
        from odpo_vllm.sampling.hf_sampler import generation_config

        return generation_config(self.args.sampling_settings(), self.eos_token_ids, self.tokenizer.pad_token_id)

    @property
    def llm(self):
        """The in-process vLLM engine (`vllm.LLM`) with use_vllm in process, as the reference's
        colocate mode; None otherwise (the transformers sampler, or engine actors under Ray)."""
        return getattr(self.generator, "llm", None)

    @property
    def optimizer(self):
        """The optimizer in process; None under a Ray placement (each rank holds its own)."""
        return getattr(self.learner, "optimizer", None)

    @property
    def lr_scheduler(self):
        """The learning-rate scheduler in process; None under a Ray placement (each rank holds its own)."""
        return getattr(self.learner, "scheduler", None)

    def _eos_token_ids(self, model_or_config) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        source = getattr(model_or_config, "generation_config", model_or_config)
        config_eos = getattr(source, "eos_token_id", None)
        if config_eos is not None:
            ids |= set(config_eos if isinstance(config_eos, list) else [config_eos])
        return {i for i in ids if i is not None}

    def _encode_eval(self, eval_dataset):
        if eval_dataset is None:
            return None
        if isinstance(eval_dataset, dict):
            return {name: encode_dataset(ds, replace(self.encoder, dataset_name=f"eval_dataset[{name!r}]"))
                    for name, ds in eval_dataset.items()}
        return encode_dataset(eval_dataset, replace(self.encoder, dataset_name="eval_dataset"))

    def _rows(self, rows: list[dict]) -> list[dict]:
        """Apply a user data_collator if given: it may rewrite rows (e.g. add columns); rows with
        images get their pixel inputs (`multimodal.attach_media`)."""
        if self.data_collator is None:
            return multimodal.attach_media(rows, self.encoder)
        out = self.data_collator(rows)
        if not isinstance(out, list) or not all("prompt_ids" in r for r in out):
            raise ValueError("data_collator: must return a list of row dicts that keep 'prompt' and 'prompt_ids'")
        return multimodal.attach_media(out, self.encoder)

    @property
    def accelerator(self):
        """An `accelerate.Accelerator` of this single driver process, for callbacks written for
        TRL's trainers (`split_between_processes`, `is_main_process`, `unwrap_model`). The
        learners' own distribution is DeepSpeed's, inside the ranks."""
        if getattr(self, "_accelerator", None) is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=self.model is None or next(self.model.parameters()).device.type == "cpu")
        return self._accelerator

    @property
    def model_wrapped(self):
        """What TRL's callbacks generate with: the learner's model in process; under a Ray
        placement, where the driver holds no copy, the policy the engines serve
        (`run/engine_policy.py`: `generate()` samples through them)."""
        if self.model is not None:
            return self.model
        if getattr(self, "_engine_policy", None) is None:
            from odpo_vllm.run.engine_policy import EnginePolicy

            self._engine_policy = EnginePolicy(self)
        return self._engine_policy

    def _check_callback(self, callback) -> None:
        from odpo_vllm.run.engine_policy import refuse_unworkable_callback

        refuse_unworkable_callback(self, callback)

    def add_callback(self, callback):
        self._check_callback(callback)
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback):
        self.callback_handler.remove_callback(callback)

    # ------------------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """The loop, in the order of one step: (sampled) -> score -> pair -> learn -> sync -> sample
        ahead -> log -> save. With `async_steps = K` the batches of the next K steps are sampled
        (and, under Ray, scored) while this step trains; see `pipeline.py` for the schedule. On an
        error every role is closed (engines, ranks, reward workers, the run's own Ray cluster).
        SIGTERM or SIGINT: a checkpoint of the step reached is written, then `Preempted` (a wait
        for rollouts or a weight push is cut short, a learner step is finished; see
        `primitives/preemption.py`)."""
        try:
            with stop_signals() as stop:
                return self._train(resume_from_checkpoint, stop)
        except BaseException:
            try:
                self.close()
            except Exception as err:  # the training error is the one to report
                logger.warning("closing after a failed train() also failed: %s", err)
            raise

    def _train(self, resume_from_checkpoint, stop: StopRequest):
        args, state = self.args, self.state
        if self.roles.learner is None:
            raise RuntimeError("train(): this trainer was closed; build a new OnlineDPOTrainer")
        state.max_steps, state.num_train_epochs = self.max_steps, args.num_train_epochs
        state.train_batch_size = self.prompts_per_step
        state.compute_steps(args, self.max_steps)
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "auto"):
            # the command line's spellings; "auto": the newest complete checkpoint, or a fresh start
            # when there is none (what a retried `ray job submit` wants)
            fresh = resume_from_checkpoint.lower() == "auto" and not checkpoint.has_checkpoints(args.output_dir)
            resume_from_checkpoint = None if fresh else True
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):  # a folder: the ranks load from it
            resume_from_checkpoint = validation.absolute_if_local(resume_from_checkpoint)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoint.newest_complete(args.output_dir, checkpoint.required_files(self),
                                                                self.model)
        if resume_from_checkpoint:
            checkpoint.load(self, resume_from_checkpoint)
        # The logs go back to the step the run starts from: after a crash they hold rows of the
        # steps past the checkpoint, which run (and log) again; at step 0, an earlier run's rows.
        log_files.cut_to_step(args.output_dir, state.global_step, state.log_history)

        sums, counts, maxes, count, loss_sum = defaultdict(float), defaultdict(int), defaultdict(float), 0, 0.0
        train_start, first_step = time.time(), state.global_step
        self.control = self.callback_handler.on_train_begin(args, state, self.control)
        self.pipeline.request_ahead(state.global_step, self.publisher.version, self.max_steps)
        while state.global_step < self.max_steps and not self.control.should_training_stop:
            step = state.global_step
            epoch, position = self.pipeline.position_of(step)
            if position == 1:  # the first batch of an epoch (streaming data has no position)
                self.control = self.callback_handler.on_epoch_begin(args, state, self.control)
            self.control = self.callback_handler.on_step_begin(args, state, self.control)
            step_start = time.perf_counter()
            try:
                pairs, waited = self.pipeline.take(step, stop)  # score -> pair
            except StopWaiting:  # preempted while waiting: the learners have not moved, save the step reached
                saved = checkpoint.complete_folder(args.output_dir, state.global_step)  # saved at its end?
                if saved is None:
                    saved = checkpoint.save(self, stop.deadline(args.preemption_grace_s))
                    self.control = self.callback_handler.on_save(args, state, self.control)
                raise Preempted(stop[0], state.global_step, saved) from None
            self.training_epoch = epoch
            beta = args.beta_at(epoch)
            # learn
            start = time.perf_counter()
            metrics = self.learner.step(pairs.batch.for_learners(state.global_step, pairs.policy_version), beta)
            if args.sync_ref_model and (step + 1) % args.ref_model_sync_steps == 0:  # TR-DPO's reference refresh
                self.learner.refresh_reference(args.ref_model_mixup_alpha)
            metrics["time/train"] = time.perf_counter() - start
            # sync (after every weight_sync_steps-th step): the engines finish what they sample with
            # the old version, then serve the new one
            sync_cut_short = False
            if pushes_after(step, args.weight_sync_steps):
                try:
                    metrics.update(self._push(step + 1, stop))
                except StopWaiting:  # preempted during the sync: the step is logged and saved without it
                    sync_cut_short = True
            if not sync_cut_short:
                # sample (and, under Ray, score in the background) every batch the schedule now
                # allows (with a new version: step t + 1 + K, or its interval's), while the next step trains
                self.pipeline.request_ahead(step + 1, self.publisher.version, self.max_steps)
            metrics.update(pairs.metrics)
            metrics["objective/rlhf_reward"] = rlhf_reward(pairs.pair_scores, metrics["objective/non_score_reward"])
            metrics["beta"] = beta
            metrics["async/staleness"] = float(step - pairs.policy_version)
            metrics["time/wait_rollouts"] = waited
            metrics["time/step"] = time.perf_counter() - step_start

            state.global_step += 1
            state.epoch = self._epoch_progress(epoch, position)
            loss_sum += metrics["loss"]
            for key, value in metrics.items():  # sync/* only on the steps that push: averaged over those
                sums[key] += value
                counts[key] += 1
            maxes["async/staleness_max"] = max(maxes["async/staleness_max"], metrics["async/staleness"])
            maxes.update(self.roles.faults)  # totals so far (engine restarts, seconds they cost)
            count += 1
            self.control = self.callback_handler.on_step_end(args, state, self.control)
            if self.control.should_log:
                self._log_training(sums, counts, maxes, pairs.log_rows)
                sums, counts, maxes, count = defaultdict(float), defaultdict(int), defaultdict(float), 0
            if position == self.steps_per_epoch:
                self.control = self.callback_handler.on_epoch_end(args, state, self.control)
                if self.control.should_log and count:
                    self._log_training(sums, counts, maxes, pairs.log_rows)
                    sums, counts, maxes, count = defaultdict(float), defaultdict(int), defaultdict(float), 0
            if self.control.should_evaluate and not stop:  # preempted: the grace period is for the checkpoint
                self.evaluate()
            if self.control.should_save or stop:
                saved = checkpoint.save(self, stop.deadline(args.preemption_grace_s) if stop else None)
                self.control = self.callback_handler.on_save(args, state, self.control)
                self.control.should_save = False
            if stop:  # preempted: the step is done and saved
                raise Preempted(stop[0], state.global_step, saved)

        try:  # between two pushes (weight_sync_steps > 1): the engines serve the trained model
            self.sync_engines(stop)
        except StopWaiting:  # a stop during that push: training is over and saved as far as asked
            pass
        runtime = time.time() - train_start
        steps_done = max(state.global_step - first_step, 1)
        train_loss = loss_sum / steps_done
        summary = {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(steps_done * self.prompts_per_step * args.num_samples / runtime, 3),
            "train_steps_per_second": round(steps_done / runtime, 3),
            "total_flos": 0.0,
            "train_loss": train_loss,
        }
        self.log(summary)
        self.control = self.callback_handler.on_train_end(args, state, self.control)
        if args.plot_at_end:
            from odpo_vllm.run.plots import plot_training_curves

            plot_training_curves(state.log_history, os.path.join(args.output_dir, "training_curves.png"))
        return TrainOutput(state.global_step, train_loss, summary)

    # ------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop what this trainer started: engines, learner ranks, reward workers, the run's own
        Ray cluster (idempotent). The trainer is a context manager that closes on exit."""
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.close()
        roles = getattr(self, "roles", None)
        if roles is not None:
            roles.close()

    def __enter__(self) -> "OnlineDPOTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _epoch_progress(self, epoch: int, position: int | None) -> float:
        if position is not None:
            return epoch + position / self.steps_per_epoch
        return self.state.global_step / self.steps_per_epoch

    def _push(self, version: int, stop=None) -> dict[str, float]:
        """The engines finish what they sample with the version they serve, then serve the
        learners' weights as `version` (the publisher proves it with its probe)."""
        self.generator.drain(stop)
        return self.publisher.publish(version, stop)

    def sync_engines(self, stop=None) -> dict[str, float]:
        """Bring the engines to the learners' weights if a push is due (between two pushes of
        `weight_sync_steps`): evaluation and whatever samples after training see the current
        policy. Changes no training batch: every batch of the version served so far was requested
        (and is sampled) before this push."""
        if self.publisher.version == self.state.global_step:
            return {}
        return self._push(self.state.global_step, stop)

    def _log_training(self, sums, counts, maxes, log_rows):
        logs = {key: value / counts[key] for key, value in sums.items()}
        logs.update(maxes)
        logs.pop("truncated_prompts", None)
        self.log(logs)
        if self.args.log_completions:
            path = os.path.join(self.args.output_dir, log_files.COMPLETIONS_FILE)
            with open(path, "a") as f:
                for row in log_rows:
                    f.write(json.dumps({"step": self.state.global_step, **row}) + "\n")
            log_completion_pairs(self.args.report_to or [], self.callback_handler.callbacks, self.state.global_step,
                                 log_rows)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in logs.items()}
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        row = {**logs, "step": self.state.global_step}
        self.state.log_history.append(row)
        with open(os.path.join(self.args.output_dir, log_files.METRICS_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample pairs for every eval prompt with the current policy and report the training
        metrics (and loss) on them, without updating the model."""
        dataset = self._encode_eval(eval_dataset) if eval_dataset is not None else self._eval_encoded
        if dataset is None:
            raise ValueError("eval_dataset: evaluate() needs an eval_dataset (here or in the constructor)")
        if isinstance(dataset, dict):
            results = {}
            for name, part in dataset.items():
                results.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return results
        beta = self.args.beta_at(self.training_epoch)  # the epoch being trained, not state.epoch (1.0 at its end)
        self.sync_engines()  # the current policy samples, also between two pushes
        results = evaluate_prompts(dataset, self.roles, self.tokenizer, self.args, beta, self._rows,
                                   self.compute_metrics, metric_key_prefix)
        self.log(results)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=results)
        self.control.should_evaluate = False
        return results

    # ------------------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the policy (merged weights are not produced for PEFT: the adapter is saved) and
        the tokenizer, loadable with `from_pretrained`."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.learner.save_pretrained(os.path.abspath(output_dir))
        self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs):
        """Upload the saved model and tokenizer to `args.hub_model_id` (default: output_dir's name)."""
        from huggingface_hub import create_repo, upload_folder

        self.save_model()
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        token = token or self.args.hub_token
        create_repo(repo_id, token=token, private=self.args.hub_private_repo, exist_ok=True)
        return upload_folder(repo_id=repo_id, folder_path=self.args.output_dir, commit_message=commit_message,
                             token=token, revision=revision, run_as_future=not blocking,
                             ignore_patterns=["checkpoint-*", "*.pt", log_files.COMPLETIONS_FILE])
