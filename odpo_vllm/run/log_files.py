"""The run's JSON-lines logs in `output_dir`, appended to as the run goes:

- `metrics.jsonl`: every row `trainer.log` writes (each also goes to `state.log_history`), with
  the `step` it was logged at;
- `completions.jsonl`: the sampled pairs at each training log, each with its `step`.

A resumed run starts again at its checkpoint's step, so `cut_to_step` first removes what the run
logged after that point (a crash after the checkpoint left those rows; the steps run again and
log them again). A fresh start is step 0: rows an earlier run left in the same `output_dir` go.
"""

from __future__ import annotations

import json
import logging
import os

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"

logger = logging.getLogger(__name__)


def cut_to_step(output_dir: str, step: int, log_history: list[dict]) -> None:
    """Make the logs of `output_dir` hold what the run had logged when it was at `step`, with
    `log_history` the trainer state of that moment (a checkpoint's, or the trainer's own).

    metrics.jsonl keeps rows of earlier steps and, of `step`'s rows, as many as `log_history`
    holds: the rows logged at `step` after its checkpoint was written (the summary of a run that
    ended there) go, those logged before it stay. completions.jsonl keeps rows up to `step`
    (they are written before the step's checkpoint)."""
    at_step = sum(1 for row in log_history if row.get("step") == step)
    for name, keep_at_step in ((METRICS_FILE, at_step), (COMPLETIONS_FILE, None)):
        path = os.path.join(output_dir, name)
        dropped = keep_rows_until(path, step, keep_at_step)
        if dropped:
            # step 0: a fresh start in an output_dir that holds an earlier run's logs
            log = logger.warning if step == 0 else logger.info
            log("%s: removed %d row(s) logged after step %d, which %s", path, dropped, step,
                "an earlier run in this output_dir left (a fresh start)" if step == 0 else "run again now")


def keep_rows_until(path: str, step: int, keep_at_step: int | None = None) -> int:
    """Rewrite the JSON-lines file `path` with its rows of steps before `step` and the first
    `keep_at_step` rows of `step` (None: all of them); rows without a step are kept, and a line
    that does not parse (a write cut short by a kill) is dropped. The file is replaced in one
    rename, so a kill meanwhile leaves the old file or the new one. How many lines were dropped;
    a file that needs no change (or does not exist) is left untouched."""
    if not os.path.exists(path):
        return 0
    kept, dropped, seen_at_step, rewrite = [], 0, 0, False
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            row_step = row.get("step") if isinstance(row, dict) else None
            if isinstance(row_step, (int, float)) and row_step >= step:
                if row_step > step or (keep_at_step is not None and seen_at_step >= keep_at_step):
                    dropped += 1
                    continue
                seen_at_step += 1
            if not line.endswith("\n"):  # a last row whose newline a kill cut off: the next row would join it
                line, rewrite = line + "\n", True
            kept.append(line)
    if not (dropped or rewrite):
        return 0
    # beside the file (same filesystem, so the rename is atomic); a fixed name, so that what a
    # killed rewrite left is overwritten by the next one
    temporary = f"{path}.rewrite"
    with open(temporary, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    return dropped
