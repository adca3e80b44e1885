"""Command line: `python -m odpo_vllm.train [--config run.yaml] [--flag value ...]`.

Takes the flags of the reference's example script (every `OnlineDPOConfig` / `TrainingArguments`
field, plus the model, dataset and LoRA flags below). A YAML file given with `--config` sets
defaults; flags on the command line win over it.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser

from odpo_vllm.config import OnlineDPOConfig
from odpo_vllm.primitives.preemption import Preempted
from odpo_vllm.primitives.console import configure_logging

logger = logging.getLogger("odpo_vllm")


@dataclass
class ScriptArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset name, a local .jsonl/.json/.parquet/.csv file, or a saved dataset dir."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (with --eval_strategy)."})
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Python reward functions as 'package.module:function' (in addition to reward_model_path)."},
    )
    win_rate: bool = field(
        default=False,
        metadata={"help": "At each evaluation log eval_win_rate: how often the run's reward prefers the policy's "
                          "completion of an evaluation prompt to the starting policy's (ties half). Needs "
                          "--eval_strategy steps or epoch."},
    )
    win_rate_num_prompts: int | None = field(
        default=None, metadata={"help": "Evaluation prompts the win rate compares on (default: all)."})


@dataclass
class ModelConfig:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Policy model: hub id or local path."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    dtype: str | None = field(default=None, metadata={"help": "Load dtype: auto, float32, bfloat16, float16."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to adapt (default: PEFT's per-architecture choice)."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full beside LoRA."})


def _parser() -> HfArgumentParser:
    return HfArgumentParser((ScriptArguments, OnlineDPOConfig, ModelConfig))


def parse_args(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise SystemExit("--config: give the path of a YAML file")
        path = argv[at + 1]
        del argv[at : at + 2]
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"--config {path}: unknown keys {unknown}; see `python -m odpo_vllm.train --help`")
        parser.set_defaults(**values)
        # output_dir is required by TrainingArguments' parser: satisfied by the file too
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    script, args, model = parser.parse_args_into_dataclasses(args=argv)
    if not model.model_name_or_path:
        raise SystemExit("--model_name_or_path: required (a hub id or a local model directory)")
    if not script.dataset_name:
        raise SystemExit("--dataset_name: required (a hub dataset or a local data file)")
    if not script.reward_funcs and not args.reward_model_path:
        raise SystemExit("--reward_model_path or --reward_funcs: give at least one reward")
    if script.win_rate and args.eval_strategy == "no":
        raise SystemExit("--win_rate: the win rate is measured at evaluations; add --eval_strategy steps (with "
                         "--eval_steps) or epoch, and a --dataset_test_split")
    if "--beta" in argv and isinstance(args.beta, list) and len(args.beta) == 1:
        args.beta = args.beta[0]  # `--beta 0.1` is one number, as in the reference; `--beta 0.1 0.05` a list
    return script, args, model


def import_callable(spec: str):
    if ":" not in spec:
        raise SystemExit(f"--reward_funcs {spec!r}: write it as 'package.module:function'")
    module_name, name = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"--reward_funcs {spec!r}: cannot import ({err})") from err


def build_trainer(argv: list[str] | None = None):
    """The trainer the command line would run (flags as on the command line), not started, and the
    script's own arguments (dataset, reward functions)."""
    return trainer_from_args(*parse_args(argv))


def trainer_from_args(script: ScriptArguments, args: OnlineDPOConfig, model_args: ModelConfig):
    """`build_trainer` from arguments already parsed (`parse_args`): the doctor parses first, to
    check the settings apart from the start of the trainer."""
    configure_logging(args.log_level)  # quiet libraries (here and in Ray actors) unless --log_level asks
    from odpo_vllm.data import load_prompt_dataset
    from odpo_vllm.trainer import OnlineDPOTrainer

    train_dataset = load_prompt_dataset(script.dataset_name, script.dataset_train_split, script.dataset_config)
    eval_dataset = None
    if args.eval_strategy != "no":
        eval_dataset = load_prompt_dataset(script.dataset_name, script.dataset_test_split, script.dataset_config)

    reward_funcs = [import_callable(spec) for spec in script.reward_funcs]
    if args.reward_model_path:
        reward_funcs.insert(0, args.reward_model_path)

    if model_args.dtype:
        args.model_init_kwargs = {**(args.model_init_kwargs or {}), "dtype": model_args.dtype}
    if model_args.model_revision != "main":
        args.model_init_kwargs = {**(args.model_init_kwargs or {}), "revision": model_args.model_revision}
    peft_config = None
    if model_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules, modules_to_save=model_args.lora_modules_to_save,
            task_type="CAUSAL_LM",
        )
    trainer = OnlineDPOTrainer(
        model=model_args.model_name_or_path, reward_funcs=reward_funcs, args=args,
        train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config,
    )
    if script.win_rate:
        from odpo_vllm.run.win_rate import WinRateCallback

        trainer.add_callback(WinRateCallback(None, trainer, num_prompts=script.win_rate_num_prompts))
    return trainer, script


def main(argv: list[str] | None = None):
    trainer, script = build_trainer(argv)
    args = trainer.args
    with trainer:  # closes the engines, ranks and reward workers (and the run's own Ray cluster)
        try:
            result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        except Preempted as stopped:
            logger.error("%s", stopped)
            raise SystemExit(stopped.exit_code) from None
        trainer.save_model(args.output_dir)
        if args.push_to_hub:
            trainer.push_to_hub(commit_message=f"Online DPO on {script.dataset_name}")
    return trainer, result


if __name__ == "__main__":
    main()
