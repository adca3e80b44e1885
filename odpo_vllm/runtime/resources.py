"""What a Ray placement needs, checked against the cluster before anything is started.

A placement group or an actor that the cluster cannot hold stays pending without an error, so a
run that asked for too much used to wait `ray_timeout_s` in silence. Here the placement computes
its demand (learner ranks, vLLM engines, reward workers: CPUs and GPUs each) before it creates
any actor or placement group, and:

- demand above what the cluster *has* (its total): an error at once naming each role's share and
  the flags that set it; on a cluster the run joins, `ray_wait_for_resources_s` > 0 instead asks
  the autoscaler for the bundles and waits that long for the nodes, with a log line;
- demand within the total but above what is *free* now (other jobs or actors hold some): a log
  line with the free resources, and a wait of at most `ray_timeout_s` for them to be released;
- one actor or bundle larger than every node (a placement group bundle and an actor live on one
  node): an error at once, as for the total.

`resource_demand` and `shortfall` are pure (no Ray): the unit tests check them and their messages.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from odpo_vllm.primitives.waits import REPEAT_S, Notice

logger = logging.getLogger(__name__)

EPS = 1e-6  # fractional shares: 0.1 + 0.2 must fit in 0.3
KEYS = (("CPU", "CPUs"), ("GPU", "GPUs"))
HELD_NOTICE_S = 5.0  # resources held by others: the warning comes after this (a closed run frees its own late)
POLL_S = 1.0


class ResourceError(RuntimeError):
    """The placement needs more than the cluster has (the message names each role's share)."""


@dataclass(frozen=True)
class Share:
    """`count` units of one role, each taking `cpus` and `gpus`; `cpu_flags` / `gpu_flags` set
    them. `in_rank_bundle`: colocated engines, which live inside the learner ranks' bundles."""

    role: str
    count: int
    cpus: float
    gpus: float
    cpu_flags: tuple[str, ...]
    gpu_flags: tuple[str, ...]
    in_rank_bundle: bool = False

    def each(self, key: str) -> float:
        return self.cpus if key == "CPU" else self.gpus

    def total(self, key: str) -> float:
        return self.count * self.each(key)


def _num(value: float) -> str:
    return str(round(float(value), 4))


def reward_worker_cpus(args, free_cpus: float, count: int) -> float:
    """Each reward worker's CPUs: `ray_cpus_per_reward_worker` when given, else the cluster's
    CPUs left beside the ranks and engines split across the workers, at most 1 each, in steps of
    0.01 (0 when nothing is left: in a synchronous step the reward model scores while the engines
    and ranks wait, so it shares their cores)."""
    if args.ray_cpus_per_reward_worker is not None:
        return float(args.ray_cpus_per_reward_worker)
    if count <= 0:
        return 0.0
    return min(1.0, math.floor(max(free_cpus, 0.0) / count * 100 + EPS) / 100)


def resource_demand(args, colocated: bool, on_gpu: bool, num_reward_workers: int,
                    cluster_cpus: float) -> list[Share]:
    """The shares of a Ray placement: learner ranks, vLLM engines, reward workers (when there is a
    reward model: `num_reward_workers` > 0). The same numbers `_build_ray_roles` gives Ray:
    a rank and an engine take `ray_cpus_per_actor` CPUs; on GPUs a rank takes 1 GPU (0.5
    colocated), an engine `vllm_tensor_parallel_size` (half of it colocated, in the rank's
    bundle), a reward worker `reward_gpus`. `cluster_cpus` (the cluster's total) sets the reward
    workers' default CPUs (`reward_worker_cpus`)."""
    cpus, tp = args.ray_cpus_per_actor, args.vllm_tensor_parallel_size
    ranks = args.ray_learner_ranks
    shares = [Share("learner ranks", ranks, cpus, ((0.5 if colocated else 1.0) if on_gpu else 0.0),
                    ("ray_learner_ranks", "ray_cpus_per_actor"), ("ray_learner_ranks",))]
    if colocated:
        shares.append(Share("vLLM engines", ranks, cpus, 0.5 * tp if on_gpu else 0.0,
                            ("ray_learner_ranks", "ray_cpus_per_actor"),
                            ("ray_learner_ranks", "vllm_tensor_parallel_size"), in_rank_bundle=True))
    else:
        shares.append(Share("vLLM engines", args.ray_num_engines, cpus, 1.0 * tp if on_gpu else 0.0,
                            ("ray_num_engines", "ray_cpus_per_actor"), ("ray_num_engines", "vllm_tensor_parallel_size")))
    if num_reward_workers:
        free = cluster_cpus - sum(share.total("CPU") for share in shares)
        shares.append(Share("reward workers", num_reward_workers, reward_worker_cpus(args, free, num_reward_workers),
                            args.reward_gpus if on_gpu else 0.0,
                            ("ray_num_reward_workers", "ray_cpus_per_reward_worker"),
                            ("ray_num_reward_workers", "reward_gpus")))
    return shares


def totals(demand: list[Share]) -> dict[str, float]:
    return {key: sum(share.total(key) for share in demand) for key, _ in KEYS}


def units(demand: list[Share]) -> list[tuple[str, int, dict[str, float]]]:
    """The things Ray must fit on one node each: a rank's bundle (with its colocated engine), an
    engine actor, a reward worker; as (what, how many, {CPU, GPU} each)."""
    ranks = next(share for share in demand if share.role == "learner ranks")
    bundle = {key: ranks.each(key) for key, _ in KEYS}
    colocated = [share for share in demand if share.in_rank_bundle]
    for share in colocated:
        for key, _ in KEYS:
            bundle[key] += share.each(key)
    out = [("a learner rank's bundle" + (" (the rank and its engine)" if colocated else ""), ranks.count, bundle)]
    for share in demand:
        if share is not ranks and not share.in_rank_bundle and share.count:
            out.append((f"one of the {share.role}", share.count, {key: share.each(key) for key, _ in KEYS}))
    return out


def describe(demand: list[Share]) -> str:
    """Each role's count and share, for the log: `learner ranks 1 x (1.0 CPUs), ...`."""
    parts = []
    for share in demand:
        each = ", ".join(f"{_num(share.each(key))} {plural}" for key, plural in KEYS
                         if share.each(key) > EPS or key == "CPU")
        parts.append(f"{share.role} {share.count} x ({each}){' in the rank bundles' if share.in_rank_bundle else ''}")
    return ", ".join(parts)


def _shares_text(demand: list[Share], key: str) -> str:
    parts = []
    for share in demand:
        if share.total(key) <= EPS:
            continue
        where = ", one in each rank's bundle" if share.in_rank_bundle else ""
        flags = share.cpu_flags if key == "CPU" else share.gpu_flags
        parts.append(f"{share.role} {share.count} x {_num(share.each(key))} = {_num(share.total(key))}{where} "
                     f"[{', '.join(flags)}]")
    return " + ".join(parts)


def _fits_a_node(unit: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    return any(all(node.get(key, 0.0) + EPS >= need for key, need in unit.items() if need > 0) for node in nodes)


def shortfall(placement: str, demand: list[Share], cluster: dict[str, float],
              nodes: list[dict[str, float]] | None = None) -> str | None:
    """Why the cluster (`cluster`: its resources, e.g. `ray.cluster_resources()`; `nodes`: each
    live node's resources) cannot hold the placement, naming each role's share and its flags;
    None when it can."""
    need = totals(demand)
    problems = []
    for key, plural in KEYS:
        has = cluster.get(key, 0.0)
        if need[key] > has + EPS:
            problems.append(f"placement {placement} needs {_num(need[key])} {plural} and the cluster has "
                            f"{_num(has)}: {_shares_text(demand, key)}")
    if not problems and nodes:
        for what, _, unit in units(demand):
            if not _fits_a_node(unit, nodes):
                asked = ", ".join(f"{_num(unit[key])} {plural}" for key, plural in KEYS if unit[key] > 0)
                largest = ", ".join(f"{_num(max(node.get(key, 0.0) for node in nodes))} {plural}"
                                    for key, plural in KEYS if unit[key] > 0)
                problems.append(f"placement {placement}: {what} needs {asked} on one node, and no node has them "
                                f"(the most on one node: {largest}); its shares: "
                                + "; ".join(_shares_text(demand, key) for key, _ in KEYS if unit[key] > 0))
    return "; ".join(problems) or None


def advice(joined: bool, cpus_short: bool = True) -> str:
    """What to change, for a cluster this run started (`joined` False) or one it joined;
    `cpus_short`: whether CPUs are what is missing (a local cluster can be given more)."""
    if joined:
        return ("lower one of those flags, or add nodes to the cluster (--ray_wait_for_resources_s S asks an "
                "autoscaler for them and waits up to S seconds)")
    more = ("start Ray with more CPUs: --ray_num_cpus N (a count Ray schedules by: it may exceed the machine's "
            "cores), or " if cpus_short else "")
    return f"lower one of those flags, or {more}join a larger cluster with --ray_address"


def ensure_resources(placement: str, demand: list[Share], joined: bool, wait_s: float, timeout_s: float,
                     poll_s: float = POLL_S) -> None:
    """Before anything of the placement starts: fail at once if the cluster cannot hold `demand`;
    on a joined cluster with `wait_s` > 0 (`ray_wait_for_resources_s`), ask the autoscaler for it
    and wait that long; then wait at most `timeout_s` (`ray_timeout_s`) for resources that others
    hold. Every wait has a log line saying what it waits for and for how long."""
    import ray

    def cluster_now():
        alive = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        return ray.cluster_resources(), alive

    need = totals(demand)
    total, nodes = cluster_now()
    problem = shortfall(placement, demand, total, nodes)
    if problem:
        if not joined or wait_s <= 0:
            raise ResourceError(f"{problem}. To fix: {advice(joined, need['CPU'] > total.get('CPU', 0.0) + EPS)}")
        _request_from_autoscaler(demand)
        try:
            notice = Notice(f"the cluster to grow, its autoscaler asked for the bundles ({problem})", wait_s,
                            "ray_wait_for_resources_s", notice_s=REPEAT_S, level=logging.WARNING)
            deadline = time.monotonic() + wait_s
            while problem and time.monotonic() < deadline:
                time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
                total, nodes = cluster_now()
                problem = shortfall(placement, demand, total, nodes)
                notice.tick(f"the cluster has {_resources_text(total)}")
        finally:
            _request_from_autoscaler([])  # the run's actors ask for themselves from now on
        if problem:
            raise ResourceError(f"{problem} (after waiting {wait_s:.0f}s, ray_wait_for_resources_s). "
                                f"To fix: {advice(joined)}")
        notice.done()

    keys = [key for key, _ in KEYS if need[key] > EPS]

    def held(free: dict[str, float]) -> str:
        return (f"resources held by other actors or jobs: placement {placement} needs {_needs_text(need)} of the "
                f"cluster's {_resources_text(total, keys)}, and {_resources_text(free, keys)} are free now")

    free = ray.available_resources()
    if not _short(need, free):
        return
    notice = Notice(held(free), timeout_s, "ray_timeout_s", notice_s=HELD_NOTICE_S)
    deadline = time.monotonic() + timeout_s
    while _short(need, free):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"placement {placement}: waited {timeout_s:.0f}s (ray_timeout_s) for {held(free)}; "
                               f"the shares: {'; '.join(_shares_text(demand, key) for key in keys)}")
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        free = ray.available_resources()
        notice.tick(f"{_resources_text(free, keys)} free now")
    notice.done()


def _short(need: dict[str, float], free: dict[str, float]) -> bool:
    return any(need[key] > free.get(key, 0.0) + EPS for key, _ in KEYS)


def _needs_text(need: dict[str, float]) -> str:
    return " and ".join(f"{_num(need[key])} {plural}" for key, plural in KEYS if need[key] > EPS) or "nothing"


def _resources_text(resources: dict[str, float], keys=("CPU", "GPU")) -> str:
    return ", ".join(f"{_num(resources.get(key, 0.0))} {plural}" for key, plural in KEYS if key in keys)


def _request_from_autoscaler(demand: list[Share]) -> None:
    """Ask an autoscaler (if the cluster has one) for the placement's bundles; a hint, harmless
    without one. Pending actors would ask too, but one by one as the placement starts them."""
    bundles = []  # no demand: withdraw the request
    for _, count, unit in (units(demand) if demand else []):
        bundle = {key: value for key, value in unit.items() if value > 0}
        bundles += [bundle] * count if bundle else []
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as err:  # an old Ray or no autoscaler API: the pending actors ask instead
        logger.debug("request_resources(%s) failed: %s", bundles, err)
