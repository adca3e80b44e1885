"""What outlives the process or talks to people: checkpoints, preemption, the console, plots."""
