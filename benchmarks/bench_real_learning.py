"""Does odpo_vllm learn as well as TRL's `OnlineDPOTrainer` on the real task? (issue 17 item 5)

    python benchmarks/bench_real_learning.py [--steps 40] [--seeds 0,1] [--held_out 64] [--k 2]
                                             [--systems ours,trl[,trl-vllm]]
                                             [--out benchmarks/results/real_learning_cpu.md]
    python benchmarks/bench_real_learning.py --steps 2 --held_out 8     # a check, ~10 min here
    python benchmarks/bench_real_learning.py --from_json benchmarks/results/real_learning_cpu.json

SmolLM2-135M-Instruct (`odpo_vllm.models.packaged.smollm2()`), the prompts of
`real_task.train_prompts()` and the reward `real_task.vader_reward` (VADER compound sentiment of
the reply). For each seed, two trainings of N steps, each in a fresh subprocess:

- `ours`: odpo_vllm in process with its vLLM engine, `OnlineDPOConfig(**real_demo.SETTINGS, ...)`;
- `trl`:  TRL's `OnlineDPOTrainer` (trl.experimental.online_dpo) with the same SETTINGS
  (8 prompts x 2 samples per step, learning rate, constant schedule, max_new_tokens, temperature,
  beta, seed), transformers `generate` with `gradient_checkpointing=False` (TRL's best configuration
  on CPU in results/vs_trl_cpu.md: generate keeps its KV cache);
- `trl-vllm` (not in the default run): the same with TRL's vLLM colocate path.

Both see the same prompts in the same order: the driver computes the batches odpo_vllm draws
(its `PromptBatches`: a seeded permutation per epoch; 288 prompts = 36 full batches, so epoch
boundaries fall on batch boundaries), hands TRL exactly that sequence and makes TRL read it in
order (`train_sampling_strategy="sequential"`). The reward functions record the prompts each
trainer actually scored, and the driver checks the two sequences are identical.

Then ONE common sampler scores the same held-out prompts (`real_task.held_out_prompts()`, topics
never trained on) for the initial model and each final model: transformers `generate` on the saved
folder, the chat template, temperature 0.9, max_new_tokens 40, no top-k/top-p, a fixed torch seed,
k samples per prompt, the initial model's tokenizer and EOS ids for all. Same prompt batches, same
seed, so the models are compared on common random numbers and only the weights differ. Standard
errors are over prompts (per-prompt mean of the k samples); the paired difference ours - TRL is
taken per prompt too.

Every process runs with OMP_WAIT_POLICY=PASSIVE (as in bench_vs_trl.py). The .json beside the
markdown holds every number (reward curves, per-prompt held-out rewards) and is rewritten after
each run; `--from_json` renders the markdown from it again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

from worker_launch import WORKER_ENV, run_worker, write_worker_result  # this folder is the script's

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ENV = WORKER_ENV
SAMPLER = dict(temperature=0.9, max_new_tokens=40, seed=1234)  # the common held-out sampler
MAX_LENGTH = 256  # prompt + completion tokens of the logprob pass (odpo_vllm's default; TRL's is 512)
SYSTEMS = {
    "ours": "odpo_vllm (in process, vLLM engine)",
    "trl": "TRL OnlineDPOTrainer (transformers generate, grad ckpt off)",
    "trl-vllm": "TRL OnlineDPOTrainer (vLLM colocate, grad ckpt off)",  # not in the default run
}


# ============================================================================================
# Worker side: one training or one scoring, one process
# ============================================================================================
def _load_real_task():
    """odpo_vllm/real_task.py without importing the odpo_vllm package: TRL's process gets nothing
    of ours but the prompts and the reward."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_real_task", os.path.join(ROOT, "odpo_vllm", "real_task.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recording_reward(real_task, seen: list):
    """`vader_reward`, recording the prompts of each call (one call per step, in the order given)."""

    def vader_reward(prompts, completions, completion_ids=None, **columns):
        order = []
        for prompt in prompts:
            text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
            if text not in order:
                order.append(text)
        seen.append(order)
        return real_task.vader_reward(prompts, completions, completion_ids, **columns)

    return vader_reward


def _curve(log_history: list[dict]) -> list[float]:
    return [row["objective/scores"] for row in log_history if "objective/scores" in row]


def _options(args, **extra) -> dict:
    optim = str(getattr(args.optim, "value", args.optim))
    return {"gradient_checkpointing": args.gradient_checkpointing, "optim": optim,
            "bf16": bool(args.bf16), "max_length": args.max_length, **extra}


def run_ours(cfg: dict) -> dict:
    import odpo_vllm  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch, as for any user)
    from datasets import Dataset

    from odpo_vllm import OnlineDPOConfig, OnlineDPOTrainer, real_task

    seen: list = []
    args = OnlineDPOConfig(
        **cfg["settings"], max_steps=cfg["steps"], output_dir=cfg["output_dir"], max_length=MAX_LENGTH,
        use_vllm=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        plot_at_end=False, log_completions=False)
    trainer = OnlineDPOTrainer(model=cfg["model_path"], reward_funcs=_recording_reward(real_task, seen), args=args,
                               train_dataset=Dataset.from_list(real_task.train_prompts()))
    with trainer:
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        trainer.save_model(cfg["final_dir"])
    with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"curve": _curve(rows), "train_s": train_s, "prompts_seen": seen,
            "options": _options(args, sampler="vLLM engine")}


def run_trl(cfg: dict) -> dict:
    real_task = _load_real_task()
    if cfg.get("trl_vllm"):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; without it vLLM asks for most of the RAM
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    rows = real_task.train_prompts()
    ordered = [rows[i] for i in cfg["order"]]  # the batches odpo_vllm draws, flattened
    seen: list = []
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    args = OnlineDPOConfig(
        **cfg["settings"], max_steps=cfg["steps"], output_dir=cfg["output_dir"], max_length=MAX_LENGTH,
        gradient_accumulation_steps=1, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        # necessary or matching differences from TRL's defaults, listed in the report:
        gradient_checkpointing=False,            # TRL's best CPU configuration (generate with the KV cache)
        use_vllm=cfg.get("trl_vllm", False),     # the `trl-vllm` system: TRL's vLLM colocate path
        bf16=False, use_cpu=True,                # TRL's default bf16=True; odpo_vllm resolves to fp32 on CPU
        train_sampling_strategy="sequential",    # read the prompts in odpo_vllm's order
        dataloader_num_workers=0)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=_recording_reward(real_task, seen), args=args,
                               processing_class=tokenizer, train_dataset=Dataset.from_list(ordered))
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    trainer.save_model(cfg["final_dir"])
    return {"curve": _curve(trainer.state.log_history), "train_s": train_s, "prompts_seen": seen,
            "options": _options(args, sampler="vLLM colocate" if args.use_vllm else "transformers generate",
                                train_sampling_strategy=args.train_sampling_strategy)}


def run_score(cfg: dict) -> dict:
    """The common held-out sampler on a saved model folder."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    return held_out_scores(model, cfg["tokenizer_path"], cfg["held_out"], cfg["k"], cfg["temperature"],
                           cfg["max_new_tokens"], cfg["seed"])


def held_out_scores(model, tokenizer_path: str, held_out: int, k: int, temperature: float, max_new_tokens: int,
                    seed: int, rows: list[dict] | None = None, train_mode: bool = False) -> dict:
    """The common held-out sampler: transformers generate, fixed seed, k samples per prompt, on
    `model` (a loaded model, or a PEFT model in the process that trained it). `rows`: other
    prompts than the first `held_out` held-out ones; `train_mode`: sample with dropout on, as
    TRL's trainer samples (its generate runs inside the training step, in train mode)."""
    real_task = _load_real_task()
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)  # the initial model's, for every model
    initial = GenerationConfig.from_pretrained(tokenizer_path)
    eos = {tokenizer.eos_token_id} | set(initial.eos_token_id if isinstance(initial.eos_token_id, list)
                                         else [initial.eos_token_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.train(train_mode)
    generation = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=max_new_tokens, num_return_sequences=k,
                                  eos_token_id=sorted(i for i in eos if i is not None), pad_token_id=pad)
    rows = real_task.held_out_prompts()[:held_out] if rows is None else rows
    texts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows]
    torch.manual_seed(seed)
    replies: list[str] = []
    start = time.perf_counter()
    batch = 16  # prompts per generate call (the same batches for every model)
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=generation)
        replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    scores = real_task.vader_scores(replies)
    per_prompt = [sum(scores[i * k : (i + 1) * k]) / k for i in range(len(rows))]
    return {"per_prompt": per_prompt, "scores": scores, "seconds": time.perf_counter() - start,
            "prompts_sha": prompts_sha(rows),
            "examples": [{"prompt": rows[i]["prompt"][-1]["content"], "reply": replies[i * k],
                          "reward": scores[i * k]} for i in range(min(3, len(rows)))]}


def worker_main(cfg: dict) -> None:
    write_worker_result({"ours": run_ours, "trl": run_trl, "score": run_score}[cfg["role"]], cfg)


# ============================================================================================
# Driver side
# ============================================================================================
def launch(name: str, cfg: dict, log_dir: str, timeout_s: int, reuse: bool = False) -> dict:
    """One worker subprocess; its result (with the subprocess's wall time) stays in log_dir/name.json.
    reuse: a finished, successful result already there is returned instead of running again."""
    cfg = dict(cfg, result=os.path.join(log_dir, name + ".json"))
    if reuse and os.path.exists(cfg["result"]):
        with open(cfg["result"]) as f:
            result = json.load(f)
        if result.get("ok") and "wall_s" in result:
            return dict(result, reused=True)
    env = {**os.environ, **ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = run_worker(__file__, cfg, os.path.join(log_dir, name + ".log"), env, ROOT, timeout_s)
    with open(cfg["result"], "w") as f:
        json.dump(result, f)
    return result


def our_order(n_rows: int, batch: int, seed: int, steps: int) -> list[list[int]]:
    """The row indices of each step's batch, as odpo_vllm's trainer draws them."""
    from odpo_vllm.data import PromptBatches

    batches = PromptBatches(list(range(n_rows)), batch, seed)
    return [batches.next()[0] for _ in range(steps)]


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return m, se


def _fmt(value, spec="+.3f") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _log(started: float, text: str) -> None:
    print(f"[{time.perf_counter() - started:6.0f}s] {text}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps of each run (default 40)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0), e.g. 0,1")
    parser.add_argument("--held_out", type=int, default=64, help="held-out prompts scored (at most 64)")
    parser.add_argument("--k", type=int, default=2, help="held-out samples per prompt")
    parser.add_argument("--systems", default="ours,trl", help="comma-separated, from: " + ", ".join(SYSTEMS))
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/real_learning_cpu.md; "
                                                   "with fewer than 40 steps or 64 prompts, a file in the run folder); "
                                                   "the .json beside it holds every number")
    parser.add_argument("--from_json", default=None, help="only write the markdown again from a saved .json")
    parser.add_argument("--keep", action="store_true", help="keep the trained model folders")
    parser.add_argument("--run_dir", default=None,
                        help="folder for runs and logs (default: a new temp folder); finished runs found there are "
                             "reused, so a run cut short goes on where it stopped")
    parser.add_argument("--timeout_s", type=int, default=3600, help="per subprocess")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker_main(json.loads(options.worker))
        return
    sys.path.insert(0, ROOT)
    if options.from_json:
        with open(options.from_json) as f:
            data = json.load(f)
        write(data, options.out or os.path.splitext(options.from_json)[0] + ".md")
        return

    seeds = [int(s) for s in options.seeds.split(",") if s.strip()]
    systems = options.systems.split(",")
    if any(s not in SYSTEMS for s in systems):
        parser.error(f"unknown system in {systems}; use {list(SYSTEMS)}")
    if not 1 <= options.held_out <= 64:
        parser.error("--held_out: 1..64")
    import torch
    import transformers
    import trl

    from odpo_vllm import real_demo, real_task
    from odpo_vllm.models.packaged import smollm2

    model_path = smollm2()
    root = os.path.abspath(options.run_dir) if options.run_dir else tempfile.mkdtemp(prefix="odpo_bench_real_")
    log_dir = os.path.join(root, "runs")
    os.makedirs(log_dir, exist_ok=True)
    reuse = bool(options.run_dir)
    full = options.steps >= 40 and options.held_out == 64
    out = options.out or ("benchmarks/results/real_learning_cpu.md" if full
                          else os.path.join(root, "real_learning_check.md"))
    print(f"model {model_path}\nruns and logs under {root}\nresults to {out} (+ .json)", flush=True)
    started = time.perf_counter()
    rows = real_task.train_prompts()
    batch = real_demo.SETTINGS["per_device_train_batch_size"]
    command = (f"python benchmarks/bench_real_learning.py --steps {options.steps} --seeds {','.join(map(str, seeds))}"
               + ("" if options.held_out == 64 else f" --held_out {options.held_out}")
               + ("" if options.k == 2 else f" --k {options.k}")
               + ("" if systems == ["ours", "trl"] else f" --systems {','.join(systems)}"))
    data = {"meta": {"command": command, "steps": options.steps, "seeds": seeds, "systems": systems,
                     "held_out": options.held_out, "k": options.k, "sampler": SAMPLER,
                     "settings": real_demo.SETTINGS, "max_length": MAX_LENGTH, "train_prompts": len(rows),
                     "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__, "total_s": None,
                     "held_out_sha": prompts_sha(real_task.held_out_prompts()[: options.held_out])},
            "initial": None, "runs": {}}
    score_cfg = dict(role="score", tokenizer_path=model_path, held_out=options.held_out, k=options.k, **SAMPLER)

    def score(name: str, path: str) -> dict:
        result = launch(f"score_{name}", dict(score_cfg, model_path=path), log_dir, options.timeout_s, reuse)
        if result.get("ok"):
            m, se = mean_se(result["per_prompt"])
            _log(started, f"held-out {name}: {m:+.3f} +- {se:.3f} ({result['seconds']:.0f}s)"
                          + (" (reused)" if result.get("reused") else ""))
        else:
            _log(started, f"held-out {name}: FAILED {result['error']}")
        return result

    def save() -> None:  # after every run: a crash later keeps what is done
        # the subprocesses' wall times (initial score, trainings, their scores): also right when resumed
        results = [data["initial"] or {}] + [r for run in data["runs"].values()
                                             for r in (run, run.get("held_out", {}))]
        data["meta"]["total_s"] = sum(r.get("wall_s", 0.0) for r in results)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(data, f, indent=1)

    data["initial"] = _strip(score("initial", model_path))
    save()
    for seed in seeds:
        order = our_order(len(rows), batch, seed, options.steps)
        expected = [[rows[i]["prompt"][-1]["content"] for i in b] for b in order]
        settings = dict(real_demo.SETTINGS, seed=seed)
        for system in systems:
            name = f"{system}_s{seed}"
            cfg = dict(role="ours" if system == "ours" else "trl", trl_vllm=system == "trl-vllm",
                       model_path=model_path, steps=options.steps, settings=settings,
                       order=[i for b in order for i in b], output_dir=os.path.join(root, name),
                       final_dir=os.path.join(root, name, "final"))
            reuse_run = reuse and (os.path.isdir(cfg["final_dir"]) or os.path.exists(
                os.path.join(log_dir, f"score_{name}.json")))  # a finished training whose model is still there
            result = launch(name, cfg, log_dir, options.timeout_s, reuse_run)
            result.update(system=system, seed=seed)
            if result.get("ok"):
                curve = result["curve"]
                if "prompts_seen" in result:  # (a reused result holds the check already)
                    seen = result.pop("prompts_seen")
                    result["order_matches"] = len(seen) == len(expected) and all(
                        sorted(a) == sorted(b) for a, b in zip(seen, expected))
                    _rewrite(os.path.join(log_dir, name + ".json"), result)
                reused = ", reused" if result.get("reused") else ""
                _log(started, f"{name}: trained {len(curve)} steps in {result['train_s']:.0f}s (run "
                              f"{result['wall_s']:.0f}s{reused}), reward first-5 {statistics.fmean(curve[:5]):+.3f} "
                              f"last-5 {statistics.fmean(curve[-5:]):+.3f}, prompt order as ours: "
                              f"{result['order_matches']}")
                result["held_out"] = _strip(score(name, cfg["final_dir"]))
                if not options.keep:
                    shutil.rmtree(cfg["final_dir"], ignore_errors=True)
            else:
                _log(started, f"{name}: did not run: {result['error']} (log: {log_dir}/{name}.log)")
            data["runs"][name] = _strip(result)
            save()
    save()
    write(data, out)


def _rewrite(path: str, result: dict) -> None:
    """A training's result file without the raw prompt lists, once checked (a reuse keeps the check)."""
    with open(path, "w") as f:
        json.dump({k: v for k, v in result.items() if k != "reused"}, f)


def prompts_sha(rows: list[dict]) -> str:
    import hashlib

    text = "\n".join(row["prompt"][-1]["content"] for row in rows)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "traceback"}


def write(data: dict, out: str) -> None:
    table = "\n".join(report(data))
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(table + "\n")
    print(f"written to {out}")


def report(data: dict) -> list[str]:
    meta, initial, runs = data["meta"], data["initial"] or {}, data["runs"]
    n, k, seeds, systems = meta["held_out"], meta["k"], meta["seeds"], meta["systems"]
    settings = meta["settings"]
    listed = ", ".join(f"{a}={b}" for a, b in settings.items() if a != "seed")
    lines = [
        f"# Learning on the real task: odpo_vllm vs TRL {meta['trl']} OnlineDPOTrainer on CPU ({meta['date']}, "
        f"{meta['cpus']} shared cores, fp32, torch {meta['torch']}, transformers {meta['transformers']})",
        "",
        f"`{meta['command']}`. SmolLM2-135M-Instruct, `real_task.train_prompts()` ({meta['train_prompts']} prompts), "
        f"reward `real_task.vader_reward`, {meta['steps']} steps of {settings['per_device_train_batch_size']} "
        f"prompts x 2 samples; `real_demo.SETTINGS` for every trainer ({listed}, seed = the run's seed), "
        f"max_length {meta['max_length']}. Each training runs in a fresh subprocess.",
        "",
        f"Held-out: {n} prompts of `real_task.held_out_prompts()` (topics never trained on), {k} samples each from "
        "ONE common sampler for every model (transformers `generate` on the saved folder, chat template, "
        f"temperature {meta['sampler']['temperature']}, max_new_tokens {meta['sampler']['max_new_tokens']}, no "
        f"top-k/top-p, torch seed {meta['sampler']['seed']}, same batches, so the models share their random "
        f"numbers), mean VADER compound; s.e. over prompts (per-prompt mean of the {k} samples). Training reward: "
        "`objective/scores` (mean reward of the step's 16 samples, drawn by each trainer's own sampler) over the "
        "first 5 and the last 5 steps. Wall: the training subprocess (start, model load, training, save); "
        "train: `train()` alone. 'order': the prompts each trainer scored, step by step, are the batches odpo_vllm "
        "draws.",
        "",
        "| system | seed | steps | held-out VADER (s.e.) | vs initial | train reward first-5 | last-5 | wall s "
        "| train s | order |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    init_mean = None
    if initial.get("ok"):
        init_mean, init_se = mean_se(initial["per_prompt"])
        lines.append(f"| initial model | - | 0 | {init_mean:+.3f} ({init_se:.3f}) | | | | | | |")
    else:
        lines.append(f"| initial model | - | 0 | did not run: {initial.get('error')} | | | | | | |")
    done: dict = {s: {} for s in systems}
    for seed in seeds:
        for system in systems:
            result = runs.get(f"{system}_s{seed}")
            if result is None:
                lines.append(f"| {SYSTEMS[system]} | {seed} | | not run (yet) | | | | | | |")
                continue
            if not result.get("ok"):
                lines.append(f"| {SYSTEMS[system]} | {seed} | {meta['steps']} | did not run: {result.get('error')} "
                             f"| | | | {result.get('wall_s', 0):.0f} | | |")
                continue
            curve, held = result["curve"], result.get("held_out", {})
            first5, last5 = statistics.fmean(curve[:5]), statistics.fmean(curve[-5:])
            delta = None
            if held.get("ok"):
                m, se = mean_se(held["per_prompt"])
                delta = m - init_mean if init_mean is not None else None
                done[system][seed] = {"mean": m, "per_prompt": held["per_prompt"], "last5": last5,
                                      "wall": result["wall_s"], "train": result["train_s"]}
                held_text = f"{m:+.3f} ({se:.3f})"
            else:
                held_text = f"scoring failed: {held.get('error')}"
            order = {True: "same", False: "DIFFERENT", None: ""}[result.get("order_matches")]
            lines.append(f"| {SYSTEMS[system]} | {seed} | {len(curve)} | {held_text} | {_fmt(delta)} | "
                         f"{first5:+.3f} | {last5:+.3f} | {result['wall_s']:.0f} | {result['train_s']:.0f} | {order} |")
    if len(seeds) > 1:
        lines += ["", f"Over seeds {','.join(map(str, seeds))}:", "",
                  "| system | held-out mean over seeds | worst seed | train last-5, mean | wall s, mean |",
                  "|---|---|---|---|---|"]
        for system in systems:
            got = done[system]
            if not got:
                continue
            means = [d["mean"] for d in got.values()]
            worst = min(got, key=lambda s: got[s]["mean"])
            lines.append(f"| {SYSTEMS[system]} | {statistics.fmean(means):+.3f} ({len(got)} seeds) | "
                         f"{got[worst]['mean']:+.3f} (seed {worst}) | "
                         f"{statistics.fmean(d['last5'] for d in got.values()):+.3f} | "
                         f"{statistics.fmean(d['wall'] for d in got.values()):.0f} |")
    for other in [s for s in systems if s != "ours"]:
        if "ours" not in done:
            break
        paired = [s for s in seeds if s in done["ours"] and s in done[other]]
        if not paired:
            continue
        lines += ["", f"Paired by held-out prompt (same prompts, same sampler seed), ours - {other}:", ""]
        for s in paired:
            diff = [a - b for a, b in zip(done["ours"][s]["per_prompt"], done[other][s]["per_prompt"])]
            m, se = mean_se(diff)
            lines.append(f"- seed {s}: {m:+.3f} (s.e. {se:.3f})")
        ours_means = [done["ours"][s]["mean"] for s in paired]
        other_means = [done[other][s]["mean"] for s in paired]
        met_mean = statistics.fmean(ours_means) >= statistics.fmean(other_means)
        met_worst = min(ours_means) >= min(other_means)
        lines += ["", f"Target (issue 17), ours' held-out reward at least {other}'s: "
                      f"{'mean over seeds' if len(paired) > 1 else 'seed ' + str(paired[0])} "
                      f"{'met' if met_mean else 'NOT met'} ({statistics.fmean(ours_means):+.3f} vs "
                      f"{statistics.fmean(other_means):+.3f})"
                      + (f"; worst seed {'met' if met_worst else 'NOT met'} ({min(ours_means):+.3f} vs "
                         f"{min(other_means):+.3f})" if len(paired) > 1 else "") + "."]
    shas = {held.get("prompts_sha") for held in [initial] + [r.get("held_out", {}) for r in runs.values()]} - {None}
    if shas - {meta.get("held_out_sha")}:
        lines += ["", f"WARNING: the held-out prompts differ between scorings ({sorted(shas)}): "
                      "`real_task.held_out_prompts()` changed during the run."]
    lines += ["", "What differs between the trainings:", "", *DIFFERENCES]
    if "trl-vllm" in systems:
        lines.append(TRL_VLLM_NOTE)
    total = meta.get("total_s") or 0
    lines += ["", f"Total wall time {total:.0f} s ({total / 60:.1f} min) on a {meta.get('cpus', '?')}-CPU machine "
                  "that may have run other jobs at the same time: timings are indicative only."]
    examples = [("initial model", initial)] + [(name, r.get("held_out", {})) for name, r in runs.items()]
    for name, held in examples:
        if held.get("ok"):
            lines += ["", f"Held-out examples (first sample, {name}):", ""]
            for ex in held.get("examples", []):
                lines.append(f"- {ex['prompt']} -> ({ex['reward']:+.2f}) {' '.join(ex['reply'].split())[:160]}")
    return lines


DIFFERENCES = [
    "- Same for all: model, prompts and their order (checked, column 'order'), reward, the SETTINGS above, fp32, "
    "AdamW (`adamw_torch_fused`, transformers' default), max_grad_norm 1.0, no weight decay or warmup, sigmoid "
    "loss, dropout off, a frozen copy of the initial model as reference. Both trainers give the same loss, "
    "gradients and metrics on identical inputs (`benchmarks/tests/test_trl_parity.py`).",
    "- Sampler during training (not matchable): odpo_vllm samples with its vLLM engine (per-request seeds, weights "
    "pushed after every step); TRL (`trl` row) with transformers `generate` and torch's global RNG. Same prompts, "
    "different random draws, so different completions and pairs: part of any gap between the rows is sampling "
    "noise, which the seeds measure.",
    "- TRL options set away from TRL's defaults: `gradient_checkpointing=False` (TRL's best CPU configuration, "
    "`results/vs_trl_cpu.md`: generate uses the KV cache; odpo_vllm keeps its default True, which changes memory "
    "and time, not the math); `train_sampling_strategy='sequential'` on a dataset pre-ordered as odpo_vllm draws "
    "it (needed for the same order: TRL's default random sampler draws another one); `bf16=False, use_cpu=True` "
    "(TRL defaults to bf16=True, CPU autocast here; odpo_vllm resolves bf16 to False without a GPU, so both train "
    f"in fp32); `max_length={MAX_LENGTH}` (odpo_vllm's default; TRL's is 512; no prompt + completion comes near "
    "either).",
    "- `use_vllm=False` for the `trl` row is a choice, not a necessity, on this model: TRL's vLLM colocate path "
    "ran on vllm-cpu 0.32 with SmolLM2 (2 steps), and its per-parameter `load_weights` does reach the engine (a "
    "probe sequence's logprob after a large weight change: vLLM -413.4, transformers -413.9). It failed only on "
    "`bench_vs_trl.py`'s toy Qwen2 model (`'Parameter' object has no attribute 'weight_loader'`). "
    "`--systems ours,trl,trl-vllm` adds that run.",
]
TRL_VLLM_NOTE = ("- `trl-vllm` row: TRL's vLLM colocate path; it needed `VLLM_CPU_KVCACHE_SPACE=1` (GiB) in its "
                 "environment, without which vLLM asks for ~10 GiB of KV cache and fails on a shared machine: "
                 "`ValueError: Available memory on node 0 ... is less than requested memory for kv`.")


if __name__ == "__main__":
    main()
