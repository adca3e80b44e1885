"""The completions table for the trackers in `report_to` (`log_completions=True`).

transformers' integrations carry scalars only, and TRL's `LogCompletionsCallback` sends its table
to wandb and comet only. With `log_completions` each logged step's pairs (prompt, chosen,
rejected, their scores) already go to `completions.jsonl`; this sends the same rows, under the
key `completion_pairs`, to the trackers the run reports to: a table to wandb and trackio, a
markdown table (text) to tensorboard. A tracker whose run is not open gets nothing.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

KEY = "completion_pairs"
COLUMNS = ["step", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"]


def _cells(step: int, rows: list[dict]) -> list[list]:
    def text(prompt):
        return prompt if isinstance(prompt, str) else prompt[-1]["content"]  # a chat: its last message

    return [[step, text(r["prompt"]), r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"]]
            for r in rows]


def _markdown(cells: list[list]) -> str:
    def clean(value):
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(clean(v) for v in row) + " |" for row in cells])


def log_completion_pairs(report_to: list[str], callbacks: list, step: int, rows: list[dict]) -> None:
    """Send the step's pairs to each tracker of `report_to` (`callbacks`: the trainer's, where
    tensorboard's writer lives)."""
    if not rows:
        return
    cells = _cells(step, rows)
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({KEY: wandb.Table(columns=COLUMNS, data=cells)})
    if "trackio" in report_to:
        import pandas as pd
        import trackio

        try:
            trackio.log({KEY: trackio.Table(dataframe=pd.DataFrame(cells, columns=COLUMNS))}, step=step)
        except RuntimeError as err:  # no open trackio run
            logger.debug("trackio: completion pairs not logged: %s", err)
    if "tensorboard" in report_to:
        writer = next((getattr(c, "tb_writer", None) for c in callbacks if getattr(c, "tb_writer", None)), None)
        if writer is not None:
            writer.add_text(KEY, _markdown(cells), step)
            writer.flush()
