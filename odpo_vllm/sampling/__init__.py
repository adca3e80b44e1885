"""Sampling: which policy version samples each batch (pipeline), the samplers (transformers,
vLLM), engine actors used as one generator, scoring and pairing."""
