"""Step-by-step equivalence with TRL 1.16's OnlineDPOTrainer, teacher-forced (issue 28, item 1).

The same random-init tiny model (`odpo_vllm.toy`: a Qwen2 shape, hidden 64, 2 layers, the toy byte-level
BPE with 400 entries), the same prompts in the same order, the same seed and settings. One trainer
samples its completions for N steps; the other is fed the very same sampled ids (teacher forcing), so
that everything the two trainers do to the data before the loss, and in the optimisation step, can be
compared at each step on equal inputs:

    prompt      the prompt text after the chat template (what is tokenized)
    prompt_ids  its token ids (TRL: left padding removed)
    model_in    the prompt tokens the logprob pass sees for each sequence (after max_length truncation)
    completion  the completion ids that count (TRL: mask 1; ours: kept after the first EOS)
    text        the decoded completions the reward function receives
    rf_ids      the completion_ids the reward function receives
    rewards     the scores after the weights and missing_eos_penalty
    pairs       which sample of each prompt is chosen (TRL: first_half >= second_half, TRL's own rule)
    logp        per-sequence sums of the completion logprobs under the policy
    ref_logp    the same under the reference
    loss        the loss of the step (mean over pairs)
    grad_norm   the gradient norm before clipping (what clip_grad_norm_ returns)
    grad        the gradients the optimizer steps with (after clipping), all trainable parameters
    update      the parameter change of the optimizer step
    lr          the learning rate of every parameter group at the optimizer step
    init        the trainable parameters before the first step (LoRA: the adapter's initialisation)

Ids and texts must be equal; floats are compared as max|a - b| / max|a| over the step's vector
(tolerance `--rtol`, 1e-5). Each cell of the table is `=` (the largest error over the steps in
brackets for floats) or the first step that diverged and the size of its divergence.

Hooks, not copies: TRL is observed through its own methods (`_generate`'s tokenizer call and
`model.generate`, `_forward`, `_calculate_rewards_from_functions`, `training_step`), ours through the
sampler's `submit` / `_sample`, the reward scorer, `select_pairs`, the learner's `completion_logprobs`
and `_pair_pass`; both through `torch.nn.utils.clip_grad_norm_` and torch's global optimizer step
hooks. Replay: TRL's sampled rows are returned by a stand-in for TRL's `model.generate`, so TRL's own
tokenization, `truncate_right` and masks run on them; ours' by a stand-in for the sampler's `submit`
(through `finish_rollouts`, our EOS cut) or `_sample`.

Known, explained divergence: TRL 1.16's online trainer never calls its `tokenize_row`; `_generate`
tokenizes with add_special_tokens=False and prepends no BOS, while odpo_vllm follows tokenize_row
(DESIGN.md): with a BOS tokenizer the prompt ids differ by that leading BOS (and everything computed
from them). `--trl-bos` makes TRL's tokenizer apply tokenize_row's BOS rule, so the rest can be compared
on equal inputs.

    python benchmarks/trl_equivalence.py                 # every config, 10 steps, each sampler
    python benchmarks/trl_equivalence.py --configs text,padded-bos --steps 5 --samplers TRL --trl-bos
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402

import torch  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

PROMPTS_PER_STEP = 4
SETTINGS = dict(learning_rate=5e-3, temperature=1.0, beta=0.1, max_new_tokens=8)
MAX_LENGTH = 128
TOKENIZER_ENTRIES = 400  # the toy BPE's size (its 4 specials included); a <bos> makes it 401
PADDED_ROWS = 416  # embedding rows of the padded-vocabulary configs

CONFIGS = {  # name: what differs from plain-text prompts, an unpadded vocabulary, no BOS, full fine-tuning
    "text": {},
    "chat": {"conversational": True},
    "padded": {"vocab_rows": PADDED_ROWS},
    "bos": {"bos": True},
    "padded-bos": {"vocab_rows": PADDED_ROWS, "bos": True},  # issue 28's task
    "chat-bos": {"conversational": True, "bos": True},
    "lora": {"lora": True},
    "eos-penalty": {"missing_eos_penalty": 1.0},
    "truncation": {"max_length": 10},  # prompts (6-7 tokens) + completions (<= 8) cut by max_length
}

KINDS = ("sampling", "prompt", "prompt_ids", "model_in", "completion", "text", "rf_ids", "rewards", "pairs", "logp",
         "ref_logp", "loss", "grad_norm", "grad", "update", "lr", "init")
ID_KINDS = {"sampling", "prompt", "prompt_ids", "model_in", "completion", "text", "rf_ids", "pairs"}
FLOOR_FACTOR = 10  # a float diverges beyond 10x the rounding error of ours against itself (see `compare`)
BOS_NOTE = "BOS: ours follows tokenize_row, TRL 1.16 skips it"
RF_PAD_NOTE = "TRL passes reward functions the rows padded to the batch's width, ours the ids that count"
TRUNC_NOTE = "max_length: TRL cuts the batch's overflow from every row, ours each row's own (README differences)"


def letter_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """A character-level reward on the decoded completion: the share of its characters that are 'e'
    (dense at random init; completions without one tie at 0, which exercises the tie rule)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [t.lower().count("e") / max(len(t), 1) for t in texts]


@dataclass
class Task:
    name: str = "text"
    conversational: bool = False
    vocab_rows: int | None = None  # None: the tokenizer's length
    bos: bool = False
    lora: bool = False
    missing_eos_penalty: float | None = None
    max_length: int = MAX_LENGTH
    steps: int = 10
    seed: int = 0
    trl_bos: bool = False  # TRL's tokenizer applies tokenize_row's BOS rule
    folder: str = ""

    @property
    def model_path(self) -> str:
        return os.path.join(self.folder, f"model_{'bos' if self.bos else 'nobos'}_{self.vocab_rows or 'exact'}")

    def lora_config(self):
        if not self.lora:
            return None
        from peft import LoraConfig

        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")

    def rows(self) -> list[dict]:
        """The prompts of every step, flattened, in the order odpo_vllm's trainer draws them."""
        from odpo_vllm import toy
        from odpo_vllm.data import PromptBatches

        rows = toy.prompts(self.steps * PROMPTS_PER_STEP, conversational=self.conversational, seed=self.seed)
        batches = PromptBatches(list(range(len(rows))), PROMPTS_PER_STEP, self.seed)
        return [rows[i] for _ in range(self.steps) for i in batches.next()[0]]


def build_model(task: Task) -> str:
    """The toy tokenizer (with `<bos>` if asked) and a random-init model of `vocab_rows` rows (seed 0)."""
    from transformers import AutoModelForCausalLM

    from odpo_vllm import toy

    path = task.model_path
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = toy.build_tokenizer(TOKENIZER_ENTRIES)
    if task.bos:
        tokenizer.add_special_tokens({"bos_token": "<bos>"})
    config = toy.model_config(tokenizer, vocab_size=task.vocab_rows or len(tokenizer),
                              bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ============================================================================================
# Recording
# ============================================================================================
@dataclass
class Step:
    """What one trainer did at one step; sequences in block layout (row j*B + i: sample j of prompt i)."""

    prompt: list = field(default_factory=list)
    prompt_ids: list = field(default_factory=list)
    model_in: list = field(default_factory=list)  # per sequence
    completion: list = field(default_factory=list)
    text: list = field(default_factory=list)
    rf_ids: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    pairs: list = field(default_factory=list)  # chosen sample (0 or 1) per prompt
    logp: list = field(default_factory=list)
    ref_logp: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    grad: torch.Tensor | None = None
    update: torch.Tensor | None = None
    lr: list = field(default_factory=list)
    init: torch.Tensor | None = None
    sampling: dict | None = None  # (step 0) the generation config `generate` ends up with
    raw: list = field(default_factory=list)  # the sampled rows (as the sampler returned them), for replay


@dataclass
class Trace:
    system: str
    steps: list[Step]
    names: list[str]  # trainable parameter names, in the order of the flattened vectors


class Recorder:
    """Global pieces both trainers go through: clip_grad_norm_ and the optimizer step hooks."""

    def __init__(self):
        self.params: list = []
        self.steps: list[Step] = []
        self.before: torch.Tensor | None = None

    def track(self, model) -> None:
        """The trainable parameters whose gradients, updates and initial values are recorded."""
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @property
    def current(self) -> Step:
        return self.steps[-1]

    def flat(self, attr: str) -> torch.Tensor:
        parts = []
        for _, p in self.params:
            value = getattr(p, attr) if attr == "grad" else p.data
            parts.append(torch.zeros(p.numel()) if value is None else value.detach().float().reshape(-1).clone())
        return torch.cat(parts)

    @contextlib.contextmanager
    def hooks(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        clip = torch.nn.utils.clip_grad_norm_

        def clipping(parameters, max_norm, *args, **kwargs):
            norm = clip(parameters, max_norm, *args, **kwargs)
            self.current.grad_norm.append(float(norm))
            return norm

        def pre(optimizer, args, kwargs):
            self.current.grad = self.flat("grad")
            self.current.lr = [group["lr"] for group in optimizer.param_groups if group["params"]]
            self.before = self.flat("data")

        def post(optimizer, args, kwargs):
            self.current.update = self.flat("data") - self.before

        handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        torch.nn.utils.clip_grad_norm_ = clipping
        try:
            yield self
        finally:
            torch.nn.utils.clip_grad_norm_ = clip
            for handle in handles:
                handle.remove()


SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                   "repetition_penalty", "no_repeat_ngram_size", "max_new_tokens", "min_new_tokens", "eos_token_id",
                   "pad_token_id", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "renormalize_logits")


@contextlib.contextmanager
def generation_config_capture(found: dict):
    """The generation config `generate` builds its logits processors from (after transformers merged
    the caller's config with the model's), its sampling fields into `found`."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin._get_logits_processor

    def capture(self, generation_config, *args, **kwargs):
        if not found:
            for name in SAMPLING_FIELDS:
                value = getattr(generation_config, name, None)
                if name == "eos_token_id" and value is not None:
                    value = sorted(value if isinstance(value, (list, tuple)) else [value])
                found[name] = value
        return original(self, generation_config, *args, **kwargs)

    GenerationMixin._get_logits_processor = capture
    try:
        yield found
    finally:
        GenerationMixin._get_logits_processor = original


def recording_reward(recorder: Recorder):
    def reward(prompts, completions, completion_ids=None, **kwargs):
        step = recorder.current
        step.text = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        step.rf_ids = [[int(t) for t in ids] for ids in completion_ids]
        return letter_reward(prompts, completions, completion_ids)

    reward.__name__ = "letter_reward"
    return reward


def _quiet():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "odpo_vllm", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ============================================================================================
# TRL 1.16
# ============================================================================================
def bos_rule_tokenizer(tokenizer, task: Task, recorder_ref: list):
    """TRL's tokenizer instance, its class swapped for a subclass whose batch call (the one in
    `_generate`: text=list, left padding) records the prompt texts and, with `task.trl_bos`, tokenizes
    each prompt by tokenize_row's rule (add_special_tokens=False, BOS in front unless already there)."""
    base = type(tokenizer)

    class Recording(base):
        def __call__(self, text=None, *args, **kwargs):
            recorder = recorder_ref[0] if recorder_ref else None
            if recorder is None or not isinstance(text, list) or kwargs.get("padding_side") != "left":
                return super().__call__(text, *args, **kwargs)
            recorder.current.prompt = list(text)
            if not task.trl_bos or self.bos_token_id is None:
                return super().__call__(text, *args, **kwargs)
            rows = [{"prompt": t} for t in text]
            from trl.experimental.online_dpo import OnlineDPOTrainer

            ids = [OnlineDPOTrainer.tokenize_row(r, False, self)["prompt_input_ids"] for r in rows]
            return self.pad({"input_ids": ids}, padding=True, padding_side="left",
                            return_tensors=kwargs.get("return_tensors"))

    Recording.__name__ = base.__name__
    tokenizer.__class__ = Recording
    return tokenizer


def run_trl(task: Task, replay: list | None = None) -> Trace:
    """TRL's trainer for `task.steps` steps; `replay`: per step, the completion rows to return instead of
    sampling (block layout), else it samples and the rows are recorded."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    _quiet()
    path = build_model(task)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    recorder_ref: list = []
    tokenizer = bos_rule_tokenizer(AutoTokenizer.from_pretrained(path), task, recorder_ref)
    out = tempfile.mkdtemp(prefix="trl_eq_trl_")
    args = OnlineDPOConfig(
        **SETTINGS, per_device_train_batch_size=PROMPTS_PER_STEP, seed=task.seed, max_steps=task.steps,
        max_length=task.max_length, missing_eos_penalty=task.missing_eos_penalty, output_dir=out,
        gradient_accumulation_steps=1, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        gradient_checkpointing=False, bf16=False, use_cpu=True, train_sampling_strategy="sequential",
        dataloader_num_workers=0)
    recorder = Recorder()
    recorder_ref.append(recorder)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=recording_reward(recorder), args=args,
                               processing_class=tokenizer, train_dataset=Dataset.from_list(task.rows()),
                               peft_config=task.lora_config())
    trainer.remove_callback(PrinterCallback)
    recorder.track(trainer.model)  # the model TRL trains (PEFT-wrapped with LoRA)
    init = recorder.flat("data")
    sampling: dict = {}
    recorder_ref.clear()  # the probe's prompt text is not a step's
    with torch.random.fork_rng(), generation_config_capture(sampling):
        trainer._generate(trainer.model, [task.rows()[0]["prompt"]])
    recorder_ref.append(recorder)

    policy = trainer.model
    original_generate = policy.generate

    def generate(*a, input_ids=None, **kw):
        if replay is None:
            output = original_generate(*a, input_ids=input_ids, **kw)
            recorder.current.raw = output[:, input_ids.shape[1]:].tolist()
            return output
        rows = replay[len(recorder.steps) - 1]
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        completions = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=input_ids.dtype)
        recorder.current.raw = [list(r) for r in rows]
        return torch.cat([input_ids, completions.to(input_ids.device)], dim=1)

    policy.generate = generate

    original_forward = trainer._forward

    def forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None):
        seen = {}
        had = "forward" in model.__dict__
        inner = model.forward

        def capture(input_ids=None, *a, **kw):
            seen["ids"], seen["mask"] = input_ids, kw.get("attention_mask")
            return inner(input_ids, *a, **kw)

        model.forward = capture
        try:
            logprobs = original_forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs)
        finally:
            if had:
                model.forward = inner
            else:
                del model.forward
        step = recorder.current
        mask = completion_mask.bool()
        sums = (logprobs.detach() * mask).sum(1).tolist()
        if not step.logp:  # the first call is the policy's (with grad), the second the reference's
            step.logp = sums
            step.prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)][: len(sums) // 2]
            width = seen["ids"].shape[1] - completion_ids.shape[1]
            step.model_in = [ids[:width][m[:width].bool()].tolist() for ids, m in zip(seen["ids"], seen["mask"])]
            step.completion = [ids[m].tolist() for ids, m in zip(completion_ids, mask)]
        else:
            step.ref_logp = sums
        return logprobs

    trainer._forward = forward

    original_rewards = trainer._calculate_rewards_from_functions

    def rewards(*a, **kw):
        result = original_rewards(*a, **kw)
        recorder.current.rewards = result  # the same tensor: missing_eos_penalty is subtracted in place
        return result

    trainer._calculate_rewards_from_functions = rewards

    original_step = trainer.training_step

    def training_step(*a, **kw):
        recorder.steps.append(Step())
        loss = original_step(*a, **kw)
        step = recorder.current
        step.loss = [float(loss)]
        scores = step.rewards.detach().clone()
        step.rewards = scores.tolist()
        first, second = scores.split(len(scores) // 2)
        step.pairs = [0 if m else 1 for m in (first >= second).tolist()]  # TRL's rule (training_step)
        return loss

    trainer.training_step = training_step
    with recorder.hooks():
        trainer.train()
    recorder.steps[0].init, recorder.steps[0].sampling = init, sampling
    return Trace("TRL", recorder.steps, [n for n, _ in recorder.params])


# ============================================================================================
# odpo_vllm
# ============================================================================================
def run_ours(task: Task, replay: list | None = None, patches=(), **overrides) -> Trace:
    """odpo_vllm's trainer in process (transformers sampler) for `task.steps` steps; `replay`: per step,
    the completion rows (block layout) to use instead of sampling, passed through `finish_rollouts`.
    `patches`: (object, attribute, value) set for the run (tests inject divergences this way);
    `overrides`: OnlineDPOConfig fields (the rounding control sets shared_prompt_passes=False)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from odpo_vllm import OnlineDPOConfig, OnlineDPOTrainer
    from odpo_vllm.core import sequences
    from odpo_vllm.core.batches import ReadyRollouts, finish_rollouts
    from odpo_vllm.sampling import pairing

    _quiet()
    path = build_model(task)
    recorder_ref: list = []
    out = tempfile.mkdtemp(prefix="trl_eq_ours_")
    args = OnlineDPOConfig(
        **SETTINGS, per_device_train_batch_size=PROMPTS_PER_STEP, seed=task.seed, max_steps=task.steps,
        max_length=task.max_length, missing_eos_penalty=task.missing_eos_penalty, output_dir=out,
        use_vllm=False, use_cpu=True, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, plot_at_end=False, log_level="error", **overrides)

    def reward(*a, **kw):
        return recording_reward(recorder_ref[0])(*a, **kw)

    reward.__name__ = "letter_reward"
    # each step's rows in the order drawn: `task.rows()` is that order, so the dataset is given unshuffled
    # data and ours draws its own permutation, as a user's run does
    from odpo_vllm import toy

    dataset = Dataset.from_list(toy.prompts(task.steps * PROMPTS_PER_STEP, task.conversational, task.seed))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        trainer = OnlineDPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=dataset,
                                   processing_class=AutoTokenizer.from_pretrained(path),
                                   peft_config=task.lora_config())
        trainer.remove_callback(PrinterCallback)
        learner, generator = trainer.learner, trainer.generator
        recorder = Recorder()
        recorder.track(learner.model)
        recorder_ref.append(recorder)
        init = recorder.flat("data")
        sampling: dict = {}
        with torch.random.fork_rng(), generation_config_capture(sampling):
            generator.generate([trainer.train_dataset[0]["prompt_ids"]], 2, seed=0)

        original_rows = trainer.pipeline.rewrite_rows

        def rows(batch_rows):
            recorder.steps.append(Step())
            batch_rows = original_rows(batch_rows)
            recorder.current.prompt = [trainer.encoder.text(r["prompt"], 0) for r in batch_rows]
            return batch_rows

        trainer.pipeline.rewrite_rows = rows

        original_submit = generator.submit

        def submit(prompt_ids, num_samples, seed, media=None):
            recorder.current.prompt_ids = [list(p) for p in prompt_ids]
            if replay is None:
                return original_submit(prompt_ids, num_samples, seed, **({} if media is None else {"media": media}))
            raw = [list(r) for r in replay[len(recorder.steps) - 1]]
            recorder.current.raw = raw
            return ReadyRollouts(finish_rollouts(raw, [list(p) for p in prompt_ids], num_samples,
                                                 generator.eos_token_ids, generator.policy_version))

        generator.submit = submit
        original_sample = generator._sample

        def sample(*a, **kw):
            raw = original_sample(*a, **kw)
            recorder.current.raw = [list(r) for r in raw]
            return raw

        generator._sample = sample

        original_score = trainer.rewards.score

        def score(prompts, completions, completion_ids, columns, contains_eos):
            scores, per_func = original_score(prompts, completions, completion_ids, columns, contains_eos)
            recorder.current.completion = [list(c) for c in completion_ids]
            recorder.current.rewards = scores.tolist()
            return scores, per_func

        trainer.rewards.score = score

        original_select = pairing.select_pairs

        def select(scores, num_prompts, num_samples):
            chosen, rejected = original_select(scores, num_prompts, num_samples)
            recorder.current.pairs = (chosen // num_prompts).tolist()
            recorder.current.chosen_rows, recorder.current.rejected_rows = chosen.tolist(), rejected.tolist()
            return chosen, rejected

        pairing.select_pairs = select
        saved.append((pairing, "select_pairs", original_select))

        calls: list = []
        original_logprobs = learner.completion_logprobs

        def completion_logprobs(model, layout):
            result = original_logprobs(model, layout)
            calls.append(result[0].detach().sum(1).tolist())
            return result

        learner.completion_logprobs = completion_logprobs
        original_pass = learner._pair_pass

        def pair_pass(batch, beta, total_pairs, train):
            calls.clear()
            loss, sums, cut = original_pass(batch, beta, total_pairs, train)
            step = recorder.current
            ref, policy = calls[-2], calls[-1]  # the reference's pass, then the policy's
            n = len(batch)
            order = step.chosen_rows + step.rejected_rows  # output row r is block-layout sequence order[r]
            step.logp, step.ref_logp = [0.0] * (2 * n), [0.0] * (2 * n)
            for r, s in enumerate(order):
                step.logp[s], step.ref_logp[s] = policy[r], ref[r]
            step.loss = [float(loss)]
            completions = {s: c for s, c in zip(order, batch.chosen_ids + batch.rejected_ids)}
            step.model_in = [sequences.truncate(batch.prompt_ids[s % n], completions[s], learner.args.max_length)[0]
                             for s in range(2 * n)]
            return loss, sums, cut

        learner._pair_pass = pair_pass
        with recorder.hooks():
            with trainer:
                trainer.train()
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
    recorder.steps[0].init, recorder.steps[0].sampling = init, sampling
    return Trace("ours", recorder.steps, [n for n, _ in recorder.params])


# ============================================================================================
# Comparison
# ============================================================================================
@dataclass
class Divergence:
    kind: str
    step: int | None = None  # the first step that diverged (None: none did)
    size: str = ""  # how it diverged there
    max_error: float = 0.0  # floats: the largest relative error over the steps compared
    note: str = ""  # an explained divergence
    compared: int = 0  # steps compared
    floor: float = 0.0  # floats: the largest rounding floor of the control over those steps
    detail: str = ""  # ids: the first differing row

    @property
    def ok(self) -> bool:
        return self.step is None

    def cell(self) -> str:
        if self.compared == 0:
            return "n/a"
        if self.ok:
            if self.kind in ID_KINDS:
                return "="
            return f"= ({self.max_error:.0e}" + (f"; floor {self.floor:.0e})" if self.floor > 0 else ")")
        text = f"s{self.step}: {self.size}"
        return text + {BOS_NOTE: " (BOS)", TRUNC_NOTE: " (truncation)", RF_PAD_NOTE: " (pads)"}.get(self.note, "")


def _vector(value) -> torch.Tensor | None:
    if value is None or (isinstance(value, list) and not value):
        return None
    return value.float() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)


L2_KINDS = {"grad", "update", "init"}  # parameter vectors: |a - b| / |a| in the L2 norm


def relative_error(a, b, l2: bool = False) -> float:
    """max|a - b| / max|a| (per-sequence and scalar quantities), or with `l2` the L2 norms' ratio
    (parameter vectors, where Adam turns the rounding of gradients near zero into elementwise update
    differences of up to a few % of lr on a few elements)."""
    a, b = _vector(a), _vector(b)
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    diff = a.double() - b.double()
    scale = a.double().norm().item() if l2 else a.abs().max().item()
    size = diff.norm().item() if l2 else diff.abs().max().item()
    return size / scale if scale > 0 else size


def _first_difference(a, b) -> str:
    if isinstance(a, dict):
        keys = [k for k in a if a.get(k) != b.get(k)]
        return "; ".join(f"{k}: TRL {a.get(k)!r} vs ours {b.get(k)!r}" for k in keys)
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} rows"
    rows = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    i = rows[0]
    return f"{len(rows)}/{len(a)} rows differ; row {i}: TRL {_short(a[i])} vs ours {_short(b[i])}"


def details(rows) -> list[str]:
    """The first differing row of every id divergence of the table."""
    lines = []
    for name, sampler, divergences in rows:
        for d in divergences.values():
            if not d.ok and d.detail:
                lines.append(f"- {name} / {sampler} samples / {d.kind}, step {d.step}: {d.detail}"
                             + (f" [{d.note}]" if d.note else ""))
    return lines


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_bos_difference(trl_ids: list, our_ids: list, bos: int | None) -> bool:
    """Ours = TRL's prompt with tokenize_row's BOS in front, for every prompt that differs."""
    return bos is not None and any(a != b for a, b in zip(trl_ids, our_ids)) and all(
        b == a or b == [bos] + list(a) for a, b in zip(trl_ids, our_ids))


def is_truncation_difference(trl_rows: list, our_rows: list) -> bool:
    """Each of TRL's rows is the tail of ours (TRL cut more from the left) and at least one is shorter."""
    return len(trl_rows) == len(our_rows) and any(len(a) < len(b) for a, b in zip(trl_rows, our_rows)) and all(
        len(a) <= len(b) and list(b[len(b) - len(a):]) == list(a) for a, b in zip(trl_rows, our_rows))


def float_errors(a: Trace, b: Trace) -> dict[str, list[float]]:
    """Per float kind, the relative error of each step both traces hold."""
    steps = min(len(a.steps), len(b.steps))
    out = {}
    for kind in KINDS:
        if kind in ID_KINDS:
            continue
        values = []
        for s in range(1 if kind == "init" else steps):
            x, y = getattr(a.steps[s], kind), getattr(b.steps[s], kind)
            values.append(0.0 if _vector(x) is None or _vector(y) is None else relative_error(x, y, kind in L2_KINDS))
        out[kind] = values
    return out


def compare(trl: Trace, ours: Trace, rtol: float = 1e-5, bos_token_id: int | None = None,
            floor: dict[str, list[float]] | None = None) -> dict[str, Divergence]:
    """The first divergence of each kind of quantity over the steps both traces hold. `floor`: per float
    kind and step, the rounding error of ours against itself with an equivalent layout (`float_errors`
    of the control run); a float diverges where its error exceeds max(rtol, FLOOR_FACTOR x floor)."""
    result = {}
    steps = min(len(trl.steps), len(ours.steps))
    for kind in KINDS:
        found = Divergence(kind)
        for s in range(steps):
            a, b = getattr(trl.steps[s], kind), getattr(ours.steps[s], kind)
            if kind in ("init", "sampling") and s > 0:
                break
            if a is None or b is None:
                continue
            found.compared += 1
            if kind in ID_KINDS:
                if a != b:
                    found.step, found.detail = s, _first_difference(a, b)
                    found.size = (f"{sum(x != y for x, y in zip(a, b))}/{len(a)}" if isinstance(a, list)
                                  and len(a) == len(b) else "differ")
                    if kind in ("prompt_ids", "model_in") and is_bos_difference(a, b, bos_token_id):
                        found.note = BOS_NOTE
                    elif kind == "model_in" and is_truncation_difference(a, b):
                        found.note = TRUNC_NOTE
                    if kind == "rf_ids" and all(x[: len(y)] == y and len(set(x[len(y):])) <= 1
                                                for x, y in zip(a, b)):
                        found.note = RF_PAD_NOTE
                    break
            else:
                if kind in ("grad", "update", "init") and trl.names != ours.names:
                    found.step, found.size = s, f"parameters differ: {len(trl.names)} vs {len(ours.names)}"
                    break
                error = relative_error(a, b, kind in L2_KINDS)
                # the control's largest error so far (rounding drift grows with the steps, unevenly)
                noise = max(floor[kind][: s + 1]) if floor and floor.get(kind) else 0.0
                found.max_error = max(found.max_error, error)
                found.floor = max(found.floor, noise)
                if not error <= max(rtol, FLOOR_FACTOR * noise):
                    found.step, found.size = s, f"rel {error:.1e}" + (f" (floor {noise:.0e})" if noise > rtol else "")
                    break
        result[kind] = found
    if len(trl.steps) != len(ours.steps):
        result["steps"] = Divergence("steps", 0, f"{len(trl.steps)} vs {len(ours.steps)} steps", compared=1)
    return result


def unexplained(divergences: dict[str, Divergence]) -> list[str]:
    """The kinds that diverge for no known reason. Known: the BOS difference and the truncation rule
    (with either, everything the model computes from the prompt: model_in and every float), and TRL's
    padded reward-function ids."""
    upstream = any(d.note in (BOS_NOTE, TRUNC_NOTE) for d in divergences.values() if not d.ok)
    return [d.kind for d in divergences.values() if not d.ok and not d.note
            and not (upstream and d.kind not in ID_KINDS)]


def explain(divergences: dict[str, Divergence]) -> str:
    """`aligned`; or the known divergences present (`BOS`, `rf_ids pads`) and any unexplained kinds."""
    bad = [d for d in divergences.values() if not d.ok]
    if not bad:
        return "aligned"
    labels = [label for note, label in ((BOS_NOTE, "BOS"), (TRUNC_NOTE, "truncation rule"), (RF_PAD_NOTE, "rf_ids pads"))
              if any(d.note == note for d in bad)]
    rest = unexplained(divergences)
    if rest:
        labels.append("UNEXPLAINED: " + ", ".join(rest))
    return "; ".join(labels)


def synthetic_rows(task: Task) -> list[list[list[int]]]:
    """Completion rows for every step (block layout, max_new_tokens wide) drawn by the harness, not by a
    model: ids uniform over every embedding row (so, with a padded vocabulary, ids the tokenizer cannot
    decode; the pad, BOS and chat ids too), an EOS at a random place in half of the rows (early ends:
    short completions, prompts cut by max_length) followed by more ids or by padding, as samplers leave
    them. Both trainers replay the same rows."""
    import random

    from transformers import AutoConfig, AutoTokenizer

    path = build_model(task)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows_in_vocab = AutoConfig.from_pretrained(path).vocab_size
    width = SETTINGS["max_new_tokens"]
    rng = random.Random(task.seed)
    steps = []
    for _ in range(task.steps):
        rows = []
        for _ in range(2 * PROMPTS_PER_STEP):
            row = [rng.randrange(rows_in_vocab) for _ in range(width)]
            row = [t if t != tokenizer.eos_token_id else tokenizer.pad_token_id for t in row]
            if rng.random() < 0.5:
                end = rng.randrange(width)
                row[end] = tokenizer.eos_token_id
                if rng.random() < 0.5:
                    row[end + 1:] = [tokenizer.pad_token_id] * (width - end - 1)
            rows.append(row)
        steps.append(rows)
    return steps


SAMPLERS = {"TRL": "TRL samples, ours replays", "ours": "ours samples, TRL replays",
            "synthetic": "both replay the harness's rows"}


def run_config(task: Task, samplers=("TRL",), rtol: float = 1e-5,
               control: bool = True) -> dict[str, dict[str, Divergence]]:
    """{sampler: divergences} for each of `samplers` (keys of SAMPLERS). `control`: ours is also run on
    the same rows with separate padded sequences instead of shared-prompt rows (the same mathematics,
    another summation order); its errors against ours are the rounding floor (Adam turns gradients that
    are zero up to rounding, such as the key biases', into updates of up to lr, and the weights of two
    runs then drift apart by that much)."""
    from transformers import AutoTokenizer

    bos = AutoTokenizer.from_pretrained(build_model(task)).bos_token_id
    results = {}
    for sampler in samplers:
        if sampler == "TRL":
            trl = run_trl(task)
            ours = run_ours(task, replay=[s.raw for s in trl.steps])
        elif sampler == "ours":
            ours = run_ours(task)
            trl = run_trl(task, replay=[s.raw for s in ours.steps])
        else:
            rows = synthetic_rows(task)
            trl, ours = run_trl(task, replay=rows), run_ours(task, replay=rows)
        floor = None
        if control:
            floor = float_errors(ours, run_ours(task, replay=[s.raw for s in ours.steps], shared_prompt_passes=False))
        results[sampler] = compare(trl, ours, rtol, bos, floor)
    return results


def table(rows: list[tuple[str, str, dict[str, Divergence]]]) -> list[str]:
    lines = ["| config | sampled by | verdict | " + " | ".join(KINDS) + " |",
             "|---|---|---|" + "---|" * len(KINDS)]
    for name, sampler, divergences in rows:
        cells = [divergences[k].cell() for k in KINDS]
        lines.append(f"| {name} | {sampler} | {explain(divergences)} | " + " | ".join(cells) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"from: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samplers", default="TRL,ours,synthetic",
                        help="who samples the completions, comma-separated: " +
                             "; ".join(f"{k}: {v}" for k, v in SAMPLERS.items()))
    parser.add_argument("--trl-bos", action="store_true",
                        help="TRL's tokenizer applies tokenize_row's BOS rule (compare past the known BOS divergence)")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-control", action="store_true",
                        help="skip ours' rounding control run (floats then compared at rtol only)")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    samplers = args.samplers.split(",")
    if any(s not in SAMPLERS for s in samplers):
        parser.error(f"--samplers: choose from {list(SAMPLERS)}")
    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp(prefix="trl_equivalence_")
    import trl

    print(f"TRL {trl.__version__}; {args.steps} teacher-forced steps per config; {PROMPTS_PER_STEP} prompts x 2; "
          f"rtol {args.rtol}; trl_bos={args.trl_bos}; samplers: " + "; ".join(SAMPLERS[s] for s in samplers), flush=True)
    rows = []
    for name in names:
        task = replace(Task(name=name, steps=args.steps, seed=args.seed, trl_bos=args.trl_bos, folder=folder),
                       **CONFIGS[name])
        start = time.perf_counter()
        for sampler, divergences in run_config(task, samplers, args.rtol, not args.no_control).items():
            rows.append((name, sampler, divergences))
            print(f"[{time.perf_counter() - start:5.0f}s] {name} ({sampler} samples): {explain(divergences)}", flush=True)
    print()
    print("\n".join(table(rows)))
    print()
    print("\n".join(details(rows)))
    print()
    print("Cells: `=` equal (floats: the largest relative error over the steps, max-norm; grad, update and init: "
          "L2); `sN: ...` the first step that "
          f"diverged and how (ids: rows that differ; floats: relative error, and the "
          f"rounding floor of ours against itself where above rtol). (BOS): {BOS_NOTE}, the expected prompt "
          "difference; every float computed from the prompts then differs too (verdict `BOS`). (pads): "
          f"{RF_PAD_NOTE}.")


if __name__ == "__main__":
    main()
