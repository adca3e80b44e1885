"""`bench_vs_trl.py --model smollm2`: the comparison on a real model and two real prompt shapes.

    python benchmarks/bench_vs_trl.py --model smollm2 --shapes tldr,chat \
        --out benchmarks/results/vs_trl_smollm2_cpu.md [--quick] [--rounds N] [--steps N]

SmolLM2-135M-Instruct (`odpo_vllm.models.packaged.smollm2()`: the packaged GGUF converted once to a plain
fp32 folder), the reward `odpo_vllm.real_task.vader_reward` (VADER sentiment of the reply), the
same learning rate, seed and temperature for every system, and two shapes:

- `tldr`: TL;DR-like, plain prompts (no chat template) of ~400 tokens of real English, laid out
  as TRL's TL;DR data ("SUBREDDIT: r/... TITLE: ... POST: ... TL;DR:"); the post text is prose
  from Python's own reference manual (`pydoc_data.topics`, shipped with CPython), sentence by
  sentence, cut at a sentence so the prompt stays at or under the target length; up to 53 new
  tokens;
- `chat`: the real task's short requests (`real_task.train_prompts()`, conversational, so the
  chat template with SmolLM2's system line is applied: 37-48 tokens); up to 64 new tokens.

8 prompts x 2 completions per step, 1 round of 4 steps per odpo_vllm run (3 per TRL run; see the
report's header for what is left out). Systems: `trl-nockpt` (TRL's best CPU configuration:
gradient checkpointing off, so its sampler keeps the KV cache), `trl` (TRL's defaults: no KV
cache while sampling, so each new token re-runs the whole sequence; run once, with fewer steps,
on the shapes of `--trl_default_shapes`), `ours-vllm` (in process, vLLM engine) and `ray-ded-k1`
(Ray dedicated: 1 learner rank + 1 engine, 1 CPU each, async_steps=1). odpo_vllm runs with
gradient checkpointing off, as TRL's best does. The prompts are built once by the driver with the
model's tokenizer and written to a file that every worker reads.

The results JSON (beside `--out`) is rewritten after every run, so a run stopped part way keeps
what it measured; `--render that.json` writes the tables from it again (`--out`: where).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import statistics
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = {
    "tldr": dict(new_tokens=53, max_length=512, target_tokens=400, conversational=False,
                 label="TL;DR-like: ~400-token plain prompts of real English (Python's reference manual as "
                       "Reddit-style posts)"),
    "chat": dict(new_tokens=64, max_length=256, conversational=True,
                 label="chat: `real_task.train_prompts()` requests with the chat template"),
}
REAL_SYSTEMS = ["trl-nockpt", "trl", "ours-vllm", "ray-ded-k1"]
PROMPTS_PER_STEP = 8
SUBREDDITS = ["r/learnpython", "r/Python", "r/learnprogramming", "r/AskProgramming", "r/programming"]
TITLES = ["Can someone explain {}?", "Confused about {}", "Trying to understand {} (long post, sorry)",
          "What I learned today about {}", "Is this right? My notes on {}"]


# ============================================================================================
# Prompt builders
# ============================================================================================
def rough_tokens(text: str) -> int:
    """A tokenizer-free count: words and punctuation marks (English BPE gives about as many)."""
    return len(re.findall(r"\w+|[^\w\s]", text))


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])|(?<=[.!?][)\"'])\s+(?=[A-Z\"(])")
SENTENCE_DONE = re.compile(r"[.!?][)\"']?$")


def split_sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_END.split(text) if s.strip()]


def doc_sections() -> list[tuple[str, list[str]]]:
    """(heading, prose sentences) of each section of Python's reference manual, in its order:
    paragraphs of running text only (no code, grammar, tables, lists or headings)."""
    from pydoc_data.topics import topics

    sections = []
    for key in sorted(topics):
        text = topics[key]
        heading = text.strip().splitlines()[0].strip()
        sentences = []
        for block in re.split(r"\n\s*\n", text):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or lines[0][:1].isspace() or "::=" in block or ">>>" in block:
                continue  # code, grammar, indented notes
            if any(set(line.strip()) <= set("*=-^~+|") for line in lines):
                continue  # headings and tables
            if lines[0].lstrip().startswith(("* ", "- ", "+ ", "|")) or re.match(r"\s*\d+\.", lines[0]):
                continue  # lists
            paragraph = " ".join(line.strip() for line in lines)
            if len(paragraph.split()) < 12:
                continue
            # whole sentences only: one ending in ":" introduced a code block or list left out above
            sentences += [s for s in split_sentences(paragraph) if len(s.split()) >= 4 and SENTENCE_DONE.search(s)]
        if heading and sentences:
            sections.append((heading, sentences))
    return sections


def tldr_prompts(n: int, count_tokens=rough_tokens, target: int = 400, seed: int = 0) -> list[dict]:
    """`n` rows {"prompt": text}: "SUBREDDIT / TITLE / POST / TL;DR:" around whole sentences of
    the manual, added while the whole prompt stays within `target` tokens of `count_tokens` (a
    sentence that would overflow is passed over). A post starts at a section's first sentence and
    runs on into the next sections when one is short."""
    sections = doc_sections()
    stream = [(index, sentence) for index, (_, sentences) in enumerate(sections) for sentence in sentences]
    starts = [next(i for i, (index, _) in enumerate(stream) if index == k) for k in range(len(sections))]
    rng = random.Random(seed)
    order = list(range(len(sections)))
    rng.shuffle(order)
    rows = []
    for row in range(n):
        section = order[row % len(order)]
        heading = sections[section][0]
        title = rng.choice(TITLES).format(heading[0].lower() + heading[1:] if heading[:4] == "The " else heading)
        head = f"SUBREDDIT: {rng.choice(SUBREDDITS)}\n\nTITLE: {title}\n\nPOST: "
        post: list[str] = []
        position, skipped = starts[section], 0
        while skipped < 8:  # a sentence that does not fit is passed over; a few in a row end the post
            sentence = stream[position % len(stream)][1]
            position += 1
            if count_tokens(head + " ".join(post + [sentence]) + "\n\nTL;DR:") > target:
                skipped += 1
            else:
                post.append(sentence)
        rows.append({"prompt": head + " ".join(post) + "\n\nTL;DR:"})
    return rows


def _module(name: str):
    """odpo_vllm/<name>.py without importing the package (TRL's process gets nothing else of ours)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "odpo_vllm", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chat_prompts(n: int) -> list[dict]:
    rows = _module("real_task").train_prompts()
    return [rows[i % len(rows)] for i in range(n)]


def prompt_lengths(rows: list[dict], tokenizer) -> list[int]:
    """Prompt tokens as both trainers feed them (chat template for conversations, no extra specials)."""
    out = []
    for row in rows:
        prompt = row["prompt"]
        text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True)
        out.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def write_prompts(shape: str, n: int, tokenizer, path: str) -> list[int]:
    """The shape's `n` rows to `path` (JSON); returns their prompt lengths in tokens."""
    if shape == "tldr":
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        rows = tldr_prompts(n, count, SHAPES["tldr"]["target_tokens"])
    else:
        rows = chat_prompts(n)
    with open(path, "w") as f:
        json.dump(rows, f)
    return prompt_lengths(rows, tokenizer)


def load_task(prompts_file: str, n: int):
    """Worker side: (dataset of the first `n` rows, VADER reward)."""
    from datasets import Dataset

    with open(prompts_file) as f:
        rows = json.load(f)
    return Dataset.from_list(rows[:n]), _module("real_task").vader_reward


# ============================================================================================
# Where an in-process sync goes (worker side, after training)
# ============================================================================================
PROFILE_PARTS = (  # (label, part of the function's name in the profile, time kind)
    ("oneDNN matmul handles rebuilt", "create_onednn_mm_handler", "tottime"),
    ("tensor copies", "method 'copy_' of 'torch._C.TensorBase'", "tottime"),
    ("loaded-element counting", "get_numel_loaded", "cumtime"),
    ("prefix-cache reset", "reset_prefix_cache", "cumtime"),
)


def profile_local_sync(trainer) -> dict:
    """One more in-process sync under cProfile: seconds of its parts (`PROFILE_PARTS`), copy_ calls."""
    import cProfile
    import pstats

    import torch

    from odpo_vllm.weights.names import LearnerWeights

    weights = LearnerWeights(trainer.learner.model, torch.float32)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    try:
        profiler.enable()
        trainer.generator.load_weights(weights)
    except Exception as err:  # a figure less, not a run lost
        return {"error": f"{type(err).__name__}: {err}"[:200]}
    finally:
        profiler.disable()
    out = {"total": time.perf_counter() - start, "parts": {}, "copy_calls": 0}
    for (_, _, name), (_, calls, tottime, cumtime, _) in pstats.Stats(profiler).stats.items():
        for label, function, kind in PROFILE_PARTS:
            if function in name:
                out["parts"][label] = out["parts"].get(label, 0.0) + (tottime if kind == "tottime" else cumtime)
                if "copy_" in function:
                    out["copy_calls"] += calls
    return out


# ============================================================================================
# Driver
# ============================================================================================
def add_arguments(parser) -> None:
    parser.add_argument("--model", default="toy", choices=["toy", "smollm2"],
                        help="toy: random-init models of --sizes; smollm2: SmolLM2-135M-Instruct on --shapes")
    parser.add_argument("--shapes", default="tldr,chat", help="with --model smollm2: comma-separated, tldr,chat")
    parser.add_argument("--trl_default_shapes", default="chat",
                        help="with --model smollm2: shapes on which TRL's defaults run (once, round 0)")
    parser.add_argument("--trl_default_steps", type=int, default=1,
                        help="with --model smollm2: steps of the TRL-defaults run (1: that step is measured)")
    parser.add_argument("--render", default=None,
                        help="with --model smollm2: write the tables of a results JSON (a finished or stopped run)")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run(options, vs) -> None:
    """The real-model comparison; `vs` is the bench_vs_trl module (launch, labels, worker)."""
    import sys

    sys.path.insert(0, ROOT)
    from transformers import AutoTokenizer

    from vs_trl_report import measured
    from odpo_vllm.models.packaged import smollm2

    if options.render:
        return render_saved(options.render, options.out or os.path.splitext(options.render)[0] + ".md", vs)
    quick = options.quick
    rounds = options.rounds or 1
    steps = options.steps or (3 if quick else 4)  # odpo_vllm's; TRL's best runs one fewer
    warmup = options.warmup if options.warmup is not None else 1
    prompts = 2 if quick else PROMPTS_PER_STEP
    shapes = options.shapes.split(",")
    systems = options.systems.split(",") if options.systems else list(REAL_SYSTEMS)
    unknown = [s for s in shapes if s not in SHAPES] + [s for s in systems if s not in vs.SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown shape or system: {unknown}")
    timeout_s = options.timeout_s or 3600
    path = smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    root = tempfile.mkdtemp(prefix="odpo_bench_real_")
    log_dir = os.path.join(root, "runs")
    os.makedirs(log_dir)
    out = options.out or (os.path.join(root, "vs_trl_smollm2_quick.md") if quick else
                          os.path.join(HERE, "results", "vs_trl_smollm2_cpu.md"))
    print(f"model {path}; logs under {root}", flush=True)
    started, load_before = time.perf_counter(), _load()
    per_shape, raws = {}, []
    meta = dict(quick=quick, rounds=rounds, steps=steps, warmup=warmup, model_path=path, params_m=vs.params_m(path),
                learning_rate=options.learning_rate, trl_default_steps=options.trl_default_steps,
                trl_omp_default=options.trl_omp_default, load_before=load_before, status="partial",
                command=" ".join(["python benchmarks/bench_vs_trl.py"] + sys.argv[1:]))
    saved = os.path.splitext(out)[0] + ".json"
    for shape in shapes:
        spec = SHAPES[shape]
        new_tokens = min(spec["new_tokens"], 8) if quick else spec["new_tokens"]
        prompts_file = os.path.join(root, f"prompts_{shape}.json")
        lengths = write_prompts(shape, prompts * max(steps, options.trl_default_steps), tokenizer, prompts_file)
        runs: dict = {s: [] for s in systems + [vs.RAW]}
        errors: dict = {}
        per_shape[shape] = {"label": f"SmolLM2-135M, {shape}", "shape_label": spec["label"], "runs": runs,
                            "errors": errors, "prompt_tokens": lengths, "new_tokens": new_tokens, "prompts": prompts}
        if "trl" in systems and shape not in options.trl_default_shapes.split(","):
            errors["trl"] = (f"skipped to save time: without a KV cache each of the {new_tokens} new tokens re-runs "
                             f"all ~{statistics.mean(lengths):.0f}+ tokens of {2 * prompts} sequences (see `trl` on "
                             f"{options.trl_default_shapes})")
        for r in range(rounds):
            for system in systems + ([vs.RAW] if r >= len(raws) else []):  # raw: once per round
                if system == "trl" and (r > 0 or "trl" in errors):
                    continue
                # TRL measures every step after the warm-up; odpo_vllm leaves its last out too (see `tail`)
                run_steps = {"trl": options.trl_default_steps, "trl-nockpt": steps - 1}.get(system, steps)
                cfg = dict(system=system, size=shape, round=r, model_path=path, prompts=prompts,
                           new_tokens=new_tokens, steps=run_steps,
                           max_length=spec["max_length"], learning_rate=options.learning_rate, seed=0,
                           trl_omp_default=options.trl_omp_default, prompts_file=prompts_file,
                           overrides={} if system.startswith("trl") else {"gradient_checkpointing": False},
                           profile_sync=system == "ours-vllm")
                load = _load()
                result = vs.launch(cfg, log_dir, timeout_s)
                result["load_before"], result["load_after"] = load, _load()
                result.pop("traceback", None)  # kept in the run's log
                if system == vs.RAW:
                    raws.append(result)
                    print(f"[{time.perf_counter() - started:6.0f}s] raw bandwidth round {r}: " + (
                        f"gloo {result['gloo_bps'] / 1e6:,.0f} MB/s, copy {result['copy_bps'] / 1e6:,.0f} MB/s"
                        if result.get("ok") else f"failed: {result['error']}"), flush=True)
                    continue
                runs[system].append(result)
                if result.get("ok"):
                    step = statistics.median(measured(result, "steps", warmup))
                    print(f"[{time.perf_counter() - started:6.0f}s] {shape} {system:11s} round {r}: step {step:.2f}s "
                          f"(run {result['wall_s']:.0f}s, load {load} -> {result['load_after']})", flush=True)
                else:
                    errors[system] = result["error"]
                    print(f"[{time.perf_counter() - started:6.0f}s] {shape} {system:11s} round {r}: did not run: "
                          f"{result['error']}", flush=True)
                meta.update(load_after=_load(), wall_s=time.perf_counter() - started)
                _save(saved, per_shape, raws, meta)
        del runs[vs.RAW]
    meta["status"] = "complete"
    _save(saved, per_shape, raws, meta)
    render_saved(saved, out, vs)


def _save(path: str, per_shape: dict, raws: list, meta: dict) -> None:
    """Everything measured so far (rewritten after every run: a stopped run keeps its figures)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "raw_runs": raws, "shapes": per_shape}, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def render_saved(path: str, out: str, vs) -> None:
    import real_shapes_report as report

    with open(path) as f:
        saved = json.load(f)
    for data in saved["shapes"].values():
        data["runs"].pop(vs.RAW, None)
    good = [r for r in saved["raw_runs"] if r.get("ok")]
    raw = ({key: statistics.median(r[key] for r in good) for key in ("bytes", "gloo_bps", "copy_bps", "pack_s")}
           if good else None)
    text = report.render(saved["shapes"], raw, vs.SYSTEMS, saved["meta"])
    print(text)
    with open(out, "w") as f:
        f.write(text)
    print(f"written to {out}")

