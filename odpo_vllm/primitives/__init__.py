"""What every floor above may use and that is not a tensor: the bounded waits for Ray actors and
the errors that name the actor (waits), stop signals and the waits they cut short (preemption),
the check that `output_dir` is shared (shared_storage), and each process's log levels (console).
Nothing here imports the rest of odpo_vllm."""
