"""The run's JSON-lines logs cut back to a step (what a resume does before the steps run again)."""

from __future__ import annotations

import json
import os

from odpo_vllm.run.log_files import (
    COMPLETIONS_FILE,
    METRICS_FILE,
    cut_to_step,
    keep_rows_until,
)


def write_lines(path, lines: list[str]) -> None:
    path.write_text("".join(lines))


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_keeps_earlier_steps_and_rows_without_a_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    write_lines(path, ['{"step": 1, "loss": 1.0}\n', '{"note": "no step"}\n', '{"step": 2, "loss": 0.9}\n',
                       '{"step": 3, "loss": 0.8}\n', '{"step": 4, "lo'])  # the kill cut the last write
    assert keep_rows_until(str(path), 2) == 2  # step 3 and the torn line
    assert rows(path) == [{"step": 1, "loss": 1.0}, {"note": "no step"}, {"step": 2, "loss": 0.9}]
    assert os.listdir(tmp_path) == ["log.jsonl"]  # the rewrite's temporary file was renamed over it


def test_rows_of_the_step_itself_are_kept_up_to_the_count_given(tmp_path):
    path = tmp_path / "log.jsonl"
    write_lines(path, ['{"step": 2, "loss": 0.9}\n', '{"step": 2, "eval_loss": 0.7}\n',
                       '{"step": 2, "train_runtime": 5.0}\n'])
    assert keep_rows_until(str(path), 2, keep_at_step=2) == 1
    assert [list(row)[1] for row in rows(path)] == ["loss", "eval_loss"]


def test_a_file_that_needs_no_change_is_not_rewritten(tmp_path):
    path = tmp_path / "log.jsonl"
    write_lines(path, ['{"step": 1}\n', '{"step": 2}\n'])
    inode = os.stat(path).st_ino
    assert keep_rows_until(str(path), 2) == 0
    assert os.stat(path).st_ino == inode
    assert keep_rows_until(str(tmp_path / "missing.jsonl"), 2) == 0
    assert not (tmp_path / "missing.jsonl").exists()


def test_a_last_row_without_its_newline_gets_one(tmp_path):
    path = tmp_path / "log.jsonl"
    write_lines(path, ['{"step": 1}\n', '{"step": 2}'])
    assert keep_rows_until(str(path), 2) == 0
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'  # the next row appended starts a line


def test_cut_to_step_uses_the_history_for_metrics_and_keeps_every_completion_of_the_step(tmp_path):
    """A run that ended at step 2 (summary row after checkpoint-2) and is resumed from it; the
    checkpoint's history holds the training row of step 2 only."""
    write_lines(tmp_path / METRICS_FILE, ['{"loss": 1.0, "step": 1}\n', '{"loss": 0.9, "step": 2}\n',
                                          '{"train_runtime": 3.0, "step": 2}\n'])
    write_lines(tmp_path / COMPLETIONS_FILE, ['{"step": 1, "chosen": "a"}\n', '{"step": 2, "chosen": "b"}\n',
                                              '{"step": 2, "chosen": "c"}\n', '{"step": 3, "chosen": "d"}\n'])
    history = [{"loss": 1.0, "step": 1}, {"loss": 0.9, "step": 2}]
    cut_to_step(str(tmp_path), 2, history)
    assert rows(tmp_path / METRICS_FILE) == history
    assert [row["chosen"] for row in rows(tmp_path / COMPLETIONS_FILE)] == ["a", "b", "c"]


def test_a_fresh_start_empties_what_an_earlier_run_left(tmp_path):
    write_lines(tmp_path / METRICS_FILE, ['{"loss": 1.0, "step": 1}\n'])
    write_lines(tmp_path / COMPLETIONS_FILE, ['{"step": 1, "chosen": "a"}\n'])
    cut_to_step(str(tmp_path), 0, [])
    assert (tmp_path / METRICS_FILE).read_text() == "" and (tmp_path / COMPLETIONS_FILE).read_text() == ""
