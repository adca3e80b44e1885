"""Semi-online DPO on the real demo's task: weights pushed every s steps (`weight_sync_steps`).

    python benchmarks/bench_semi_online.py [--syncs 1,4,16] [--steps 18] [--out benchmarks/results/semi_online_cpu.md]

Each s runs `python -m odpo_vllm.demo --real`'s own code (`real_demo.run`: SmolLM2-135M-Instruct,
VADER reward, 8 prompts x 2 per step, lr 2e-5, in process with the vLLM engine) for the same
number of steps, in a fresh process, with `--weight_sync_steps s`; the held-out prompts are
answered before and after with the same seed (the end of training pushes the final weights, so
"after" is the trained model whichever s). Reported per s: held-out mean VADER after training and
the win rate over the starting model (the demo's own measures), seconds per step, and the seconds
spent in weight pushes (`sync/seconds` summed over the steps that pushed, which `metrics.jsonl`
logs every step here: logging_steps is set to 1).

Then a projection of the share of step time a push every step would cost for larger models:
bytes per push (the parameter count x 2 bytes in bf16) over a stated link bandwidth, against a
stated step time; these are arithmetic, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from worker_launch import WORKER_ENV, run_worker, save_results, write_worker_result  # this folder is the script's

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# (model, parameters, step seconds assumed, link GB/s assumed) for the projection
PROJECTION = [("Qwen2.5-0.5B", 0.49e9, 10.0, 25.0), ("Qwen2.5-7B", 7.6e9, 30.0, 25.0),
              ("Qwen2.5-7B over 10 Gb/s Ethernet (multi-node)", 7.6e9, 30.0, 1.25)]


def worker_main(cfg: dict) -> None:
    def run(cfg):
        from odpo_vllm import real_demo

        out = cfg["output_dir"]
        started = time.perf_counter()
        result = real_demo.run(out, cfg["steps"], ["--weight_sync_steps", str(cfg["sync"]), "--logging_steps", "1",
                                                   "--disable_tqdm", "true"])
        with open(os.path.join(out, "train", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        steps = [r for r in rows if "loss" in r]
        pushes = [r for r in steps if "sync/seconds" in r]
        return {"held_out_before": result["held_out_before"], "held_out_after": result["held_out_after"],
                "win_rate": result["win_rate"], "train_first": result["train_first"],
                "train_last": result["train_last"], "wall_s": time.perf_counter() - started,
                "step_s": sum(r["time/step"] for r in steps) / len(steps), "pushes": len(pushes),
                "sync_s": sum(r["sync/seconds"] for r in pushes),
                "sync_bytes": pushes[0]["sync/bytes"] if pushes else 0.0, "steps": len(steps)}

    write_worker_result(run, cfg)


def report(data: dict) -> list[str]:
    meta = data["meta"]
    lines = [f"# Semi-online DPO on the real demo's task ({meta['date']}, {meta['cpus']} CPUs)", "",
             f"`{meta['command']}`: SmolLM2-135M-Instruct, the real demo's settings (in process, vLLM engine, "
             f"8 prompts x 2 per step, lr 2e-5), {meta['steps']} steps per run, a fresh process per s; total "
             f"{meta['total_s']:.0f} s on a machine that may have run other jobs (timings indicative). Held-out: "
             "64 prompts on topics never trained on, one reply each before and after with the same seed, mean VADER; "
             "win rate: the trained model's reply against the starting model's per prompt, VADER judges, ties half.",
             "", "| weight_sync_steps s | pushes | held-out after (before) | win rate | train reward last | s per step | "
             "s in pushes (total) | bytes per push |", "|---|---|---|---|---|---|---|---|"]
    for s in meta["syncs"]:
        run = data["runs"].get(str(s))
        if not run or not run.get("ok"):
            lines.append(f"| {s} | did not run: {run.get('error') if run else 'not run'} | | | | | | |")
            continue
        lines.append(f"| {s} | {run['pushes']} | {run['held_out_after']:+.3f} ({run['held_out_before']:+.3f}) | "
                     f"{run['win_rate']:.2f} | {run['train_last']:+.3f} | {run['step_s']:.1f} | {run['sync_s']:.1f} | "
                     f"{run['sync_bytes']:.3g} |")
    lines += ["", "Projection (arithmetic, not measured): a push of the whole policy in bf16 every step, as a share "
              "of the step.", "", "| model | bytes per push | link | assumed step s | push s | share of step at s=1 | "
              "at s=4 | at s=16 |", "|---|---|---|---|---|---|---|---|"]
    for name, params, step_s, gbps in PROJECTION:
        push_s = params * 2 / (gbps * 1e9)
        shares = [push_s / s / (step_s + push_s / s) for s in (1, 4, 16)]
        lines.append(f"| {name} | {params * 2:.3g} | {gbps:g} GB/s | {step_s:g} | {push_s:.2f} | "
                     + " | ".join(f"{share:.1%}" for share in shares) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--syncs", default="1,4,16")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "semi_online_cpu.md"))
    parser.add_argument("--run_dir", default=None)
    parser.add_argument("--timeout_s", type=int, default=3600)
    args = parser.parse_args()
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="odpo_semi_online_")
    os.makedirs(run_dir, exist_ok=True)
    syncs = [int(s) for s in args.syncs.split(",")]
    started = time.perf_counter()
    data = {"meta": {"command": "python benchmarks/bench_semi_online.py " + " ".join(sys.argv[1:]), "syncs": syncs,
                     "steps": args.steps, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}, "runs": {}}
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for s in syncs:
        name = f"s{s}"
        cfg = {"sync": s, "steps": args.steps, "output_dir": os.path.join(run_dir, name),
               "result": os.path.join(run_dir, name + ".json")}
        data["runs"][str(s)] = run_worker(__file__, cfg, os.path.join(run_dir, name + ".log"), env, ROOT,
                                          args.timeout_s)
        data["meta"]["total_s"] = time.perf_counter() - started
        print(f"[{data['meta']['total_s']:6.0f}s] s={s}: {data['runs'][str(s)]}", flush=True)
        save_results(args.out, data, report(data))
    print("\n".join(report(data)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        main()
