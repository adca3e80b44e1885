"""The Ray cluster a run starts for itself (no --ray_address) runs the run's actors at the
driver's priority: Ray's default (nice 15) let any other work on the machine take their CPU."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.ray


def test_the_runs_own_cluster_runs_its_actors_at_the_drivers_priority(monkeypatch):
    import ray

    from odpo_vllm.runtime.placement import ensure_ray

    monkeypatch.delenv("RAY_worker_niceness", raising=False)  # the tests' own setting (conftest.py)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    closers = ensure_ray(SimpleNamespace(ray_address=None, ray_num_cpus=1, log_level="passive"))
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def niceness(self) -> int:
                return os.nice(0)

        assert ray.get(Probe.remote().niceness.remote(), timeout=120) == os.nice(0)
    finally:
        for close in closers:
            close()
    assert not ray.is_initialized()
