"""`python -m odpo_vllm.doctor`: can this installation do what the run asks, before a long run?

Prints one table: the installation against the tested set, then the run's path tried end to end
on a tiny model built here (no download) with the run's own settings (`--config run.yaml`, the
file `python -m odpo_vllm.train --config` reads, and `--placement`, `--ray_address`, flags after
`--`): Ray cluster and resources, `output_dir` on every node and rank, learner ranks, engines,
weight push and probe, sampling, a learner step, checkpoints saved and loaded back, and on GPUs
NCCL, CUDA IPC and sleep/wake where the run uses them. Exit status 1 when a row failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import secrets
import shutil
import sys
import tempfile
import time

from odpo_vllm.doctor.report import NA, Report

INSTALL_ROWS = ["python", "torch", "transformers", "vllm", "deepspeed", "ray", "other packages", "devices", "NCCL"]
RUN_ROWS = ["settings", "model", "Ray cluster", "resources", "output_dir", "trainer start", "learner start",
            "engine start", "weight push", "logprob probe", "one sample", "learner step", "checkpoint save/load",
            "NCCL push", "CUDA IPC push", "sleep/wake"]
FULL_STEPS = 3  # "a few steps": each pushes, probes and saves; the first checkpoint is loaded back after the last
# A tiny model answers any call in seconds: a longer wait is a hang, reported as one.
CALL_TIMEOUT_S, START_TIMEOUT_S = 180.0, 300.0
TOY_CONTEXT = 512  # the tiny model's context (more when the run's vllm_max_model_len asks for it)
SETTINGS_FIX = "correct the setting named; python -m odpo_vllm.train --help describes every flag and config key"


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m odpo_vllm.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's YAML file (as for python -m odpo_vllm.train --config): its "
                                         "placement, transport, dtype and engine settings")
    parser.add_argument("--placement", choices=["in_process", "dedicated", "colocated"],
                        help="default: the config's, else in_process")
    parser.add_argument("--ray_address", help="a Ray cluster to join (default: the config's, else a local one)")
    parser.add_argument("--quick", action="store_true", help=f"one training step instead of {FULL_STEPS}")
    parser.add_argument("--model", help="a policy to try instead of the tiny one built here (a hub id downloads)")
    parser.add_argument("--output_dir", help="where the run writes (default: the config's, else a temporary "
                                             "folder); the doctor works in a folder of its own inside, removed after")
    parser.add_argument("--log_level", default="passive", help="libraries' console output, as for the trainer")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more odpo_vllm.train flags after --")
    options = parser.parse_args(argv)
    options.extra = options.extra[1:] if options.extra[:1] == ["--"] else options.extra
    return options


class Workspace:
    """A folder of the doctor's own inside the run's `output_dir`: on the storage the run's
    checkpoints need, so every rank must see it (the tiny model the ranks load lives there too).
    Removed at the end, with `output_dir` itself if the doctor made it."""

    def __init__(self, output_dir: str | None):
        self.temporary = output_dir is None
        self.output_dir = os.path.abspath(output_dir or tempfile.mkdtemp(prefix="odpo_vllm_doctor_"))
        self.made = not os.path.isdir(self.output_dir)
        self.root = os.path.join(self.output_dir, f"odpo_vllm_doctor-{secrets.token_hex(4)}")
        os.makedirs(self.root)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.temporary:
            shutil.rmtree(self.output_dir, ignore_errors=True)
        elif self.made:
            with contextlib.suppress(OSError):  # only if nothing else was written there meanwhile
                os.rmdir(self.output_dir)


def config_output_dir(path: str | None) -> str | None:
    if path is None:
        return None
    import yaml

    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("output_dir")


def run_argv(options: argparse.Namespace, workspace: Workspace) -> list[str]:
    """The command line of the run the doctor tries: the config, small sizes, the user's flags
    after `--`, then what the doctor needs (its model, prompts, reward, folder, step count)."""
    argv = ["--config", options.config] if options.config else []
    argv += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_new_tokens", "8",
             # steps that move the tiny model: the checkpoint loaded back must differ from the weights it replaces
             "--learning_rate", "1e-3", "--warmup_steps", "0"]
    argv += options.extra
    argv += ["--model_name_or_path", options.model or workspace.path("model"),
             "--dataset_name", workspace.path("prompts.jsonl"), "--reward_funcs", "odpo_vllm.toy:sentiment_reward",
             "--output_dir", workspace.path("run"), "--max_steps", str(1 if options.quick else FULL_STEPS),
             "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no",
             "--report_to", "none", "--push_to_hub", "false", "--disable_tqdm", "true", "--plot_at_end", "false",
             "--log_completions", "false", "--win_rate", "false", "--log_level", options.log_level,
             # the doctor reports an engine that fails to start; a replacement would hide it
             "--ray_max_engine_restarts", "0"]
    if options.placement:
        argv += ["--placement", options.placement]
    if options.ray_address:
        argv += ["--ray_address", options.ray_address]
    return argv


def _parse_quietly(argv: list[str]):
    """`train.parse_args`, its refusal as an error: argparse prints its message and exits."""
    from odpo_vllm.train import parse_args

    with contextlib.redirect_stderr(io.StringIO()) as printed:
        try:
            return parse_args(argv)
        except SystemExit as refused:
            lines = printed.getvalue().strip().splitlines()
            raise SystemExit(lines[-1] if lines else str(refused)) from None


def describe_settings(args, options) -> str:
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    text = args.placement
    if args.placement != "in_process":
        engines = args.ray_learner_ranks if args.placement == "colocated" else args.ray_num_engines
        text += (f": {args.ray_learner_ranks} rank(s) ZeRO-{args.ray_zero_stage}, {engines} engine(s), "
                 f"weight_transport {args.weight_transport}")
    text += f", {dtype}, {args.max_steps} step(s)"
    return text + (f", from {options.config}" if options.config else "")


def settings_row(report: Report, options, cleanup: contextlib.ExitStack):
    """The run's settings as the command line reads them, sized down; (workspace, parsed) or
    (workspace or None, None) when they are refused."""
    workspace = None
    with report.check("settings", SETTINGS_FIX) as row:
        workspace = Workspace(options.output_dir or config_output_dir(options.config))
        cleanup.callback(workspace.close)
        script, args, model_args = _parse_quietly(run_argv(options, workspace))
        # the doctor's own data and timeouts, not the run's
        script.dataset_config, script.dataset_train_split = None, "train"
        args.ray_timeout_s = min(args.ray_timeout_s, CALL_TIMEOUT_S)
        args.ray_start_timeout_s = min(args.ray_start_timeout_s, START_TIMEOUT_S)
        args.save_total_limit = None  # the first checkpoint is loaded back at the end
        if args.reward_model_path:  # the run has a reward model: a tiny one in its place (reward workers)
            args.reward_model_path = workspace.path("reward_model")
        row.detail = describe_settings(args, options)
        return workspace, (script, args, model_args)
    return workspace, None


def model_row(report: Report, options, args, workspace: Workspace) -> None:
    from odpo_vllm import toy

    with report.check("model", "--model: a local model folder or hub id that transformers reads") as row:
        context = max(TOY_CONTEXT, args.vllm_max_model_len or 0)
        if options.model:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(options.model, trust_remote_code=args.trust_remote_code)
            row.detail = f"{options.model} (--model)"
        else:
            toy.build_model(workspace.path("model"), max_position_embeddings=context)
            row.detail = "a tiny Qwen2 built here (hidden 64, 2 layers; no download)"
        if args.reward_model_path:
            toy.build_model(args.reward_model_path, seed=1, reward_model=True, max_position_embeddings=context)
            row.detail += ", and a tiny reward model"
        toy.write_prompts(workspace.path("prompts.jsonl"), n=32)


def close_all(closers: list) -> None:
    """Each closer in order, the rest still run when one fails (the doctor must leave nothing behind)."""
    for close in closers:
        try:
            close()
        except Exception as err:  # noqa: BLE001 (reported, not raised: the table is printed anyway)
            print(f"odpo_vllm doctor: closing failed: {err}", file=sys.stderr)


def placement_rows(report: Report, args, workspace: Workspace, gpu: bool, cleanup: contextlib.ExitStack) -> bool:
    """Ray cluster, resources and output_dir (or their in-process forms); whether the run is on GPUs."""
    from odpo_vllm.doctor import cluster

    if args.placement == "in_process":
        cluster.in_process_rows(report, workspace.output_dir)
        return gpu and not args.use_cpu
    closers: list = []
    cleanup.callback(close_all, closers)
    on_gpu = cluster.cluster_row(report, args, closers)
    if report.ok("Ray cluster"):
        joined = bool(args.ray_address or os.environ.get("RAY_ADDRESS"))
        cluster.resources_row(report, args, on_gpu, joined)
    if report.ok("resources"):
        cluster.nodes_see_output_dir(report, workspace.output_dir)
    return on_gpu


def run(argv: list[str] | None = None) -> Report:
    """Every check; the report (nothing printed). Everything started is stopped before it returns."""
    from odpo_vllm.primitives.console import configure_logging

    options = parse_options(argv)
    configure_logging(options.log_level)
    report = Report(INSTALL_ROWS + RUN_ROWS)
    with contextlib.ExitStack() as cleanup:
        workspace, parsed = settings_row(report, options, cleanup)
        needs_vllm = parsed is None or not (parsed[1].placement == "in_process" and parsed[1].use_vllm is False)
        from odpo_vllm.doctor.install import installation_rows

        gpu = installation_rows(report, needs_vllm)
        if parsed is None:
            report.skip_rest(RUN_ROWS, "settings")
            return report
        report.placement = parsed[1].placement
        _run_path(report, options, parsed, workspace, gpu, cleanup)
    return report


def _run_path(report: Report, options, parsed, workspace: Workspace, gpu: bool, cleanup) -> None:
    from odpo_vllm.doctor import run_path
    from odpo_vllm.doctor.watch import Phases

    args = parsed[1]
    if report.blocked("model", ["torch", "transformers"]):
        return report.skip_rest(RUN_ROWS, "model")
    model_row(report, options, args, workspace)
    on_gpu = placement_rows(report, args, workspace, gpu, cleanup) if report.ok("model") else False
    blocker = next((row for row in ("model", "Ray cluster", "resources", "output_dir")
                    if row in report.rows and not report.ok(row) and report.rows[row].status != NA), None)
    if blocker is not None:
        run_path.gpu_rows(report, on_gpu, None, bool(args.vllm_enable_sleep_mode), None, needs=blocker)
        return report.skip_rest(RUN_ROWS, blocker)
    phases = Phases()
    trainer, failed = run_path.start_trainer(report, phases, parsed)
    seen = None
    if trainer is not None:
        cleanup.callback(trainer.close)  # before the cluster's closers, registered earlier
        sleep_mode = bool(args.vllm_enable_sleep_mode and on_gpu and run_path.transport_of(trainer) != "none")
        seen = run_path.train_and_load(report, phases, trainer, sleep_mode and args.async_steps == 0)
    else:
        sleep_mode = bool(args.vllm_enable_sleep_mode and on_gpu)
    run_path.gpu_rows(report, on_gpu, run_path.transport_of(trainer) if trainer is not None else None, sleep_mode,
                      seen, needs=failed or "trainer start")
    if failed is not None:
        report.skip_rest(RUN_ROWS, failed)


def seconds_since_start(main_began: float) -> float:
    """Since this process started (imports included: what a user waits for), where psutil knows
    it; else since `main` began (time.perf_counter)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 (the header is informative only)
        return time.perf_counter() - main_began


def main(argv: list[str] | None = None) -> int:
    began = time.perf_counter()
    options = parse_options(argv)
    report = run(argv)
    steps = "--quick: 1 step" if options.quick else f"{FULL_STEPS} steps"
    print(f"\nodpo_vllm doctor (placement {report.placement}, {steps}): {seconds_since_start(began):.0f} s\n")
    print(report.table())
    print(f"\n{report.summary()}")
    sys.stdout.flush()
    return report.exit_code()
