"""`python -m odpo_vllm.doctor`: checks, before a long run, that this installation can do what
the run asks (`cli.py`; docs/doctor.md). The modules: `cli` (the command line, the order of the
checks), `install` (packages, devices), `cluster` (Ray, resources, output_dir on every node),
`run_path` (the trainer's start, steps, checkpoints, GPU rows), `watch` (timing the trainer's own
calls), `report` (the table)."""
