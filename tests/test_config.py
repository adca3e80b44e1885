"""OnlineDPOConfig: validation names the field, defaults match the reference, CLI parsing works."""

from __future__ import annotations

import pytest
import torch
from transformers import HfArgumentParser

from odpo_vllm import OnlineDPOConfig


def config(tmp_path, **kwargs):
    return OnlineDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", **kwargs)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("loss_type", {"loss_type": "hinge"}),
        ("loss_type", {"loss_type": "SIGMOID"}),
        ("beta", {"beta": 0.0}),
        ("beta", {"beta": -0.1}),
        ("beta", {"beta": [0.1, 0.0]}),
        ("beta", {"beta": [0.1, -1.0, 0.2]}),
        ("beta", {"beta": []}),
        ("beta", {"beta": float("nan")}),
        ("beta", {"beta": "0.1"}),
        ("learning_rate", {"learning_rate": -1e-5}),
        ("learning_rate", {"learning_rate": float("nan")}),
        ("missing_eos_penalty", {"missing_eos_penalty": -1.0}),
        ("missing_eos_penalty", {"missing_eos_penalty": -1e-9}),
        ("max_new_tokens", {"max_new_tokens": 256, "max_length": 256}),
        ("max_new_tokens", {"max_new_tokens": 300}),
        ("max_new_tokens", {"max_new_tokens": 0}),
        ("temperature", {"temperature": 0.0}),
        ("temperature", {"temperature": -0.5}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_p", {"top_p": -0.1}),
        ("num_samples", {"num_samples": 1}),
        ("num_samples", {"num_samples": 0}),
        ("top_k", {"top_k": -1}),
        ("min_p", {"min_p": 1.5}),
        ("repetition_penalty", {"repetition_penalty": 0.0}),
        ("generation_batch_size", {"generation_batch_size": 0}),
        ("vllm_gpu_memory_utilization", {"vllm_gpu_memory_utilization": 0.0}),
        ("vllm_gpu_memory_utilization", {"vllm_gpu_memory_utilization": 1.2}),
        ("vllm_tensor_parallel_size", {"vllm_tensor_parallel_size": 0}),
        ("vllm_kv_cache_memory_bytes", {"vllm_kv_cache_memory_bytes": 64}),
        ("vllm_max_model_len", {"vllm_max_model_len": 64, "max_new_tokens": 64}),
        ("placement", {"placement": "ray"}),
        ("ray_zero_stage", {"ray_zero_stage": 1}),
        ("weight_transport", {"weight_transport": "tcp"}),
        ("ray_learner_ranks", {"ray_learner_ranks": 0}),
        ("ray_cpus_per_actor", {"ray_cpus_per_actor": 0}),
        ("ray_cpus_per_reward_worker", {"ray_cpus_per_reward_worker": -0.25}),
        ("ray_cpus_per_reward_worker", {"ray_cpus_per_reward_worker": float("nan")}),
        ("ray_wait_for_resources_s", {"ray_wait_for_resources_s": -1.0}),
    ],
)
def test_invalid_value_raises_naming_field(tmp_path, field, kwargs):
    with pytest.raises(ValueError) as info:
        config(tmp_path, **kwargs)
    assert f"OnlineDPOConfig.{field}" in str(info.value)


def test_generation_kwargs_bad_json_names_field(tmp_path):
    with pytest.raises(ValueError, match="generation_kwargs"):
        config(tmp_path, generation_kwargs="{not json")


def test_generation_kwargs_json_string_is_parsed_and_overrides(tmp_path):
    args = config(tmp_path, generation_kwargs='{"max_new_tokens": 3, "top_k": 5}', max_new_tokens=8)
    assert args.generation_kwargs == {"max_new_tokens": 3, "top_k": 5}
    settings = args.sampling_settings()
    assert settings["max_new_tokens"] == 3 and settings["top_k"] == 5
    assert settings["temperature"] == args.temperature


def test_valid_edge_values_construct(tmp_path):
    args = config(tmp_path, top_p=1.0, max_new_tokens=255, max_length=256, missing_eos_penalty=0.0, num_samples=2)
    assert args.top_p == 1.0 and args.max_new_tokens == 255 and args.missing_eos_penalty == 0.0


def test_defaults_match_reference(tmp_path):
    args = OnlineDPOConfig(output_dir=str(tmp_path / "out"))
    assert args.logging_steps == 10
    assert args.gradient_checkpointing is True
    assert args.learning_rate == 5e-7
    assert args.remove_unused_columns is False
    assert args.max_new_tokens == 64
    assert args.max_length == 256
    assert args.temperature == 0.9
    assert args.beta == 0.1 and isinstance(args.beta, float)  # the reference's default: a float
    assert args.loss_type == "sigmoid"
    assert args.disable_dropout is True
    assert args.missing_eos_penalty is None
    assert args.reward_model_path is None
    assert args.num_samples == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only default")
def test_bf16_default_resolves_to_false_on_cpu(tmp_path):
    args = OnlineDPOConfig(output_dir=str(tmp_path / "out"))
    assert args.bf16 is False
    assert args.fp16 is False


def test_beta_keeps_the_type_given(tmp_path):
    args = config(tmp_path, beta=0.2)
    assert args.beta == 0.2 and isinstance(args.beta, float)
    assert args.beta_at(0) == 0.2 and args.beta_at(5) == 0.2
    assert config(tmp_path, beta=1).beta == 1.0 and isinstance(config(tmp_path, beta=1).beta, float)
    one = config(tmp_path, beta=[0.3])
    assert one.beta == [0.3] and isinstance(one.beta, list)  # a list stays a list
    assert one.beta_at(0) == 0.3 and one.beta_at(4) == 0.3


def test_beta_list_per_epoch(tmp_path):
    args = config(tmp_path, beta=[0.1, 0.05])
    assert args.beta == [0.1, 0.05]
    assert args.beta_at(0) == 0.1 and args.beta_at(1) == 0.05 and args.beta_at(2) == 0.05


def test_command_line_beta_default_single_and_list(tmp_path):
    from odpo_vllm.train import parse_args

    base = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", "m", "--dataset_name", "d.jsonl",
            "--reward_model_path", "r"]
    assert parse_args(base)[1].beta == 0.1 and isinstance(parse_args(base)[1].beta, float)
    single = parse_args(base + ["--beta", "0.2"])[1].beta
    assert single == 0.2 and isinstance(single, float)
    assert parse_args(base + ["--beta", "0.2", "0.1"])[1].beta == [0.2, 0.1]
    config = tmp_path / "run.yaml"
    config.write_text("beta: [0.3]\n")  # a list in a file stays a list
    assert parse_args(["--config", str(config)] + base)[1].beta == [0.3]
    config.write_text("beta: 0.3\n")
    assert parse_args(["--config", str(config)] + base)[1].beta == 0.3


def test_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(OnlineDPOConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path / "out"),
            "--beta", "0.1", "0.05",
            "--max_new_tokens", "53",
            "--missing_eos_penalty", "1.0",
            "--warmup_steps", "0.1",
            "--report_to", "none",
        ]
    )
    assert args.beta == [0.1, 0.05]
    assert args.max_new_tokens == 53
    assert args.missing_eos_penalty == 1.0
    assert args.warmup_steps == pytest.approx(0.1)
    # a warmup below 1 is a ratio of the training steps
    assert args.get_warmup_steps(100) == 10


def test_hf_argument_parser_rejects_invalid(tmp_path):
    parser = HfArgumentParser(OnlineDPOConfig)
    with pytest.raises(ValueError, match="OnlineDPOConfig.loss_type"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path / "out"), "--loss_type", "kto"])


def test_command_line_help_prints_every_field(capsys):
    """`--help` formats every field's help (argparse %-formats it: a bare '%' in a help text crashed it)."""
    from odpo_vllm.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--weight_sync_steps" in printed and "--preemption_grace_s" in printed and "--lora_r" in printed
