"""`OnlineDPOTrainer`: the reference's API around one readable loop.

    for each step:  sample -> score -> pair -> learn -> sync -> log -> save (-> evaluate)

Who does each step is decided at construction (here: all in this process); the loop is the same
for every placement.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections import defaultdict

import torch
from transformers.trainer_callback import (
    CallbackHandler,
    DefaultFlowCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerControl,
    TrainerState,
)
from transformers.trainer_utils import EvalPrediction, TrainOutput

from . import checkpoint, validation
from .config import OnlineDPOConfig
from .console import configure_logging
from .data import IterablePromptBatches, PromptBatches, PromptEncoder, encode_dataset
from .generation import TransformersGenerator, step_seed
from .learner import Learner
from .objective import rlhf_reward
from .rewards import Rewards
from .rollout import collect_pairs
from .vllm_engine import VLLMGenerator, vllm_available

logger = logging.getLogger(__name__)

EVAL_SEED_SALT = 1


def _load_causal_lm(name_or_path: str, args: OnlineDPOConfig):
    from transformers import AutoModelForCausalLM

    kwargs = dict(args.model_init_kwargs or {})
    dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=args.trust_remote_code, **kwargs)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _model_context_length(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)


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
        configure_logging(args.log_level, own_handler=False)
        validation.check_inputs(model, ref_model, reward_funcs, args)
        self.data_collator = data_collator
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu")
        torch.manual_seed(args.seed)

        if args.placement != "in_process":
            model = self._model_path_for_ray(model, peft_config, ref_model)
        # ---- models
        if isinstance(model, str) and args.placement != "in_process":
            from transformers import AutoConfig, AutoTokenizer

            config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
            processing_class = processing_class or AutoTokenizer.from_pretrained(model)
            self._ray_model_path, model, ref_model = model, None, None
        elif isinstance(model, str):
            model = _load_causal_lm(model, args)
        if model is None:
            pass  # the learner ranks load the policy themselves
        elif not isinstance(model, torch.nn.Module):
            raise ValueError(f"model: expected a hub id, a path or a PreTrainedModel, got {type(model).__name__}")
        if processing_class is None:
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        validation.check_tokenizer(processing_class)  # pad = EOS where there is no pad token
        self.processing_class = processing_class
        if model is not None:
            model, ref_model = self._prepare_models(model, ref_model, peft_config)
        validation.check_models(model, ref_model, processing_class, config if model is None else None)
        self.model, self.ref_model = model, ref_model
        self.eos_token_ids = self._eos_token_ids(config if model is None else model)

        # ---- rewards
        self.rewards = Rewards(
            reward_funcs if reward_funcs is not None else args.reward_model_path,
            reward_processing_classes, args.reward_weights, args.missing_eos_penalty,
            args.model_init_kwargs, args.trust_remote_code, self.device,
        ) if (reward_funcs is not None or args.reward_model_path) else None
        if self.rewards is None:
            raise ValueError("reward_funcs: give a reward model, a callable or a judge (or set reward_model_path)")

        # ---- data
        context = _model_context_length(config if model is None else model)
        self.encoder = PromptEncoder(processing_class, context - args.max_new_tokens, args.max_new_tokens)
        self.train_dataset = encode_dataset(train_dataset, self.encoder)
        self.eval_dataset = self._encode_eval(eval_dataset)
        ranks = args.ray_learner_ranks if args.placement != "in_process" else 1
        self.prompts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * ranks
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

        # ---- roles: who samples and who learns (this process, or Ray actors)
        if args.placement == "in_process":
            optimizer, scheduler = optimizers
            self.learner = Learner(model, ref_model, args, processing_class.pad_token_id, self.max_steps,
                                   optimizer, scheduler)
            self.generator = self._build_generator(context)
        else:
            from .placement import build_roles

            max_model_len, probe = self._engine_context(context)
            self.learner, self.generator = build_roles(
                self._ray_model_path, processing_class, args, self.eos_token_ids, max_model_len, probe,
                self.max_steps, self.prompts_per_step)
            self.generator.sync_weights(self.learner)  # engines start with dummy weights

        # ---- callbacks, state
        from transformers.integrations import get_reporting_integration_callbacks

        default = [DefaultFlowCallback] + get_reporting_integration_callbacks(args.report_to)
        default.append(PrinterCallback if args.disable_tqdm else ProgressCallback)
        self.callback_handler = CallbackHandler(
            default + list(callbacks or []), self.model, processing_class,
            getattr(self.learner, "optimizer", None), getattr(self.learner, "scheduler", None),
        )
        self.state = TrainerState(is_local_process_zero=True, is_world_process_zero=True)
        self.control = TrainerControl()
        self.control = self.callback_handler.on_init_end(args, self.state, self.control)
        os.makedirs(args.output_dir, exist_ok=True)

    def _build_generator(self, context: int):
        """vLLM where it is installed (or asked for), else transformers' `generate` on the policy."""
        args = self.args
        use_vllm = args.use_vllm if args.use_vllm is not None else vllm_available()
        if not use_vllm:
            return TransformersGenerator(
                self.model, self.eos_token_ids, self.processing_class.pad_token_id, args.sampling_settings(),
                args.generation_batch_size, self.learner.autocast_dtype,
            )
        max_model_len, probe = self._engine_context(context)
        generator = VLLMGenerator(self.model, self.processing_class, args, self.eos_token_ids, max_model_len,
                                  probe_ids=probe, max_sequences=self.prompts_per_step * args.num_samples)
        generator.sync_weights(self.learner)  # the engine starts with dummy weights
        return generator

    def _engine_context(self, context: int) -> tuple[int, list[int]]:
        """The engines' max_model_len (longest prompt + max_new_tokens, capped by the model) and the
        probe: a fixed sequence scored by engine and learner after every sync."""
        from datasets import Dataset

        args = self.args
        longest = context - args.max_new_tokens  # streaming data: any prompt the model can take
        first_prompt = None
        if isinstance(self.train_dataset, Dataset):
            evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
            parts = [self.train_dataset] + [part for part in evals if isinstance(part, Dataset)]
            longest = max(len(ids) for part in parts for ids in part["prompt_ids"])
            first_prompt = self.train_dataset[0]["prompt_ids"]
        max_model_len = args.vllm_max_model_len or min(context, longest + args.max_new_tokens)
        probe = (first_prompt or [self.processing_class.eos_token_id]) * 2
        return max_model_len, probe[: max_model_len - 1]

    def _model_path_for_ray(self, model, peft_config, ref_model):
        """Learner ranks and engines load the policy themselves: they need a path."""
        if peft_config is not None:
            raise ValueError("peft_config: LoRA is supported with placement='in_process' only for now")
        if ref_model is not None:
            raise ValueError("ref_model: with a Ray placement the reference is a frozen copy of the policy; "
                             "pass ref_model=None")
        if isinstance(model, str):
            return model
        path = os.path.join(self.args.output_dir, "initial_policy")
        model.save_pretrained(path)
        return path

    def _prepare_models(self, model, ref_model, peft_config):
        """In-process policy and reference: PEFT, frozen copy, dropout off, device, checkpointing."""
        args = self.args
        if isinstance(ref_model, str):
            ref_model = _load_causal_lm(ref_model, args)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        elif ref_model is None:
            ref_model = copy.deepcopy(model)
        if args.disable_dropout:
            disable_dropout(model)
            if ref_model is not None:
                disable_dropout(ref_model)
        if ref_model is not None:
            ref_model = ref_model.to(self.device).eval().requires_grad_(False)
        model = model.to(self.device)
        if args.gradient_checkpointing:
            kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if peft_config is not None and kwargs.get("use_reentrant", True):
                model.enable_input_require_grads()
        return model, ref_model

    # ------------------------------------------------------------------------------ helpers
    @property
    def optimizer(self):
        return self.learner.optimizer

    @property
    def lr_scheduler(self):
        return self.learner.scheduler

    def _eos_token_ids(self, model_or_config) -> set[int]:
        ids = {self.processing_class.eos_token_id}
        source = getattr(model_or_config, "generation_config", model_or_config)
        config_eos = getattr(source, "eos_token_id", None)
        if config_eos is not None:
            ids |= set(config_eos if isinstance(config_eos, list) else [config_eos])
        return {i for i in ids if i is not None}

    def _encode_eval(self, eval_dataset):
        if eval_dataset is None:
            return None
        if isinstance(eval_dataset, dict):
            return {
                name: encode_dataset(ds, PromptEncoder(self.encoder.tokenizer, self.encoder.max_prompt_tokens,
                                                       self.encoder.max_new_tokens, f"eval_dataset[{name!r}]"))
                for name, ds in eval_dataset.items()
            }
        return encode_dataset(eval_dataset, PromptEncoder(self.encoder.tokenizer, self.encoder.max_prompt_tokens,
                                                          self.encoder.max_new_tokens, "eval_dataset"))

    def _rows(self, rows: list[dict]) -> list[dict]:
        """Apply a user data_collator if given: it may rewrite rows (e.g. add columns)."""
        if self.data_collator is None:
            return rows
        out = self.data_collator(rows)
        if not isinstance(out, list) or not all("prompt_ids" in r for r in out):
            raise ValueError("data_collator: must return a list of row dicts that keep 'prompt' and 'prompt_ids'")
        return out

    def add_callback(self, callback):
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback):
        self.callback_handler.remove_callback(callback)

    # ------------------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        args, state = self.args, self.state
        state.max_steps, state.num_train_epochs = self.max_steps, args.num_train_epochs
        state.train_batch_size = self.prompts_per_step
        state.compute_steps(args, self.max_steps)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoint.newest_complete(args.output_dir, checkpoint.required_files(self),
                                                                self.model)
        if resume_from_checkpoint:
            checkpoint.load(self, resume_from_checkpoint)

        sums, count, loss_sum = defaultdict(float), 0, 0.0
        train_start, first_step = time.time(), state.global_step
        self.control = self.callback_handler.on_train_begin(args, state, self.control)
        while state.global_step < self.max_steps and not self.control.should_training_stop:
            # a new epoch starts when the previous one is used up (position == steps_per_epoch)
            if getattr(self.batches, "position", None) in (0, self.steps_per_epoch):
                self.control = self.callback_handler.on_epoch_begin(args, state, self.control)
            self.control = self.callback_handler.on_step_begin(args, state, self.control)
            step_start = time.perf_counter()
            _, rows = self.batches.next()
            beta = args.beta_at(self.batches.epoch)  # after next(), which rolls the epoch over
            rows = self._rows(rows)

            # sample -> score -> pair
            pairs = collect_pairs(rows, self.generator, self.rewards, self.processing_class,
                                  args.num_samples, step_seed(args.seed, state.global_step))
            # learn
            start = time.perf_counter()
            metrics = self.learner.step(pairs.batch, beta)
            metrics["time/train"] = time.perf_counter() - start
            # sync: the generator serves the new weights before it samples again
            metrics.update(self.generator.sync_weights(self.learner))
            metrics.update(pairs.metrics)
            metrics["objective/rlhf_reward"] = rlhf_reward(pairs.pair_scores, metrics["objective/non_score_reward"])
            metrics["beta"] = beta
            metrics["time/step"] = time.perf_counter() - step_start

            state.global_step += 1
            state.epoch = self._epoch_progress()
            loss_sum += metrics["loss"]
            for key, value in metrics.items():
                sums[key] += value
            count += 1
            self.control = self.callback_handler.on_step_end(args, state, self.control)
            if self.control.should_log:
                self._log_training(sums, count, pairs.log_rows)
                sums, count = defaultdict(float), 0
            if getattr(self.batches, "position", None) == self.steps_per_epoch:
                self.control = self.callback_handler.on_epoch_end(args, state, self.control)
                if self.control.should_log and count:
                    self._log_training(sums, count, pairs.log_rows)
                    sums, count = defaultdict(float), 0
            if self.control.should_evaluate:
                self.evaluate()
            if self.control.should_save:
                checkpoint.save(self)
                self.control = self.callback_handler.on_save(args, state, self.control)
                self.control.should_save = False

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
            from .plots import plot_training_curves

            plot_training_curves(state.log_history, os.path.join(args.output_dir, "training_curves.png"))
        return TrainOutput(state.global_step, train_loss, summary)

    def _epoch_progress(self) -> float:
        if hasattr(self.batches, "position"):
            return self.batches.epoch + self.batches.position / self.steps_per_epoch
        return self.state.global_step / self.steps_per_epoch

    def _log_training(self, sums, count, log_rows):
        logs = {key: value / count for key, value in sums.items()}
        logs.pop("truncated_prompts", None)
        self.log(logs)
        if self.args.log_completions:
            path = os.path.join(self.args.output_dir, "completions.jsonl")
            with open(path, "a") as f:
                for row in log_rows:
                    f.write(json.dumps({"step": self.state.global_step, **row}) + "\n")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in logs.items()}
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        row = {**logs, "step": self.state.global_step}
        self.state.log_history.append(row)
        with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample pairs for every eval prompt with the current policy and report the training
        metrics (and loss) on them, without updating the model."""
        dataset = self._encode_eval(eval_dataset) if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("eval_dataset: evaluate() needs an eval_dataset (here or in the constructor)")
        if isinstance(dataset, dict):
            results = {}
            for name, part in dataset.items():
                results.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return results
        args = self.args
        beta = args.beta_at(self.batches.epoch)  # the epoch being trained, not state.epoch (1.0 at its end)
        batches = PromptBatches(dataset, args.per_device_eval_batch_size * args.gradient_accumulation_steps,
                                args.seed, shuffle=False)
        sums, total = defaultdict(float), 0
        start = time.perf_counter()
        for index in range(len(batches)):
            _, rows = batches.next()
            pairs = collect_pairs(self._rows(rows), self.generator, self.rewards, self.processing_class,
                                  args.num_samples, step_seed(args.seed, index, EVAL_SEED_SALT))
            metrics = self.learner.evaluate(pairs.batch, beta)
            metrics.update(pairs.metrics)
            metrics["objective/rlhf_reward"] = rlhf_reward(pairs.pair_scores, metrics["objective/non_score_reward"])
            if self.compute_metrics is not None:
                prediction = EvalPrediction(predictions=pairs.pair_scores.numpy(), label_ids=None)
                metrics.update(self.compute_metrics(prediction))
            for key, value in metrics.items():
                sums[key] += value * len(rows)
            total += len(rows)
        results = {f"{metric_key_prefix}_{k}": v / total for k, v in sums.items() if not k.startswith("time/")}
        results[f"{metric_key_prefix}_runtime"] = time.perf_counter() - start
        results[f"{metric_key_prefix}_samples_per_second"] = total * args.num_samples / results[
            f"{metric_key_prefix}_runtime"]
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
        if self.model is None:  # Ray placement: the learner ranks hold the policy
            self.learner.save_pretrained(os.path.abspath(output_dir))
        else:
            self.model.save_pretrained(output_dir, safe_serialization=True)
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
                             ignore_patterns=["checkpoint-*", "*.pt", "completions.jsonl"])
