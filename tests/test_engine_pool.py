"""The engine pool's bookkeeping without a Ray cluster: engines are stand-ins that write their
start-up files where the pool tells them, as `VLLMGenerator` does."""

from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

import pytest

from odpo_vllm.runtime.engine_pool import ENGINE_FILES_PREFIX, EnginePool


@pytest.fixture
def killed(monkeypatch) -> list:
    """Stands in for what the pool calls on `ray`: every ping is answered, kills are recorded."""
    import ray

    killed = []
    monkeypatch.setattr(ray, "kill", killed.append)
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (refs, []))
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    return killed


def start_engine(name, index, attempt, files_dir):
    os.makedirs(files_dir)
    with open(os.path.join(files_dir, "config.json"), "w") as f:
        f.write("{}")
    ping = SimpleNamespace(remote=lambda: 0)
    return SimpleNamespace(name=f"{name}.{attempt}", ping=SimpleNamespace(options=lambda **_: ping))


def test_a_replaced_engine_s_folder_goes_at_once_and_the_run_s_folder_at_close(killed):
    pool = EnginePool(start_engine, 2, timeout_s=1, max_restarts=2)
    root = pool.files_root
    assert os.path.dirname(root) == tempfile.gettempdir() and os.path.basename(root).startswith(ENGINE_FILES_PREFIX)
    assert sorted(os.listdir(root)) == ["vllm-engine-0.0", "vllm-engine-1.0"]

    pool.replace("vllm-engine-1", "died (a test)")
    pool.replace("vllm-engine-1", "died (a test)")
    assert sorted(os.listdir(root)) == ["vllm-engine-0.0", "vllm-engine-1.2"]
    assert [engine.name for engine in killed] == ["vllm-engine-1.0", "vllm-engine-1.1"]

    pool.close()
    assert not os.path.exists(root)


def test_a_failed_start_kills_what_it_started_and_removes_the_run_s_folder(killed):
    started = []

    def start_then_fail(name, index, attempt, files_dir):
        if index == 1:
            raise ValueError("no such resources (a test)")
        started.append((start_engine(name, index, attempt, files_dir), files_dir))
        return started[-1][0]

    with pytest.raises(ValueError, match="no such resources"):
        EnginePool(start_then_fail, 2, timeout_s=1, max_restarts=0)
    (engine, files_dir), = started
    assert killed == [engine]
    assert not os.path.exists(os.path.dirname(files_dir))


def test_losing_an_engine_s_node_counts_as_losing_the_engine():
    """A part whose engine's node went away fails with Ray's object or node errors, not an actor
    error; those must lead to a replacement too, while an error raised by the call itself is a bug
    to report (the exception classes are Ray's own)."""
    import ray.exceptions as errors

    from odpo_vllm.primitives.waits import engine_lost

    object_id = "0" * 56
    assert engine_lost(errors.ActorDiedError())
    assert engine_lost(errors.OwnerDiedError(object_id, "", ""))
    assert engine_lost(errors.ObjectLostError(object_id, "", ""))
    assert engine_lost(errors.NodeDiedError("node 10.0.0.5 died"))
    assert not engine_lost(ValueError("a bug in the call"))
    assert not engine_lost(errors.RayTaskError("generate", "Traceback ...", ValueError("bad prompt")))
