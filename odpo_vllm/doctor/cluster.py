"""The Ray rows, before anything of the run starts: the cluster (started or joined as the run
would), the placement's resources against it, and `output_dir` read back on every node.

The doctor connects to Ray itself (`placement.ensure_ray`, the run's own call), so the trainer
it builds afterwards finds Ray up and the doctor owns the cluster's end.
"""

from __future__ import annotations

from odpo_vllm.doctor.report import FAIL, NA, Report
from odpo_vllm.primitives import shared_storage
from odpo_vllm.primitives.waits import wait_for

NODE_CHECK_S = 60.0  # a task that reads one small file; longer means the node is not working
SHARED_FIX = ("put output_dir on storage mounted at the same path on every node (NFS, Lustre, GCS-fuse): "
              "the ranks write the checkpoints there and the driver resumes from it")
RAY_FIX = ("check --ray_address (`ray status --address ADDRESS` from this machine), or leave it out to start a "
           "local cluster")


def _gpus(cluster: dict) -> float:
    return cluster.get("GPU", 0.0)


def cluster_row(report: Report, args, closers: list) -> bool:
    """Connects to Ray as the run would; whether the cluster has GPUs the run may use. What
    closes a cluster the doctor started (or disconnects from a joined one) goes to `closers`."""
    import ray

    with report.check("Ray cluster", RAY_FIX) as row:
        from odpo_vllm.runtime.placement import ensure_ray

        was_connected = ray.is_initialized()
        own = ensure_ray(args)
        closers.extend(reversed(own))  # run last first, as Roles.close does
        if not was_connected and not own:  # joined a cluster: disconnect, leave it running
            closers.append(ray.shutdown)
        cluster = ray.cluster_resources()
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        where = "a local cluster of this run" if own else f"joined {args.ray_address or 'RAY_ADDRESS'}"
        row.detail = (f"{where}: {len(nodes)} node(s), {cluster.get('CPU', 0):g} CPUs, {_gpus(cluster):g} GPUs")
        return _gpus(cluster) > 0 and not args.use_cpu
    return False


def resources_row(report: Report, args, on_gpu: bool, joined: bool) -> None:
    """The placement's demand (`resources.resource_demand`, what the builder computes) against the
    cluster; a shortfall fails with the builder's own words and fix."""
    import ray

    from odpo_vllm.runtime import resources

    with report.check("resources", "") as row:
        cluster = ray.cluster_resources()
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        reward_workers = (args.ray_num_reward_workers or 1) if args.reward_model_path else 0
        demand = resources.resource_demand(args, args.placement == "colocated", on_gpu, reward_workers,
                                           cluster.get("CPU", 0.0))
        problem = resources.shortfall(args.placement, demand, cluster, nodes)
        if problem:
            need = resources.totals(demand)
            row.status, row.detail = FAIL, problem
            row.fix = resources.advice(joined, need["CPU"] > cluster.get("CPU", 0.0) + resources.EPS)
        else:
            row.detail = f"{resources.describe(demand)}; the cluster has {cluster.get('CPU', 0):g} CPUs, " \
                         f"{_gpus(cluster):g} GPUs"


def _node_name(node: dict) -> str:
    return f"node {node.get('NodeManagerAddress', '?')} (id {node.get('NodeID', '?')[:8]})"


def nodes_see_output_dir(report: Report, output_dir: str) -> None:
    """The driver writes a file in `output_dir` and a task pinned to each live node reads it back
    (the marker of `primitives/shared_storage.py`, which the ranks check again once they start).
    Before the ranks: the tiny model they load lives there too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    with report.check("output_dir", SHARED_FIX) as row:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        names = [_node_name(node) for node in nodes]
        path, token = shared_storage.write_marker(output_dir)
        # shared_storage needs only the standard library: sent by value, the task's worker starts
        # without importing odpo_vllm (torch, transformers: seconds on every node)
        ray.cloudpickle.register_pickle_by_value(shared_storage)
        try:
            look = ray.remote(num_cpus=0)(shared_storage.sees_marker_here)
            refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                    .remote(path, token) for node in nodes]
            answers = wait_for(refs, names, NODE_CHECK_S, "doctor", "read output_dir")
        finally:
            ray.cloudpickle.unregister_pickle_by_value(shared_storage)
            shared_storage.remove_marker(path)
        blind = [f"{name} cannot see the file the driver wrote there"
                 for name, (seen, _) in zip(names, answers) if not seen]
        if blind:
            raise shared_storage.not_shared_error(output_dir, blind)
        row.detail = f"{output_dir}: read back on every node ({len(nodes)})"


def in_process_rows(report: Report, output_dir: str) -> None:
    report.add("Ray cluster", NA, "in process: no Ray")
    report.add("resources", NA, "in process: no Ray")
    with report.check("output_dir", "give --output_dir a folder this user can write") as row:
        path, token = shared_storage.write_marker(output_dir)
        try:
            if not shared_storage.sees_marker(path, token, wait_s=0):
                raise OSError(f"wrote {path} and could not read it back")
        finally:
            shared_storage.remove_marker(path)
        row.detail = f"{output_dir}: written and read (one process)"
