"""Where model weights come from besides a hub id or a `from_pretrained` folder: GGUF files
(converted once to a plain folder every role can load) and models shipped in Python packages."""

from odpo_vllm.models.gguf import GGUFError, convert_gguf, is_gguf
from odpo_vllm.models.packaged import PACKAGED, packaged_gguf, smollm2

__all__ = ["GGUFError", "PACKAGED", "convert_gguf", "is_gguf", "packaged_gguf", "smollm2"]
