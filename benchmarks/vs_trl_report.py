"""Tables of `bench_vs_trl.py`: per-run medians -> the results, weight-sync and targets sections."""

from __future__ import annotations

import statistics


def measured(run: dict, key: str, warmup: int) -> list:
    """The run's values of `key` over its measured steps: the first `warmup` left out, and the last
    `run["tail"]` (odpo_vllm: the last step samples no next batch, so it is shorter than the rest)."""
    values = run.get(key) or []
    return values[warmup:len(values) - run.get("tail", 0)] or values[warmup:] or values


def summarize(runs: list[dict], warmup: int) -> dict | None:
    """Medians over the measured steps (after the warm-up) of all rounds, and each round's median."""
    good = [r for r in runs if r.get("ok")]
    if not good:
        return None
    pooled = {key: [] for key in ("steps", "generate", "reward", "train", "sync")}
    for run in good:
        for key in pooled:
            pooled[key] += measured(run, key, warmup)
    out = {key: statistics.median(values) if values else 0.0 for key, values in pooled.items()}
    out["step_runs"] = [statistics.median(measured(run, "steps", warmup)) for run in good]
    out["measured_steps"] = len(pooled["steps"])
    out["tokens"] = statistics.mean(t for r in good for t in r["tokens"]) if any(r["tokens"] for r in good) else 0
    sync_bytes = [b for r in good for b in r.get("sync_bytes", [])]
    out["sync_bytes"] = statistics.median(sync_bytes) if sync_bytes else 0.0
    rss: dict = {}
    for run in good:
        for key, value in run["rss_mib"].items():
            rss[key] = max(rss.get(key, 0), value)
    out["rss"] = rss
    out["runs"] = len(good)
    out["wall_s"] = statistics.median(r["wall_s"] for r in good)
    return out


def _rss_text(rss: dict) -> str:
    if "process" in rss:
        return f"{rss['process']:,.0f}"
    parts = [f"driver {rss.get('driver', 0):,.0f}"]
    names = {"RankActor": "rank", "VLLMGenerator": "engine"}
    for key, value in sorted(rss.items()):
        if key in ("driver",) or key.endswith(" count"):
            continue
        label = names.get(key, key)
        count = rss.get(f"{key} count", 1)
        parts.append(f"{label} {value:,.0f}" + (f" (max of {count})" if count > 1 else ""))
    return "; ".join(parts)


def results_table(size: str, model_label: str, summaries: dict, errors: dict, options, labels: dict,
                  base_header: str = "vs TRL (same config)") -> list[str]:
    """`labels`: system name -> row label, in table order; `base_header`: the column of the ratio
    to TRL's defaults (`trl`)."""
    lines = [
        f"## {size}: {model_label}, {options.prompts} prompts x 2 completions x up to {options.new_tokens} tokens "
        f"per step",
        "",
        "| system | samples/s | step s | generate s | reward s | train s | sync s | tokens/completion | "
        f"peak RSS MiB per process | {base_header} | vs best TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = summaries.get("trl")
    trl_rows = [s for name, s in summaries.items() if name.startswith("trl") and s]
    best = max((2 * options.prompts / s["steps"] for s in trl_rows), default=None)
    for system, label in labels.items():
        if system not in summaries and system not in errors:
            continue
        summary = summaries.get(system)
        if summary is None:
            lines.append(f"| {label} | did not run: {errors.get(system, 'no result')} | | | | | | | | | |")
            continue
        sps = 2 * options.prompts / summary["steps"]
        ratio = f"{sps / (2 * options.prompts / base['steps']):.2f}x" if base else "n/a"
        sps_text = f"{sps:.1f}" if sps >= 10 else f"{sps:.2f}" if sps >= 0.1 else f"{sps:.3f}"
        best_ratio = f"{sps / best:.2f}x" if best else "n/a"
        lines.append(
            f"| {label} | {sps_text} | {summary['steps']:.3f} | {summary['generate']:.3f} | {summary['reward']:.3f} | "
            f"{summary['train']:.3f} | {summary['sync']:.3f} | {summary['tokens']:.1f} | {_rss_text(summary['rss'])} | "
            f"{ratio} | {best_ratio} |")
    spread = {name: s["step_runs"] for name, s in summaries.items() if s}
    lines += ["", "Step seconds of each round (per-run medians): " + "; ".join(
        f"{name} " + "/".join(f"{v:.2f}" for v in values) for name, values in spread.items()) + "."]
    return lines


def sync_table(per_size: dict) -> list[str]:
    lines = [
        "## Weight sync: seconds and bytes per sync beside the raw bandwidth of the same transport",
        "",
        "Sync s: median `sync/seconds` of the training runs above (odpo_gloo: rank 0's `send_weights`, "
        "including the ZeRO-3 gathers; in process: `reload_weights` + prefix-cache reset). Raw: one tensor of "
        "the model's size, measured in the same rounds (gloo: a broadcast to another process over loopback; "
        "in process: one `copy_`). Ratio = sync s / wire s, wire s = bytes / raw bandwidth; target <= 1.4. "
        "Where the rest goes: `engine reload` = the in-process sync of the same model (vLLM's layerwise "
        "reload, which odpo_gloo's receiver runs too), `pack` = one `torch.cat` of all weights into a uint8 "
        "buffer (what the sender does per bucket), `rest` = sync - wire - reload - pack (Ray calls to the "
        "engine, parameter gathers, two cores shared by every actor).",
        "",
        "| model | transport (system) | bytes | sync s | sync MB/s | raw MB/s | ratio | wire s | engine reload s | "
        "pack s | rest s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for size, data in per_size.items():
        raw = data.get("raw") or {}
        local = data["summaries"].get("ours-vllm")
        reload_s = local["sync"] if local else nan
        for system, summary in data["summaries"].items():
            if not summary or not summary.get("sync_bytes") or system.startswith("trl"):
                continue
            nbytes, seconds = summary["sync_bytes"], summary["sync"]
            in_process = system == "ours-vllm"
            bandwidth = raw.get("copy_bps" if in_process else "gloo_bps", nan)
            wire = nbytes / bandwidth
            pack = 0.0 if in_process else raw.get("pack_s", nan)
            rest = "-" if in_process else f"{seconds - wire - reload_s - pack:.3f}"
            lines.append(
                f"| {data['label']} | {'in-process reload' if in_process else 'odpo_gloo'} ({system}) | "
                f"{nbytes / 1e6:.1f} MB | {seconds:.3f} | {nbytes / seconds / 1e6:,.0f} | {bandwidth / 1e6:,.0f} | "
                f"{seconds / wire:.1f} | {wire:.4f} | {reload_s:.3f} | {'-' if in_process else f'{pack:.3f}'} | "
                f"{rest} |")
    return lines


def targets_section(per_size: dict, memory: dict | None, options) -> list[str]:
    """The issue's targets, checked against this run's figures."""
    lines = ["## Targets (this run)", ""]
    size = list(per_size)[-1]
    summaries = per_size[size]["summaries"]
    sps = {name: 2 * options.prompts / s["steps"] for name, s in summaries.items() if s}
    trl = {name: value for name, value in sps.items() if name.startswith("trl")}
    ours = {name: value for name, value in sps.items() if not name.startswith("trl")}
    if "trl" in trl and ours:
        best_trl = max(trl, key=trl.get)
        for name, value in sorted(ours.items(), key=lambda kv: -kv[1]):
            s, t, b = summaries[name], summaries["trl"], summaries[best_trl]
            vs_default, vs_best = value / trl["trl"], value / trl[best_trl]
            lines.append(
                f"- {size}, {name}: {vs_default:.2f}x TRL defaults ({'met' if vs_default >= 3 else 'missed'} >= 3x), "
                f"{vs_best:.2f}x {best_trl} ({'met' if vs_best >= 3 else 'missed'}); "
                f"step {s['steps']:.2f} s = generate {s['generate']:.2f} + reward {s['reward']:.3f} + train "
                f"{s['train']:.2f} + sync {s['sync']:.2f} (TRL defaults: generate {t['generate']:.2f}, train "
                f"{t['train']:.2f}; {best_trl}: generate {b['generate']:.2f}, train {b['train']:.2f})")
    for name, data in per_size.items():
        raw = data.get("raw") or {}
        for system, s in data["summaries"].items():
            if s and s.get("sync_bytes") and not system.startswith("trl"):
                bandwidth = raw.get("copy_bps" if system == "ours-vllm" else "gloo_bps")
                if bandwidth:
                    ratio = s["sync"] / (s["sync_bytes"] / bandwidth)
                    lines.append(f"- sync, {name}, {system}: {ratio:.1f}x bytes/raw bandwidth "
                                 f"({'met' if ratio <= 1.4 else 'missed'} <= 1.4x)")
    if memory:
        res = memory["results"]
        for grad, mode in ((False, "reference pass"), (True, "policy pass")):
            full, hidden = res.get((grad, "full")), res.get((grad, "hidden"))
            if full and hidden:
                peak = {name: statistics.median(r["peak_mib"] for r in runs) for name, runs in (("full", full),
                                                                                              ("hidden", hidden))}
                ratio = peak["full"] / peak["hidden"]
                lines.append(f"- logprob memory, vocabulary {memory['vocab']:,}, {mode}: {ratio:.1f}x lower than "
                             f"unchunked ({'met' if ratio >= 4 else 'missed'} >= 4x)")
    return lines
