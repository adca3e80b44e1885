"""Weights on their way to the engines: what is sent (names), who sends and proves it
(publisher), the wire, and our vLLM weight-transfer backend."""
