"""A quiet console by default: our progress bar, metric rows, warnings and errors; the libraries'
INFO/WARNING output only with `log_level` info/debug (issue 11)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import re
import subprocess
import sys
from pathlib import Path

import pytest

from odpo_vllm.primitives import console

ROOT = Path(__file__).resolve().parents[1]


def test_library_env_is_quiet_by_default_and_follows_log_level():
    quiet = console.library_log_env("passive")
    assert quiet["VLLM_LOGGING_LEVEL"] == "ERROR" and quiet["TRANSFORMERS_VERBOSITY"] == "error"
    assert quiet["PYTHONWARNINGS"] == "ignore" and quiet["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert quiet[console.ENV_VAR] == "passive"
    verbose = console.library_log_env("info")
    assert verbose["VLLM_LOGGING_LEVEL"] == "INFO" and verbose["DATASETS_VERBOSITY"] == "info"
    assert "PYTHONWARNINGS" not in verbose and "TQDM_DISABLE" not in verbose
    assert console.library_log_env("warning")["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert console.ray_init_kwargs(None) == {"logging_level": logging.ERROR, "log_to_driver": False}
    assert console.ray_init_kwargs("debug") == {"logging_level": logging.DEBUG, "log_to_driver": True}


def test_variables_the_user_set_win(monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    env = console.library_log_env("passive")
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG" and env["PYTHONWARNINGS"] == "default"
    assert env["TRANSFORMERS_VERBOSITY"] == "error"


def test_values_inherited_from_the_starting_process_are_not_the_users(monkeypatch):
    """A process started from one that imported odpo_vllm (a subprocess, a pytest-xdist worker)
    inherits the variables we set there; they must not count as the user's choice in it."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")
    monkeypatch.setenv(console.SET_BY_US_VAR, "VLLM_LOGGING_LEVEL=ERROR;TORCH_CPP_LOG_LEVEL=ERROR")
    monkeypatch.setattr(console, "_SET_BY_US", console.inherited_settings())
    assert console.library_log_env("info")["VLLM_LOGGING_LEVEL"] == "INFO"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")  # changed since: the user's
    assert console.library_log_env("info")["VLLM_LOGGING_LEVEL"] == "WARNING"


def test_our_lines_reach_the_stderr_of_the_moment():
    """The console handler made while stderr was one stream writes to the one in place later."""
    import contextlib
    import io

    ours = logging.getLogger("odpo_vllm")
    saved = (list(ours.handlers), ours.level)
    before, after = io.StringIO(), io.StringIO()
    try:
        ours.handlers[:] = []
        with contextlib.redirect_stderr(before):
            console.configure_logging("passive")
        with contextlib.redirect_stderr(after):
            logging.getLogger("odpo_vllm.runtime.placement").warning("a line for now")
        assert "a line for now" in after.getvalue() and before.getvalue() == ""
    finally:
        console.configure_logging("passive", own_handler=False)
        ours.handlers[:] = saved[0]
        ours.setLevel(saved[1])


def test_unknown_log_level_names_the_field():
    with pytest.raises(ValueError, match="log_level: 'loud'"):
        console.normalize("loud")


LIBRARY_LOGGERS = ("vllm.v1.core.block_pool", "ray.worker", "DeepSpeed", "datasets.builder",
                   "transformers.modeling_utils")


def test_configure_logging_silences_libraries_but_not_us(capfd):
    ours = logging.getLogger("odpo_vllm")
    saved = (list(ours.handlers), ours.propagate, ours.level)
    try:
        console.configure_logging("passive")
        for name in LIBRARY_LOGGERS:
            assert not logging.getLogger(name).isEnabledFor(logging.WARNING), name
            assert logging.getLogger(name).isEnabledFor(logging.ERROR), name
        logging.getLogger("odpo_vllm.rewards.scorer").warning("our own warning")
        logging.getLogger("odpo_vllm.runtime.placement").info("our detail")
        err = capfd.readouterr().err
        assert "our own warning" in err and "our detail" not in err
        console.configure_logging("info")
        for name in LIBRARY_LOGGERS:
            assert logging.getLogger(name).isEnabledFor(logging.INFO), name
        logging.getLogger("odpo_vllm.runtime.placement").info("our detail")
        assert "our detail" in capfd.readouterr().err
    finally:
        console.configure_logging("passive", own_handler=False)
        ours.handlers[:], ours.propagate = saved[0], saved[1]
        ours.setLevel(saved[2])


def _processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or environment holds `text` (Ray's workers retitle themselves
    `ray::Class`, but inherit the run's environment)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def _demo(tmp_path, *flags):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for key in [k for k in env if k.startswith(("VLLM_LOGGING", console.ENV_VAR))]:
        env.pop(key)
    # the run's Ray processes (raylet, GCS, workers) name their session folder on their command line
    ray_tmp = tempfile.mkdtemp(prefix="odpo_ray_", dir="/tmp")  # short: Ray's socket paths have a length limit
    env["RAY_TMPDIR"] = ray_tmp
    done = subprocess.run([sys.executable, "-m", "odpo_vllm.demo", "--output_dir", str(tmp_path / "demo"), *flags],
                          cwd=tmp_path, env=env, capture_output=True, timeout=560)
    # bytes, not text=True: universal newlines would turn the progress bar's \r updates into lines
    output = (done.stdout + done.stderr).decode("utf-8", errors="replace")
    assert done.returncode == 0, output[-3000:]
    # a run never leaves processes behind (Ray's daemons need a moment to exit after shutdown)
    deadline = time.time() + 20
    while _processes_mentioning(ray_tmp) and time.time() < deadline:
        time.sleep(1)
    assert _processes_mentioning(ray_tmp) == []
    return output


def _rewards(output: str) -> tuple[float, float]:
    match = re.search(r"first log (-?[\d.]+) at step \d+, last log (-?[\d.]+) at step \d+", output)
    assert match, output[-2000:]
    return float(match.group(1)), float(match.group(2))


@pytest.mark.timeout(600)
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_demo_output_fits_one_screen(tmp_path):
    """The default demo (Ray: a vLLM engine actor and two DeepSpeed ranks): at most 30 lines,
    with the first and last mean reward, and no library line from any process."""
    output = _demo(tmp_path, "--max_steps", "40")
    lines = output.split("\n")
    assert len(lines) <= 30, "\n".join(lines)
    _rewards(output)
    for noise in ("Successfully reset prefix cache", " INFO ", "WARNING", "Triton", "pid=", "Loading weights",
                  "Generating train split", "Warning"):
        assert noise not in output, noise
    assert sum(line.startswith("{'objective/kl'") or "{'objective/kl'" in line for line in lines) == 4  # 1 row/10


@pytest.mark.timeout(600)
@pytest.mark.vllm
@pytest.mark.slow
def test_demo_log_level_info_lets_library_output_through(tmp_path):
    """In process, so the engine's loggers live in the demo's process: `--log_level info` shows
    vLLM's per-step INFO lines that the default hides."""
    output = _demo(tmp_path, "--max_steps", "10", "--in_process", "--", "--log_level", "info")
    assert "Successfully reset prefix cache" in output
    _rewards(output)
