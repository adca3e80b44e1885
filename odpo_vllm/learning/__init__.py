"""Learning: the in-process learner, the DeepSpeed rank, the rank as a Ray actor with its weight
source, and the driver-side learner group."""
