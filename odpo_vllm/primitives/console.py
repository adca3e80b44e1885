"""What reaches the console: our progress bar, metric rows, warnings and errors, and nothing of
the libraries' INFO/WARNING chatter unless `log_level` asks for it.

`log_level` is `TrainingArguments.log_level` (`--log_level`):

- `passive` (the default): odpo_vllm's warnings and errors; vLLM, Ray, DeepSpeed, transformers,
  datasets, Triton and Python warnings from libraries are silenced down to their errors, and
  datasets' progress bars are off. Ray actors do not forward their output to the driver.
- `warning`: the libraries' warnings too (and the actors' output).
- `info` / `debug`: everything at that level, from every process.
- `error` / `critical`: only errors (or worse), ours and the libraries'.

The same setting reaches every process: `configure_logging` sets this process up, and
`library_log_env` gives the environment variables that Ray actors (and any subprocess) get, read
by the libraries when they are imported and by `apply_env_log_level` when odpo_vllm is.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

ENV_VAR = "ODPO_VLLM_LOG_LEVEL"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}
# Loggers of the libraries we drive; each keeps its own handler, so its level is set directly.
LIBRARY_LOGGERS = ("vllm", "ray", "DeepSpeed", "deepspeed", "transformers", "datasets", "accelerate", "peft",
                   "torch", "triton", "filelock", "urllib3", "httpx", "huggingface_hub", "numexpr", "matplotlib",
                   "PIL", "asyncio")
# Python warnings attributed to these modules (odpo_vllm: a library's deprecation warning pointing at
# our call; our own messages go through `logging`, never `warnings`).
LIBRARY_MODULES = r"(vllm|ray|deepspeed|transformers|datasets|accelerate|peft|torch|triton|huggingface_hub|" \
                  r"pydantic|pkg_resources|setuptools|google|multiprocessing|numpy|matplotlib|odpo_vllm)(\.|$)"


# The environment variables this module set, and their values, also written to SET_BY_US_VAR: a
# process started from this one (a subprocess, a pytest-xdist worker) inherits our values and must
# not take them for the user's.
SET_BY_US_VAR = "ODPO_VLLM_ENV_SET_BY_US"


def inherited_settings() -> dict[str, str]:
    """What the process that started this one recorded in SET_BY_US_VAR."""
    return dict(item.split("=", 1) for item in os.environ.get(SET_BY_US_VAR, "").split(";") if "=" in item)


_SET_BY_US: dict[str, str] = inherited_settings()


def _user_set(key: str) -> bool:
    """Set in the environment, and not (or no longer) to the value this module gave it."""
    return key in os.environ and os.environ[key] != _SET_BY_US.get(key)


def _set_env(key: str, value: str) -> None:
    if not _user_set(key):
        os.environ[key] = _SET_BY_US[key] = value
        os.environ[SET_BY_US_VAR] = ";".join(f"{k}={v}" for k, v in _SET_BY_US.items())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not to the stream of the moment
    it was made (a notebook or a test harness that swaps stderr later still sees our lines)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def normalize(log_level: str | None) -> str:
    """`TrainingArguments.log_level` as one of passive, debug, info, warning, error, critical."""
    level = (log_level or "passive").lower()
    if level != "passive" and level not in LEVELS:
        raise ValueError(f"log_level: {log_level!r} is not one of passive, {', '.join(LEVELS)}")
    return level


def library_level(log_level: str | None) -> int:
    """The level the libraries log at: errors only unless the user asked for more."""
    level = normalize(log_level)
    return logging.ERROR if level == "passive" else LEVELS[level]


def own_level(log_level: str | None) -> int:
    """The level odpo_vllm's own loggers print at (passive: warnings)."""
    level = normalize(log_level)
    return logging.WARNING if level == "passive" else LEVELS[level]


def is_verbose(log_level: str | None) -> bool:
    """True when library output (progress bars, actor output) should reach the console."""
    return library_level(log_level) <= logging.WARNING


def library_log_env(log_level: str | None) -> dict[str, str]:
    """Environment variables that set the libraries' verbosity in another process (Ray actors,
    subprocesses). They take effect when each library is imported there. A variable the user set
    in this process keeps the user's value."""
    name = logging.getLevelName(library_level(log_level))
    env = {
        ENV_VAR: normalize(log_level),
        "VLLM_LOGGING_LEVEL": name,
        "VLLM_CONFIGURE_LOGGING": "1",
        "TRANSFORMERS_VERBOSITY": name.lower(),
        "DATASETS_VERBOSITY": name.lower(),
        "RAY_DEDUP_LOGS": "1",
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
    }
    if not is_verbose(log_level):
        env.update(PYTHONWARNINGS="ignore", HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   TQDM_DISABLE="1", TORCH_CPP_LOG_LEVEL="ERROR")
    return {key: os.environ[key] if _user_set(key) else value for key, value in env.items()}


class _LevelFloor(logging.Filter):
    """Drops records under a level. DeepSpeed resets its logger's level when it is imported, but
    keeps filters, so a filter set beforehand still applies."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def _set_library_levels(level: int) -> None:
    for name in LIBRARY_LOGGERS:
        if name == "vllm" and _user_set("VLLM_LOGGING_LEVEL"):
            continue  # the user's own setting
        lib_logger = logging.getLogger(name)
        lib_logger.setLevel(level)
        for old in [f for f in lib_logger.filters if isinstance(f, _LevelFloor)]:
            lib_logger.removeFilter(old)
        lib_logger.addFilter(_LevelFloor(level))
        for handler in lib_logger.handlers:
            handler.setLevel(level)
    if "transformers" in sys.modules:  # imported already: its helper reaches every child logger
        hf_logging = sys.modules["transformers"].utils.logging
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar() if level <= logging.WARNING else hf_logging.disable_progress_bar()


def _set_warnings(verbose: bool) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore", module=LIBRARY_MODULES)


def configure_logging(log_level: str | None = "passive", own_handler: bool = True) -> int:
    """Set up this process: our `odpo_vllm` logger prints at `own_level`, the libraries at
    `library_level`, and other processes started from here inherit the same settings through the
    environment. Returns the level of our logger."""
    level = normalize(log_level)
    ours = logging.getLogger("odpo_vllm")
    ours.setLevel(own_level(level))
    if own_handler and not any(getattr(h, "_odpo_console", False) for h in ours.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._odpo_console = True
        ours.addHandler(handler)  # still propagates: a root handler of the user's (or pytest's) sees it too
    for handler in ours.handlers:
        handler.setLevel(own_level(level))
    _set_library_levels(library_level(level))
    _set_warnings(is_verbose(level))
    env = library_log_env(level)
    env.pop("TQDM_DISABLE", None)  # our own progress bar is tqdm
    for key, value in env.items():
        _set_env(key, value)
    datasets = sys.modules.get("datasets")  # not imported yet: it reads the environment when it is
    if datasets is not None:
        if is_verbose(level):
            datasets.enable_progress_bars()
        else:
            datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity(library_level(level))
    return ours.level


def ray_init_kwargs(log_level: str | None) -> dict:
    """`ray.init` arguments: Ray's own logging level, and whether actors' output reaches the driver
    (quiet runs leave it in Ray's log files, `/tmp/ray/session_latest/logs`)."""
    return {"logging_level": library_level(log_level), "log_to_driver": is_verbose(log_level)}


def apply_env_log_level() -> None:
    """On `import odpo_vllm`, before vLLM, DeepSpeed or datasets are imported: the libraries'
    environment defaults for the run's `log_level` (`ODPO_VLLM_LOG_LEVEL`, set for Ray actors; quiet
    otherwise). Variables the user set win. `configure_logging` later applies the actual setting."""
    level = os.environ.get(ENV_VAR, "passive")
    env = library_log_env(level)
    for key in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL"):
        if key in env:
            _set_env(key, env[key])
    logging.getLogger("DeepSpeed").addFilter(_LevelFloor(library_level(level)))  # it warns while imported
    if not _user_set("VLLM_LOGGING_LEVEL"):
        # some of vLLM's modules log while imported, before vLLM has set up its logger
        logging.getLogger("vllm").setLevel(library_level(level))
    if ENV_VAR in os.environ:  # a process started by a run (its variables came with it): follow it
        configure_logging(level, own_handler=False)
