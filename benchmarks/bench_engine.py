"""Generation and weight-sync benchmark: prints markdown tables, writes them to a results file.

    python benchmarks/bench_engine.py [--out benchmarks/results/engine_cpu.md] [--quick]

1. Generation tokens/s, vLLM vs transformers `generate`, at three model sizes (fp32, random init,
   64 prompts x 2 samples x up to 32 new tokens; tokens actually generated are counted).
2. Weight sync seconds and bytes/s at two model sizes: in-process reload into the engine, and the
   `odpo_gloo` transport to an engine in another process (a Ray actor), beside the raw gloo
   broadcast bandwidth of one large tensor measured in the same run.
"""

from __future__ import annotations

import odpo_vllm  # noqa: F401  (sets OMP_WAIT_POLICY before torch starts its thread pool)

import argparse
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import torch

from odpo_vllm import OnlineDPOConfig, toy

GEN_SIZES = [(64, 2), (256, 4), (512, 8)]  # (hidden, layers)
SYNC_SIZES = [(256, 4), (512, 8)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(root: str, hidden: int, layers: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = toy.build_model(os.path.join(root, f"h{hidden}_l{layers}"), hidden_size=hidden, layers=layers,
                           heads=max(hidden // 64, 1), max_position_embeddings=256)
    model = AutoModelForCausalLM.from_pretrained(path)
    return path, model, AutoTokenizer.from_pretrained(path)


def params_m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def bench_generation(root, prompts, new_tokens, repeats):
    from odpo_vllm.sampling.hf_sampler import TransformersGenerator
    from odpo_vllm.learning.learner import Learner
    from odpo_vllm.sampling.vllm_engine import VLLMGenerator

    rows = []
    for hidden, layers in GEN_SIZES:
        _, model, tokenizer = build(root, hidden, layers)
        args = OnlineDPOConfig(output_dir=root, report_to="none", max_new_tokens=new_tokens, temperature=1.0)
        ids = [tokenizer(f"Review the {s}:")["input_ids"] for s in toy.SUBJECTS]
        batch = [ids[i % len(ids)] for i in range(prompts)]
        eos = {tokenizer.eos_token_id}  # rarely sampled by a random model; actual tokens are counted
        hf = TransformersGenerator(model, eos, tokenizer.pad_token_id, args.sampling_settings())
        engine = VLLMGenerator(model, tokenizer, args, eos, max_model_len=64, max_sequences=2 * prompts)
        engine.sync_weights(Learner(model, None, args, tokenizer.pad_token_id, 1))
        times = {"transformers": [], "vllm": []}
        tokens = {}
        for r in range(repeats + 1):  # the first round warms up
            for name, gen in (("transformers", hf), ("vllm", engine)):  # alternate: drift hits both
                start = time.perf_counter()
                out = gen.generate(batch, 2, seed=r)
                elapsed = time.perf_counter() - start
                tokens[name] = sum(len(c) for c in out.completion_ids)
                if r:
                    times[name].append(elapsed)
        engine.close()
        hf_tps = tokens["transformers"] / statistics.median(times["transformers"])
        vllm_tps = tokens["vllm"] / statistics.median(times["vllm"])
        rows.append((f"{params_m(model):.2f}M (h{hidden}, {layers}L)", hf_tps, vllm_tps, vllm_tps / hf_tps))
        print(rows[-1], flush=True)
    return rows


def _raw_gloo_peer(port, numel, rounds):
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=120))
    group = dist.ProcessGroupGloo(store, 1, 2, timedelta(seconds=120))
    buffer = torch.empty(numel, dtype=torch.uint8)
    options = dist.BroadcastOptions()
    options.rootRank = 0
    for _ in range(rounds):
        group.broadcast([buffer], options).wait()


def raw_gloo_bandwidth(nbytes: int, rounds: int = 3) -> float:
    """Bytes/s of one gloo broadcast of a single `nbytes` tensor to another process (median)."""
    import multiprocessing as mp

    import torch.distributed as dist

    port = free_port()
    peer = mp.get_context("spawn").Process(target=_raw_gloo_peer, args=(port, nbytes, rounds + 1))
    peer.start()
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=120))
    group = dist.ProcessGroupGloo(store, 0, 2, timedelta(seconds=120))
    buffer = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    options = dist.BroadcastOptions()
    options.rootRank = 0
    times = []
    for r in range(rounds + 1):
        start = time.perf_counter()
        group.broadcast([buffer], options).wait()
        if r:
            times.append(time.perf_counter() - start)
    peer.join(timeout=60)
    return nbytes / statistics.median(times)


def bench_sync(root, repeats):
    import ray
    from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient

    from odpo_vllm.learning.learner import Learner
    from odpo_vllm.weights.vllm_backend import register_gloo_backend
    from odpo_vllm.weights.names import LearnerWeights
    from odpo_vllm.weights.vllm_backend import GlooTrainerInitInfo, GlooTrainerWeightTransferEngine
    from odpo_vllm.sampling.vllm_engine import VLLMGenerator

    register_gloo_backend()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    rows = []
    try:
        for hidden, layers in SYNC_SIZES:
            path, model, tokenizer = build(root, hidden, layers)
            args = OnlineDPOConfig(output_dir=root, report_to="none")
            learner = Learner(model, None, args, tokenizer.pad_token_id, 1)
            nbytes = sum(m.nbytes for m in LearnerWeights(model).tensor_meta())

            engine = VLLMGenerator(model, tokenizer, args, {0}, max_model_len=64)
            local = [engine.load_weights(LearnerWeights(model)).seconds for _ in range(repeats + 1)][1:]
            engine.close()

            Engine = ray.remote(num_cpus=1)(VLLMGenerator)
            remote = Engine.remote(model.config, tokenizer, args, {0}, 64, weight_transfer_backend="odpo_gloo")
            info = GlooTrainerInitInfo(master_port=free_port(), world_size=2, timeout_s=300,
                                       engine_name="bench-engine", rank=0)
            sender = GlooTrainerWeightTransferEngine.trainer_init(
                info, client=RayVLLMWeightSyncClient(remote), source=LearnerWeights(model))
            gloo = []
            for r in range(repeats + 1):
                start = time.perf_counter()
                sender.send_weights()
                if r:
                    gloo.append(time.perf_counter() - start)
            ray.kill(remote)
            raw = raw_gloo_bandwidth(nbytes)
            del learner
            label = f"{params_m(model):.1f}M (h{hidden}, {layers}L)"
            local_s, gloo_s = statistics.median(local), statistics.median(gloo)
            rows.append((label, nbytes, local_s, nbytes / local_s, gloo_s, nbytes / gloo_s, raw,
                         gloo_s / (nbytes / raw)))
            print(rows[-1], flush=True)
    finally:
        ray.shutdown()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/engine_cpu.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    options = parser.parse_args()
    root = tempfile.mkdtemp(prefix="odpo_bench_")
    gen = bench_generation(root, options.prompts, options.new_tokens, options.repeats)
    sync = bench_sync(root, options.repeats)

    lines = [
        f"# Engine benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, fp32, torch "
        f"{torch.__version__})",
        "",
        f"## Generation: {options.prompts} prompts x 2 samples x {options.new_tokens} tokens, median of "
        f"{options.repeats}",
        "",
        "| model | transformers tok/s | vLLM tok/s | vLLM / transformers |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {hf:,.0f} | {v:,.0f} | {ratio:.2f}x |" for m, hf, v, ratio in gen]
    lines += [
        "",
        f"## Weight sync, median of {options.repeats}",
        "",
        "| model | bytes | in-process s | in-process MB/s | odpo_gloo s | odpo_gloo MB/s | raw gloo MB/s "
        "(one tensor) | odpo_gloo s / (bytes / raw) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {m} | {b / 1e6:.1f} MB | {ls:.3f} | {lb / 1e6:,.0f} | {gs:.3f} | {gb / 1e6:,.0f} | {raw / 1e6:,.0f} | "
        f"{ratio:.2f} |"
        for m, b, ls, lb, gs, gb, raw, ratio in sync
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(os.path.dirname(options.out), exist_ok=True)
    with open(options.out, "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
