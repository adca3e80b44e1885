"""The doctor's table: one row per check (check, result, seconds, what to do when it fails).

A row is `pass`, `warn` (works, but differs from what we tested), `FAIL`, `skipped` (a check it
needs failed: the row says which) or `n/a` (not part of this run, e.g. NCCL on a CPU machine).
Checks fill their rows through `Report.check`, which times them and turns an exception into a
failed row with the error and a fix, so that one broken piece does not hide the others.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass

PASS, WARN, FAIL, SKIP, NA = "pass", "warn", "FAIL", "skipped", "n/a"
OK = (PASS, WARN)
# Wider cells do not widen their column: a long error stays on its own line instead of pushing
# every row of the table to its width.
MAX_WIDTH = {"check": 22, "result": 70, "seconds": 7, "fix": 60}
# "trainer start": the trainer refused a setting before any watched part of its start ran
FAIL_ONLY = {"trainer start"}
HEADER = {"check": "check", "result": "result", "seconds": "s", "fix": "what to do when it fails"}


@dataclass
class Row:
    check: str
    status: str
    detail: str = ""
    seconds: float | None = None
    fix: str = ""

    @property
    def result(self) -> str:
        return f"{self.status}: {self.detail}" if self.detail else self.status

    def cells(self) -> dict[str, str]:
        seconds = "" if self.seconds is None else f"{self.seconds:.2f}" if self.seconds < 1 else f"{self.seconds:.1f}"
        # the fix only where something went wrong: on a passing row it is noise
        return {"check": self.check, "result": self.result, "seconds": seconds,
                "fix": self.fix if self.status in (FAIL, WARN) else ""}


ERROR_LINE = re.compile(r"^[\w.]+(Error|Exception|Exit)\b[^:]*: ")


def describe_error(err: BaseException, limit: int = 500) -> str:
    """One line for a table cell: the error's type and message. A Ray error carries the remote
    traceback: what happened over there starts at its last `SomethingError: ...` line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    starts = [index for index, line in enumerate(lines) if ERROR_LINE.match(line)]
    if starts and starts[-1] > 0:
        lines = lines[starts[-1]:]
    text = " ".join(lines)
    if not ERROR_LINE.match(text):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Report:
    """The rows of one doctor run, printed in `order` (rows not in it come last, as added)."""

    def __init__(self, order: list[str]):
        self.order = order
        self.rows: dict[str, Row] = {}
        self.placement = "unknown (settings refused)"  # the run's, once its settings are read

    def add(self, check: str, status: str, detail: str = "", seconds: float | None = None, fix: str = "") -> Row:
        row = self.rows[check] = Row(check, status, detail, seconds, fix)
        return row

    def ok(self, check: str) -> bool:
        row = self.rows.get(check)
        return row is not None and row.status in OK

    def blocked(self, check: str, needs: list[str]) -> bool:
        """Adds `check` as skipped, naming the first of `needs` that did not pass, and says so."""
        missing = next((need for need in needs if not self.ok(need)), None)
        if missing is not None:
            self.add(check, SKIP, f"needs {missing}")
        return missing is not None

    def skip_rest(self, checks: list[str], needs: str) -> None:
        """Each of `checks` not filled yet is skipped, needing `needs` (the row that failed); a
        row that only exists when it fails (`FAIL_ONLY`) is left out."""
        for check in checks:
            if check not in self.rows and check not in FAIL_ONLY:
                self.add(check, SKIP, f"needs {needs}")

    @contextlib.contextmanager
    def check(self, check: str, fix: str):
        """Times the block and yields its row (passing unless the block says otherwise); an
        exception in it fails the row with the error and `fix`, and is not raised further. A
        `SystemExit` counts too: the command line's parser refuses bad settings with one."""
        row = self.add(check, PASS, fix=fix)
        start = time.perf_counter()
        try:
            yield row
        except (Exception, SystemExit) as err:
            row.status, row.detail = FAIL, describe_error(err)
        finally:
            row.seconds = time.perf_counter() - start

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.rows.values() if row.status == FAIL]

    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def sorted_rows(self) -> list[Row]:
        rank = {check: index for index, check in enumerate(self.order)}
        return sorted(self.rows.values(), key=lambda row: rank.get(row.check, len(rank)))

    def table(self) -> str:
        """A Markdown table, aligned for the console and ready to paste into an issue."""
        rows = [HEADER] + [row.cells() for row in self.sorted_rows()]
        widths = {key: min(max(len(cells[key]) for cells in rows), MAX_WIDTH[key]) for key in HEADER}

        def line(cells: dict[str, str]) -> str:
            return "| " + " | ".join(cells[key].replace("|", "/").ljust(widths[key]) for key in HEADER) + " |"

        rule = "|" + "|".join("-" * (widths[key] + 2) for key in HEADER) + "|"
        return "\n".join([line(rows[0]), rule] + [line(cells) for cells in rows[1:]])

    def summary(self) -> str:
        failed, warned = self.failed, [row.check for row in self.rows.values() if row.status == WARN]
        warnings = f"; warnings: {', '.join(warned)}" if warned else ""
        if not failed:
            return f"no check failed ({len(self.rows)} checks{warnings})"
        return f"{len(failed)} of {len(self.rows)} checks failed: {', '.join(row.check for row in failed)}{warnings}"
