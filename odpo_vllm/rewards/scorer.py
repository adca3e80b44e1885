"""Rewards: reward models, Python callables and pairwise judges -> one score per completion."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

from odpo_vllm.data import is_conversational
from odpo_vllm.multimodal import IMAGE_COLUMNS, text_only_messages
from odpo_vllm.core.objective import apply_missing_eos_penalty
from odpo_vllm.validation import check_reward_model, reward_values

logger = logging.getLogger(__name__)

REWARD_BATCH_ROWS = 64  # completions per reward-model forward


def accepted_columns(func, columns: dict[str, list]) -> dict[str, list]:
    """The dataset columns a reward callable receives as keywords: all of them (as the reference
    passes them), except an image column the callable takes neither by name nor through **kwargs."""
    import inspect

    if not any(name in columns for name in IMAGE_COLUMNS):
        return columns
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins): pass everything
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return columns
    return {key: value for key, value in columns.items() if key not in IMAGE_COLUMNS or key in parameters}


def _is_judge(obj) -> bool:
    return hasattr(obj, "judge") and callable(obj.judge)


class Rewards:
    """Scores completions with every reward function and combines them.

    - a reward model (path, hub id or `PreTrainedModel` with one label) reads the prompt and
      completion through its own tokenizer and chat template;
    - a callable `f(prompts, completions, completion_ids, **columns) -> list[float | None]`; None
      means "no opinion" and is left out of the weighted sum;
    - a pairwise judge (object with `.judge(prompts, [[a, b], ...]) -> [0 or 1, ...]`, index of the
      better completion) replaces reward functions: the preferred completion scores 1, the other 0.
    """

    def __init__(self, reward_funcs, reward_processing_classes=None, reward_weights=None,
                 missing_eos_penalty: float | None = None, model_init_kwargs: dict | None = None,
                 trust_remote_code: bool = False, device: torch.device | str = "cpu", load_models: bool = True):
        """`load_models=False`: reward models are scored elsewhere (reward-worker actors, which pass
        their columns to `score`); here they keep only their place and name."""
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs: give at least one reward model, callable or judge")
        self.device = torch.device(device)
        self.missing_eos_penalty = missing_eos_penalty
        self.judge = None
        if any(_is_judge(f) for f in funcs):
            if len(funcs) != 1:
                raise ValueError("reward_funcs: a pairwise judge cannot be combined with other reward functions")
            self.judge = funcs[0]
            self.funcs, self.tokenizers, self.names = [], [], ["judge"]
            self.model_specs, self.model_indices = [], []
            self.weights = torch.ones(1)
            return

        processing = reward_processing_classes
        if processing is not None and not isinstance(processing, (list, tuple)):
            processing = [processing]
        if processing is not None and len(processing) != len(funcs):
            raise ValueError(
                f"reward_processing_classes: got {len(processing)} for {len(funcs)} reward functions; "
                "give one per reward function (None for callables)"
            )
        self.funcs, self.tokenizers, self.names = [], [], []
        self.model_specs: list[tuple] = []  # (model or path, tokenizer) of each reward model, in order
        self.model_indices = [j for j, func in enumerate(funcs) if isinstance(func, (str, torch.nn.Module))]
        for i, func in enumerate(funcs):
            tokenizer = processing[i] if processing is not None else None
            if isinstance(func, (str, torch.nn.Module)):
                self.model_specs.append((func, tokenizer))
            if not load_models and isinstance(func, (str, torch.nn.Module)):
                name = func if isinstance(func, str) else func.config._name_or_path
                self.names.append(str(name).rstrip("/").split("/")[-1] or f"model_{i}")
                self.funcs.append(None)
                self.tokenizers.append(None)
                continue
            if isinstance(func, str):
                func, tokenizer = self._load_reward_model(func, tokenizer, model_init_kwargs or {}, trust_remote_code)
            if isinstance(func, torch.nn.Module):
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(func.config._name_or_path)
                check_reward_model(func, tokenizer, i, func.config._name_or_path or type(func).__name__)
                func = func.to(self.device).eval().requires_grad_(False)
                if func.config.pad_token_id is None:
                    func.config.pad_token_id = tokenizer.pad_token_id
                self.names.append(func.config._name_or_path.rstrip("/").split("/")[-1] or f"model_{i}")
            elif callable(func):
                self.names.append(getattr(func, "__name__", f"func_{i}"))
            else:
                raise ValueError(
                    f"reward_funcs[{i}]: {type(func).__name__} is neither a model path, a model, a callable nor a judge"
                )
            self.funcs.append(func)
            self.tokenizers.append(tokenizer)
        if reward_weights is None:
            self.weights = torch.ones(len(self.funcs))
        else:
            if len(reward_weights) != len(self.funcs):
                raise ValueError(
                    f"reward_weights: got {len(reward_weights)} weights for {len(self.funcs)} reward functions; "
                    "give one weight per reward function"
                )
            self.weights = torch.tensor(reward_weights, dtype=torch.float32)

    @staticmethod
    def _load_reward_model(path, tokenizer, init_kwargs, trust_remote_code):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        kwargs = {k: v for k, v in init_kwargs.items() if k not in ("num_labels",)}
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
            )
        except (RuntimeError, ValueError) as err:
            if "size mismatch" not in str(err) and "ignore_mismatched_sizes" not in str(err):
                raise
            raise ValueError(
                f"reward_funcs ({path}): its score head does not have one label (num_labels=1), so it is not a "
                "reward model for one score per sequence; give a reward model trained with num_labels=1"
            ) from err
        untrained = [key for key in loading.get("missing_keys", ()) if "score" in key or "classifier" in key]
        if untrained:
            raise ValueError(
                f"reward_funcs ({path}): the checkpoint has no trained score head ({', '.join(sorted(untrained))} "
                "would start random), e.g. a causal language model or a GGUF file of one; give a reward model "
                "trained as AutoModelForSequenceClassification with num_labels=1"
            )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return model, tokenizer

    # ----------------------------------------------------------------------------------------
    def model_table(self, prompts: list[Any], completions: list[str]) -> torch.Tensor:
        """(N, number of reward models): every reward model's score of every completion, in
        batches of `REWARD_BATCH_ROWS` (what a reward-worker actor computes)."""
        models = [(f, t) for f, t in zip(self.funcs, self.tokenizers) if isinstance(f, torch.nn.Module)]
        table = torch.empty(len(completions), len(models))
        for j, (model, tokenizer) in enumerate(models):
            for start in range(0, len(completions), REWARD_BATCH_ROWS):
                stop = start + REWARD_BATCH_ROWS
                table[start:stop, j] = self._model_scores(model, tokenizer, prompts[start:stop], completions[start:stop])
        return table

    def score(self, prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
              columns: dict[str, list], contains_eos: torch.Tensor,
              model_table: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Scores of k*B completions (block layout; `prompts` and `columns` already repeated k
        times to match). Returns the combined scores and the mean of each reward function.
        `model_table`: the reward models' scores computed elsewhere (`model_table` of the same
        functions), used instead of running them here."""
        conversational = is_conversational(prompts[0])
        shown = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
        if self.judge is not None:
            scores = self._judge(prompts, completions)
            per_func = {"rewards/judge": scores.mean().item()}
        else:
            table = torch.full((len(completions), len(self.funcs)), math.nan)
            if self.model_indices:
                computed = model_table if model_table is not None else self.model_table(prompts, completions)
                table[:, self.model_indices] = computed
            for j, func in enumerate(self.funcs):
                if j in self.model_indices:
                    continue
                else:
                    values = func(prompts=prompts, completions=shown, completion_ids=completion_ids,
                                  **accepted_columns(func, columns))
                    table[:, j] = torch.tensor(reward_values(values, self.names[j], len(completions)))
            check_step_scores(table, self.names)
            scores = torch.nansum(table * self.weights, dim=1)
            per_func = {f"rewards/{name}": torch.nanmean(table[:, j]).item() for j, name in enumerate(self.names)}
        return apply_missing_eos_penalty(scores, contains_eos, self.missing_eos_penalty), per_func

    @torch.no_grad()
    def _model_scores(self, model, tokenizer, prompts, completions) -> torch.Tensor:
        if is_conversational(prompts[0]):
            prompts = [text_only_messages(p) for p in prompts]  # a text reward model reads no images
            texts = [
                tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
                for p, c in zip(prompts, completions)
            ]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False, padding_side="right")
        logits = model(**{k: v.to(self.device) for k, v in batch.items()}).logits
        scores = logits[:, 0].float().cpu()
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            name = model.config._name_or_path or type(model).__name__
            raise ValueError(f"reward model {name!r} scored completion {bad[0]} {scores[bad[0]].item()}; its weights "
                             f"or inputs are broken ({len(bad)} non-finite scores in this step)")
        return scores

    def _judge(self, prompts, completions) -> torch.Tensor:
        half = len(completions) // 2
        if half * 2 != len(completions):
            raise ValueError("a pairwise judge needs num_samples=2")
        pairs = [[completions[i], completions[half + i]] for i in range(half)]
        texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts[:half]]
        better = self.judge.judge(texts, pairs)
        scores = torch.zeros(len(completions))
        for i, b in enumerate(better):
            if b not in (0, 1):
                raise ValueError(f"judge returned {b!r} for pair {i}; expected 0 or 1 (index of the better one)")
            scores[i if b == 0 else half + i] = 1.0
        return scores


def check_step_scores(table: torch.Tensor, names: list[str]) -> None:
    """`table` (completions x functions, NaN = None: no opinion). A step in which no completion got
    a score stops the run: its pairs would be arbitrary. Prompts none of whose completions got a
    score are tie-broken (sample 0 chosen), with a warning."""
    unscored = torch.isnan(table).all(dim=1)
    if bool(unscored.all()):
        raise ValueError(
            f"reward_funcs: no completion of this step got a score: {', '.join(map(repr, names))} returned None "
            f"for all {table.shape[0]} completions. None means 'no opinion'; return a float for the completions "
            "a function can judge, or remove the prompts no function can judge from the dataset"
        )
    if unscored.any():
        logger.warning("%d of %d completions got None from every reward function (no opinion); they score 0, so a "
                       "prompt without any score is paired by the tie rule (first sample chosen)",
                       int(unscored.sum()), table.shape[0])


class PairwiseJudge:
    """Wraps `fn(prompts, [[completion_a, completion_b], ...]) -> [0 | 1, ...]` (index of the
    better completion of each pair) so it can be passed as `reward_funcs`."""

    def __init__(self, fn: Callable[[list[str], list[list[str]]], list[int]]):
        self.fn = fn

    def judge(self, prompts: list[str], completions: list[list[str]]) -> list[int]:
        return list(self.fn(prompts, completions))
