"""A learner group on Ray: N DeepSpeed ranks (`RankActor`s), driven from the driver as one `Learner`.

The driver shards each step's pairs across the ranks, waits for all of them with a timeout that
names the rank that did not answer, and combines their metrics into the step's means.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from typing import Any

import torch

from odpo_vllm.core.batches import PairBatch
from odpo_vllm.learning.rank_actor import RankActor
from odpo_vllm.primitives import shared_storage
from odpo_vllm.primitives.preemption import StopWaiting
from odpo_vllm.primitives.waits import Notice, wait_all


RAY_WORKER_PORTS_END = 20000  # Ray's default --max-worker-port is 19999


def _ephemeral_start() -> int:
    """The first port the kernel hands to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a listener opened a moment later (a gloo group's or DeepSpeed's master).
    Chosen below the kernel's ephemeral range: the ports the kernel hands to outgoing connections,
    which Ray opens by the hundred, so one picked in that range was taken before its listener bound
    (EADDRINUSE) while two clusters ran side by side. Also above Ray's worker ports (10002-19999 by
    default), which its workers bind. Falls back to any free port."""
    low = _ephemeral_start()
    rng = random.Random()  # not the training RNG
    for _ in range(64):
        port = rng.randrange(RAY_WORKER_PORTS_END, low) if low > RAY_WORKER_PORTS_END else 0
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _node_address() -> tuple[str, int]:
    """This node's IP and a free port on it (run as a task in rank 0's bundle)."""
    import ray

    return ray.util.get_node_ip_address(), free_port()


def shard(batch: PairBatch, parts: int) -> list[PairBatch]:
    """Contiguous, as-even-as-possible slices (ranks get equal shares when the step divides)."""
    size, extra = divmod(len(batch), parts)
    out, start = [], 0
    for rank in range(parts):
        stop = start + size + (rank < extra)
        out.append(batch.slice(start, stop))
        start = stop
    return out


class LearnerGroup:
    """N `RankActor`s in a placement group, used like a `Learner` by the loop."""

    def __init__(self, model_path: str, args, pad_token_id: int, num_training_steps: int, num_ranks: int = 2,
                 zero_stage: int = 2, cpus_per_rank: float = 1.0, gpus_per_rank: float = 0.0,
                 timeout_s: float = 600.0, name: str = "learner", bundle_extra: dict | None = None,
                 peft_config=None, keep_published: bool = False, bucket_bytes: int = 256 << 20,
                 start_timeout_s: float | None = None):
        """`timeout_s`: the longest wait for a call; `start_timeout_s` (default `timeout_s`): for
        the placement group and the ranks to start. `bundle_extra`: resources reserved beside each rank in its bundle, for a colocated
        engine share (`bundle_index` = rank). `keep_published`, `bucket_bytes`: how each rank's
        weight source sends (see `RankWeightSource`)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray, self.timeout_s, self.name = ray, timeout_s, name
        start_timeout_s = timeout_s if start_timeout_s is None else start_timeout_s
        self.start_timeout_s = start_timeout_s
        self.nodes: dict[str, str] = {}  # rank name -> its node, once `check_shared_storage` asked
        bundle: dict[str, Any] = {"CPU": cpus_per_rank}
        if gpus_per_rank:
            bundle["GPU"] = gpus_per_rank
        for key, value in (bundle_extra or {}).items():
            bundle[key] = bundle.get(key, 0) + value
        self.placement = placement_group([dict(bundle) for _ in range(num_ranks)], strategy="PACK")
        shape = ", ".join(f"{value:g} {key}" for key, value in bundle.items())
        try:
            self._wait([self.placement.ready()], "the learner placement group (not enough CPUs/GPUs in the cluster?)",
                       waiting_for=f"the learner placement group: {num_ranks} bundle(s) of {shape}",
                       timeout_s=start_timeout_s)
            # Rank 0 hosts the rendezvous (DeepSpeed's) and the weight-transfer store: both need an
            # address and free ports on rank 0's node, which on a cluster is not the driver's.
            # one node, and this driver on it (not a Ray Client driver elsewhere): it is this machine
            self.one_node = (len([node for node in ray.nodes() if node.get("Alive")]) == 1
                             and not ray.util.client.ray.is_connected())
            self.master_addr, port = self._rank0_address()
            Worker = ray.remote(RankActor)
            self.workers = [
                Worker.options(
                    name=f"{name}-rank{rank}", num_cpus=cpus_per_rank, num_gpus=gpus_per_rank,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement,
                                                                         placement_group_bundle_index=rank),
                ).remote(rank, num_ranks, self.master_addr, port, model_path, args, pad_token_id, num_training_steps,
                         zero_stage, args.ray_threads_per_actor or max(int(cpus_per_rank), 1), peft_config,
                         keep_published, bucket_bytes)
                for rank in range(num_ranks)
            ]
            self.names = [f"{name}-rank{rank}" for rank in range(num_ranks)]
            # constructing a rank finishes with DeepSpeed's rendezvous: wait on a cheap call
            self._gather([w.sequence_logprobs.remote([0, 0]) for w in self.workers], "start",
                         Notice(f"{num_ranks} learner rank(s) to load the policy and meet ({', '.join(self.names)})",
                                start_timeout_s, "ray_start_timeout_s"), timeout_s=start_timeout_s)
        except BaseException:
            self.close()  # a group that did not start leaves no rank and no reserved bundle behind
            raise

    def _wait(self, refs, what: str, waiting_for: str | None = None, timeout_s: float | None = None):
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        notice = Notice(waiting_for, timeout_s, "ray_start_timeout_s") if waiting_for else None
        pending = wait_all(refs, timeout_s, notice)
        if pending:
            raise TimeoutError(f"{what} did not answer within {timeout_s:.0f}s")
        return self.ray.get(refs)

    def _gather(self, refs, call: str, notice: Notice | None = None, timeout_s: float | None = None,
                stop: list | None = None) -> list:
        """Every rank's result of `call`. Ranks are watched one by one, so a rank that died is
        reported at once, even while the others wait for it in a collective. `notice`: a start-up
        wait's log lines."""
        names = dict(zip(refs, self.names))
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        pending, deadline = list(refs), time.monotonic() + timeout_s
        while pending:
            left = max(deadline - time.monotonic(), 0)
            if stop is not None:
                if stop:
                    raise StopWaiting()
                left = min(left, 0.2)  # look at `stop` again soon
            ready, pending = self.ray.wait(pending, num_returns=1, timeout=notice.slice(left) if notice else left)
            if not ready and stop is not None and deadline > time.monotonic():
                continue
            if not ready and notice is not None and deadline > time.monotonic():
                notice.tick()
                continue
            if not ready:
                late = ", ".join(names[ref] for ref in pending)
                raise TimeoutError(f"learner group: {late} did not answer {call}() within {timeout_s:.0f}s")
            try:
                self.ray.get(ready)
            except self.ray.exceptions.RayTaskError as err:
                # The rank's method raised (checked first: an engine that died under a rank's call
                # comes back as RayTaskError(ActorDiedError), which is a RayActorError too). A
                # collective of a live rank often fails before Ray reports its dead peer.
                dead = self._dead_ranks()
                if dead:
                    raise self._rank_died(", ".join(dead), call, err) from err
                raise
            except self.ray.exceptions.RayActorError as err:
                raise self._rank_died(names[ready[0]], call, err) from err
        if notice is not None:
            notice.done()
        return self.ray.get(refs)

    @staticmethod
    def _rank_died(name: str, call: str, err: BaseException) -> RuntimeError:
        # A rank holds a shard of the optimizer state and takes part in every collective: it
        # cannot be replaced mid-run. Stop; the last checkpoint is the way back.
        return RuntimeError(f"learner group: {name} died during {call}() ({type(err).__name__}); the run stops. "
                            "Resume from the last checkpoint with --resume_from_checkpoint true")

    def _dead_ranks(self, wait_s: float = 10.0) -> list[str]:
        """The ranks whose process is gone (Ray notices a dead process within a few seconds)."""
        refs = [worker.pid.remote() for worker in self.workers]
        self.ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        dead = []
        for name, ref in zip(self.names, refs):
            try:
                self.ray.get(ref, timeout=0)
            except self.ray.exceptions.RayActorError:
                dead.append(name)
            except Exception:  # busy or slow: not known to be dead
                pass
        return dead

    def step(self, batch: PairBatch, beta: float) -> dict[str, float]:
        shards = shard(batch, len(self.workers))
        results = self._gather([w.step.remote(s, beta) for w, s in zip(self.workers, shards)], "step")
        return _combine(results, [len(s) for s in shards])

    def evaluate(self, batch: PairBatch, beta: float) -> dict[str, float]:
        shards = shard(batch, len(self.workers))
        results = self._gather([w.evaluate.remote(s, beta) for w, s in zip(self.workers, shards)], "evaluate")
        return _combine(results, [len(s) for s in shards])

    def sequence_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        return self._gather([w.sequence_logprobs.remote(token_ids) for w in self.workers], "sequence_logprobs")[0]

    def refresh_reference(self, alpha: float) -> None:
        """`sync_ref_model`'s refresh on every rank together (ZeRO-3 gathers are collectives)."""
        self.call("refresh_reference", alpha)

    def call(self, method: str, *args) -> list:
        """`method(*args)` on every rank together; each rank's result, in rank order."""
        return self._gather([getattr(w, method).remote(*args) for w in self.workers], method)

    def call_with_timeout(self, method: str, timeout_s: float, *args, stop: list | None = None) -> list:
        """`call`, waiting up to `timeout_s` instead of `ray_timeout_s` (a rank that waits on
        others itself, e.g. rank 0 on its engines, is given the time to report them). A stop
        signal in `stop` ends the wait (`StopWaiting`; the call goes on in the ranks)."""
        return self._gather([getattr(w, method).remote(*args) for w in self.workers], method, timeout_s=timeout_s,
                            stop=stop)

    def _rank0_address(self) -> tuple[str, int]:
        """Rank 0's node address and a free port on it. A one-node cluster is this machine: loopback
        and a port found here, without a task (a task needs a Ray worker process to start, which on
        a loaded machine took over 120 s); otherwise a task in rank 0's bundle looks."""
        if self.one_node:
            return "127.0.0.1", free_port()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        locate = self.ray.remote(num_cpus=0)(_node_address).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=0))
        # a task may need a fresh Ray worker process on that node: a start-up wait, not a call's
        address, port = self._wait([locate.remote()], "rank 0's node", timeout_s=self.start_timeout_s,
                                   waiting_for="a task on rank 0's node for its address and a free port")[0]
        return address, port

    def free_port_on_rank0(self) -> int:
        """A free port on rank 0's node (each opening of a weight transport takes a fresh one: a
        restarted peer may still find the old port in use)."""
        return self._rank0_address()[1]

    def save_pretrained(self, directory: str) -> None:
        """The policy as a `from_pretrained` folder (rank 0 writes the gathered weights)."""
        self._gather([w.save_pretrained.remote(directory) for w in self.workers], "save_pretrained")

    def check_shared_storage(self, output_dir: str) -> None:
        """Fail before training unless every rank reads a file the driver writes in `output_dir`
        (see `primitives/shared_storage.py`); remembers each rank's node for later errors."""
        path, token = shared_storage.write_marker(output_dir)
        try:
            answers = self.call("sees_file", path, token)
        finally:
            with contextlib.suppress(OSError):  # never hides why the call failed
                os.remove(path)
        self.nodes = {name: node for name, (_, node) in zip(self.names, answers)}
        error = shared_storage.blind_ranks(output_dir, self.names, answers)
        if error is not None:
            raise error

    def save(self, directory: str) -> None:
        """DeepSpeed checkpoint of every rank (weights, optimizer, scheduler) under `directory`."""
        self._gather([w.save.remote(directory) for w in self.workers], "save")

    def load(self, directory: str) -> None:
        self._gather([w.load.remote(directory) for w in self.workers], "load")

    def close(self) -> None:
        """Kill the ranks and free their placement group (idempotent)."""
        for worker in getattr(self, "workers", []):
            self.ray.kill(worker)
        self.workers = []
        if getattr(self, "placement", None) is not None:
            self.ray.util.remove_placement_group(self.placement)
            self.placement = None


def _combine(results: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    """Pair-weighted means of per-rank means; global quantities (grad norm, lr) from rank 0."""
    total = sum(sizes)
    combined = {key: sum(r[key] * n for r, n in zip(results, sizes)) / total for key in results[0]}
    for key in ("grad_norm", "learning_rate"):
        if key in results[0]:
            combined[key] = results[0][key]
    combined["truncated_prompts"] = sum(r.get("truncated_prompts", 0) for r in results)
    return combined
