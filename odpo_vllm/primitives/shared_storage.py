"""`output_dir` must be one folder for the driver and every learner rank: under a Ray placement the
ranks write the checkpoints' DeepSpeed files (and rank 0 the saved model) on their own nodes, and
the driver writes the rest and resumes from it. A node without the shared mount would save into
its own local folder of the same name and nothing would fail until a resume found half a
checkpoint. So the driver writes a marker with a random token there before training and every
rank must read it back (`LearnerGroup.check_shared_storage`); each save checks that the ranks'
files arrived (`checkpoint.save`). Both fail with `SharedStorageError`, in the same words."""

from __future__ import annotations

import os
import secrets
import socket
import time

MARKER_PREFIX = ".odpo_vllm_storage_check."


class SharedStorageError(RuntimeError):
    """A learner rank and the driver do not see the same `output_dir`."""


def not_shared_error(output_dir: str, problems: list[str]) -> SharedStorageError:
    """The error for `problems` (each naming a rank, its node and what it could not share)."""
    return SharedStorageError(
        f"output_dir {output_dir}: {'; '.join(problems)}; output_dir must be shared storage mounted at the same "
        "path on every node (an NFS, Lustre or GCS-fuse mount: checkpoints are written by the ranks)")


def write_marker(output_dir: str) -> tuple[str, str]:
    """A new file in `output_dir` holding a random token: its path and the token. A name of its own
    per run: no node can have it cached as absent or hold one left by another run."""
    os.makedirs(output_dir, exist_ok=True)
    token = secrets.token_hex(16)
    path = os.path.join(output_dir, MARKER_PREFIX + token)
    with open(path, "w") as f:
        f.write(token)
    return path, token


def remove_marker(path: str) -> None:
    """Remove a marker of `write_marker`; one already gone (or unremovable) is left alone, so a
    cleanup never hides why the check failed."""
    try:
        os.remove(path)
    except OSError:
        pass


def sees_marker(path: str, token: str, wait_s: float = 5.0, poll_s: float = 0.5) -> bool:
    """Whether this process reads `token` in `path`, looking again for up to `wait_s` (a network
    file system may show a file another client just wrote a moment late)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as f:
                if f.read() == token:
                    return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def this_node() -> str:
    """This process's node, as an operator finds it: its IP (Ray's view) and host name."""
    host = socket.gethostname()
    try:
        import ray

        return f"{ray.util.get_node_ip_address()} ({host})"
    except Exception:  # outside Ray: the host name alone
        return host


def sees_marker_here(path: str, token: str) -> tuple[bool, str]:
    """Whether this process reads `token` in `path`, and its node: what a learner rank or a task
    pinned to a node answers the driver."""
    return sees_marker(path, token), this_node()


def blind_ranks(output_dir: str, names: list[str], answers: list[tuple[bool, str]]) -> SharedStorageError | None:
    """The error for the ranks that did not read the driver's marker (`answers`: each rank's
    `(saw it, node)`, in the order of `names`); None when every rank read it."""
    problems = [f"{name} on node {node} cannot see the file the driver wrote there"
                for name, (seen, node) in zip(names, answers) if not seen]
    return not_shared_error(output_dir, problems) if problems else None


def missing_rank_files(output_dir: str, folder: str, missing: dict[str, str], nodes: dict[str, str]) -> SharedStorageError:
    """The error for a save whose `missing` files (relative path -> the rank that writes it) are
    not in `folder`, as the driver sees it; `nodes`: each rank's node, where known."""
    by_rank: dict[str, list[str]] = {}
    for name, rank in missing.items():
        by_rank.setdefault(rank, []).append(name)
    problems = [f"{rank}{' on node ' + nodes[rank] if rank in nodes else ''} wrote {', '.join(sorted(names))} into "
                f"{folder} and the driver cannot see {'it' if len(names) == 1 else 'them'}"
                for rank, names in sorted(by_rank.items())]
    return not_shared_error(output_dir, problems)
