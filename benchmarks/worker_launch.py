"""One benchmark run in a fresh process: a script's `--worker` mode, its output to a log file and
its result to a JSON file that the worker writes. Shared by bench_vs_trl.py, bench_real_learning.py
and bench_seeds.py (this folder is on the path of a script run from it): `run_worker` on the
driver's side, `write_worker_result` on the worker's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback


# What every measured run's process gets: vLLM's engine in the worker's own process on loopback,
# no downloads, quiet libraries, OpenMP threads that sleep when idle (a shared 2-core machine).
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", "OMP_WAIT_POLICY": "PASSIVE",
}

def run_worker(script: str, cfg: dict, log_path: str, env: dict, cwd: str, timeout_s: int) -> dict:
    """Runs `python script --worker <cfg as JSON>` and returns the JSON the worker wrote at
    `cfg["result"]`, with `wall_s`; a worker that timed out or died gives `ok: False` and an
    `error` (for a death, the last line of its log)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(cfg)], env=env,
                           stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=cwd)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout_s}s", "wall_s": time.perf_counter() - start}
    try:
        with open(cfg["result"]) as f:
            result = json.load(f)
    except (OSError, ValueError):
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-1:]
        result = {"ok": False, "error": f"worker died: {tail[0][:200] if tail else 'no output'}"}
    result["wall_s"] = time.perf_counter() - start
    return result


def save_results(out: str, data: dict, lines: list[str]) -> None:
    """The driver's side, after every run (a benchmark stopped later keeps what is done): `data`
    as JSON beside the markdown file `out`, and `lines` (the rendered report) into it."""
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_worker_result(run, cfg: dict) -> None:
    """The worker's side: `run(cfg)`'s result dict with `ok: True`, or for any failure `ok: False`
    with the error's first line and the traceback's end (the report's row says why it did not
    run), written to `cfg["result"]`."""
    try:
        result = run(cfg)
        result["ok"] = True
    except BaseException as err:  # report, do not hide
        lines = [line for line in str(err).splitlines() if line.strip()]
        result = {"ok": False, "error": f"{type(err).__name__}: {lines[0] if lines else ''}"[:240],
                  "traceback": traceback.format_exc()[-4000:]}
    with open(cfg["result"], "w") as f:
        json.dump(result, f)
