"""The user-facing entry points: the reference's quick start (import line changed, local paths
in place of hub ids) and the command line with a YAML config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from odpo_vllm import toy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


@pytest.mark.vllm  # the quick start's defaults: use_vllm where vLLM is installed
@pytest.mark.slow
def test_reference_quickstart_runs_offline(model_path, reward_model_path, tmp_path):
    prompts = toy.write_prompts(tmp_path / "prompts.jsonl", n=16)
    script = (ROOT / "examples" / "quickstart.py").read_text()
    assert "from odpo_vllm import OnlineDPOConfig, OnlineDPOTrainer" in script
    offline = (
        script.replace('"Qwen/Qwen2-0.5B-Instruct"', repr(str(model_path)))
        .replace('"trl-lib/Qwen2-0.5B-Reward"', repr(str(reward_model_path)))
        .replace('load_dataset("trl-lib/ultrafeedback-prompt", split="train")',
                 f'load_dataset("json", data_files={prompts!r}, split="train")')
    )
    assert offline.count(str(model_path)) == 2 and "trl-lib" not in offline
    (tmp_path / "train_online_dpo.py").write_text(offline)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "train_online_dpo.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "Qwen2-0.5B-OnlineDPO"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # defaults: 3 epochs of 16 prompts at 8 per step = 6 steps, then the summary row
    assert rows[-1]["step"] == 6 and "train_loss" in rows[-1]
    assert (out / "checkpoint-6" / "model.safetensors").exists()


def test_cli_yaml_config_with_overrides_and_lora(model_path, tmp_path):
    from odpo_vllm.train import main

    prompts = toy.write_prompts(tmp_path / "prompts.jsonl", n=8)
    config = tmp_path / "run.yaml"
    config.write_text(
        (ROOT / "examples" / "configs" / "toy_demo.yaml").read_text()
        .replace("output_dir: runs/toy_from_yaml", f"output_dir: {tmp_path / 'from_yaml'}")
    )
    trainer, result = main([
        "--config", str(config), "--model_name_or_path", str(model_path), "--dataset_name", prompts,
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--logging_steps", "1", "--use_vllm", "false", "--use_peft", "--lora_r", "4",
        "--lora_target_modules", "q_proj", "v_proj", "--beta", "0.2",
    ])
    assert result.global_step == 2  # the command line (2) won over the file (80)
    assert trainer.args.learning_rate == 3e-3 and trainer.args.max_new_tokens == 16  # from the file
    assert [r["beta"] for r in trainer.state.log_history if "beta" in r] == [0.2, 0.2]
    assert (tmp_path / "from_yaml" / "adapter_model.safetensors").exists()
    assert trainer.model.peft_config["default"].r == 4


def test_cli_rejects_unknown_yaml_key_and_missing_reward(model_path, tmp_path):
    from odpo_vllm.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1.0e-3\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        main(["--config", str(bad), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="reward_model_path"):
        main(["--model_name_or_path", str(model_path), "--dataset_name", "x.jsonl", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("config", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(config):
    """Every shipped config uses real flag names and valid values, and each of its keys reaches
    the parsed settings with the file's value, unless the command line gives another."""
    import yaml

    from odpo_vllm.train import parse_args

    command_line = {"model_name_or_path": "m", "dataset_name": "d", "reward_model_path": "r", "bf16": False}
    flags = [part for key, value in command_line.items() for part in (f"--{key}", str(value).lower())]
    parsed = parse_args(["--config", str(config), *flags])
    for key, value in yaml.safe_load(config.read_text()).items():
        owners = [part for part in parsed if hasattr(part, key)]
        assert len(owners) == 1, key  # one flag per key
        expected = command_line.get(key, value)
        if key == "report_to" and value == "none":
            expected = []  # transformers' spelling of "none"
        assert getattr(owners[0], key) == expected, key


@pytest.mark.parametrize("config", [p for p in sorted((ROOT / "examples" / "configs").glob("*.yaml"))
                                    if "placement:" in p.read_text()], ids=lambda p: p.name)
def test_example_ray_configs_fit_eight_gpus(config):
    """Each Ray example says it runs on 8 GPUs (one node of 8, or 8 across nodes): its ranks,
    engines and reward worker must fit there. They used to ask for 8.25 (a 0.25-GPU reward
    worker beside 8 full GPUs), which Ray would have left pending forever."""
    from odpo_vllm.runtime.resources import resource_demand, shortfall, totals
    from odpo_vllm.train import parse_args

    _, args, _ = parse_args(["--config", str(config), "--model_name_or_path", "m", "--dataset_name", "d",
                             "--bf16", "false"])
    assert args.reward_model_path, "every Ray example has a reward model"
    colocated = args.placement == "colocated"
    demand = resource_demand(args, colocated, on_gpu=True, num_reward_workers=1, cluster_cpus=64.0)
    node = {"CPU": 64.0, "GPU": 8.0}
    assert shortfall(args.placement, demand, node, [node]) is None, shortfall(args.placement, demand, node, [node])
    assert totals(demand)["GPU"] == 8.0  # and no GPU idles
