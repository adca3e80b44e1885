"""Nothing left behind when the driver is killed.

A run that starts its own Ray cluster owns its processes (GCS, raylet, agents, workers). A normal
end, an error or a SIGTERM shuts them down (`ray.shutdown`), but a SIGKILLed driver runs no code:
the raylet and the workers then follow within seconds, while Ray's dashboard and runtime-env
agents keep trying to reach the dead GCS for about a minute. This watchdog, a small process of its
own session, learns the cluster's processes (refreshed every second) and waits on a pipe from the
driver: if the pipe breaks without a goodbye, it kills every process it knows and exits.

    python odpo_vllm/runtime/watchdog.py ROOT_PID...      (stdin: the pipe; "bye" ends it quietly)
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import psutil

REFRESH_S = 1.0


def descendants(roots: list[psutil.Process]) -> dict[int, psutil.Process]:
    """pid -> process of `roots` (those still alive) and every process below them."""
    found = {}
    for root in roots:
        try:
            for process in [root, *root.children(recursive=True)]:
                found[process.pid] = process
        except psutil.Error:  # the root is gone (or its pid reused): what it left is already known
            pass
    return found


def watch(root_pids: set[int]) -> None:
    roots = []
    for pid in root_pids:
        try:
            roots.append(psutil.Process(pid))  # remembers its start time: a reused pid is never taken for it
        except psutil.NoSuchProcess:
            pass
    said: list[str] = []
    closed = threading.Event()

    def read():
        said.append(sys.stdin.readline())
        closed.set()

    threading.Thread(target=read, daemon=True).start()
    # Processes stay known after they leave the tree: an orphan is moved under init, but still ours.
    known: dict[int, psutil.Process] = {}
    while not closed.wait(REFRESH_S):
        known.update(descendants(roots))
    if said and said[0].strip() == "bye":
        return
    known.update(descendants(roots))
    for process in known.values():
        if process.pid != os.getpid():
            try:
                process.kill()  # psutil checks the start time first: a reused pid is left alone
            except psutil.Error:
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
