"""What outlives the process or reports on it: checkpoints, evaluation, the log files, plots. The
top floor with the trainer; stop signals and log levels are `primitives/`."""
