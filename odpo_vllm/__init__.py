"""odpo_vllm: Online DPO with a vLLM generator, DeepSpeed learners and Ray coordination."""

from .config import OnlineDPOConfig
from .rewards import PairwiseJudge
from .trainer import OnlineDPOTrainer

__all__ = ["OnlineDPOConfig", "OnlineDPOTrainer", "PairwiseJudge"]
__version__ = "0.1.0"
