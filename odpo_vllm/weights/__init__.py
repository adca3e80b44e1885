"""Weights on their way to the engines, as both ends speak them: what is sent (names), the wire
(buckets, the gloo group, waits that name the peer) and our vLLM weight-transfer backend. The
learner ranks send with these and the engines load with them; who drives a push is
`runtime/publisher.py`."""
