"""Nothing left behind when the driver is killed.

A run that starts its own Ray cluster owns its processes (GCS, raylet, agents, workers). A normal
end, an error or a SIGTERM shuts them down (`ray.shutdown`), but a SIGKILLed driver runs no code:
the raylet and the workers then follow within seconds, while Ray's dashboard and runtime-env
agents keep trying to reach the dead GCS for about a minute. This watchdog, a small process of its
own session, learns the cluster's processes (refreshed every second) and waits on a pipe from the
driver: if the pipe breaks without a goodbye, it kills every process it knows and exits.

    python odpo_vllm/watchdog.py ROOT_PID...      (stdin: the pipe; "bye" ends it quietly)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

REFRESH_S = 1.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of `pid`, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def descendants(roots: set[int]) -> dict[int, int]:
    """pid -> start time of `roots` and every process below them."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(name))
                starts[int(name)] = stat[1]
    found, todo = {}, [pid for pid in roots if pid in starts]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = starts[pid]
            todo += children.get(pid, [])
    return found


def watch(roots: set[int]) -> None:
    said: list[str] = []
    closed = threading.Event()

    def read():
        said.append(sys.stdin.readline())
        closed.set()

    threading.Thread(target=read, daemon=True).start()
    known: dict[int, int] = {}
    while not closed.wait(REFRESH_S):
        known.update(descendants(roots))
    if said and said[0].strip() == "bye":
        return
    known.update(descendants(roots))
    for pid, start in known.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == start and pid != os.getpid():  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


class Watchdog:
    """The driver's end: `close()` says goodbye (the cluster was shut down properly)."""

    def __init__(self, roots: list[int]):
        # run as a file, not a module of the package: nothing heavy to import
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, roots)],
                                        stdin=subprocess.PIPE, start_new_session=True)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(b"bye\n")
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=2 * REFRESH_S + 5)
            except subprocess.TimeoutExpired:
                self.process.kill()


def cluster_roots() -> list[int]:
    """The processes `ray.init` started for a local cluster (their workers are found below them)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # (private: checked below)
    processes = getattr(node, "all_processes", None) or {}
    roots = [info.process.pid for infos in processes.values() for info in infos]
    if not roots:
        raise RuntimeError("Ray's list of the processes it started is not available")
    return roots


if __name__ == "__main__":
    watch({int(pid) for pid in sys.argv[1:]})
    sys.exit(0)
