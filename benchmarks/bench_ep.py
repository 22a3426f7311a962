"""Tokens/s of the expert-parallel MoE layer over 1, 2 and 4 gloo ranks on CPU, and its checkpoint.

    python benchmarks/bench_ep.py                      # meshes 1, 2 (EP), 2x2 (dp x ep): a table
    python benchmarks/bench_ep.py --json ep.json       # and saves the numbers
    python benchmarks/bench_ep.py --meshes 1 2 4       # EP over 4 ranks instead of 2 x 2

Each mesh runs in its own set of processes (gloo on 127.0.0.1); ``Q``x``P`` is a
``(dp, ep)`` mesh of W = Q·P ranks, a bare ``P`` is expert parallelism alone. Every rank
holds ``--tokens`` tokens (weak scaling: the global batch grows with the world) and E/P
experts, and times ``--iters`` forward+backward passes after ``--warmup``; the slowest
rank's time counts. tokens/s = W * tokens * iters / time. Then the layer is saved with
``torch.distributed.checkpoint`` (slowest rank's time, size on disk) and loaded back into
a freshly sharded layer on the same mesh; after all meshes, the last checkpoint is loaded
into the plain layer in this one process (``no_dist=True``). In the 1-rank run the plain
single-process ``moebal.MoE`` is timed too, in the same process, so the cost of the
expert-parallel path itself (two all_to_all, the count exchange and its host sync, the
local regroup) shows as a ratio. Threads per rank = ``--threads`` (default 1), so on a
machine with fewer cores than ranks the ranks share cores: read the numbers with the
core count that is saved next to them.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moebal
from moebal.parallel import expert_parallel, init_expert_mesh

SCHEMA = "moebal.bench.ep/2"


def parse_mesh(spec: str) -> tuple[int, int]:
    """``"P"`` -> (dp=1, ep=P); ``"QxP"`` -> (dp=Q, ep=P)."""
    parts = spec.lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--meshes takes P or QxP (dp x ep), got {spec!r}")
    return (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_layer(layer, x, iters: int, warmup: int, sync) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for ``iters`` forward+backward passes after ``warmup``."""
    g = torch.randn_like(x)
    for i in range(warmup + iters):
        if i == warmup:
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
        x.grad = None
        layer.zero_grad(set_to_none=True)
        (layer(x) * g).sum().backward()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu_start


def _rank_main(rank, world, port, cfg, out_path, mesh_spec, ckpt_dir):
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    import torch.distributed.checkpoint as dcp

    dp, ep = parse_mesh(mesh_spec)
    mesh = init_expert_mesh(ep=ep, dp=dp)
    torch.manual_seed(0)
    moe = moebal.MoE(cfg["d_model"], cfg["d_ff"], cfg["experts"], cfg["top_k"], router=cfg["router"])
    dense_moe = copy.deepcopy(moe) if world == 1 else None
    fresh = copy.deepcopy(moe)
    expert_parallel(moe, mesh)
    x = torch.randn(cfg["tokens"], cfg["d_model"], generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
    wall, cpu = _time_layer(moe, x, cfg["iters"], cfg["warmup"], dist.barrier)
    wall_t, cpu_t = torch.tensor([wall], dtype=torch.float64), torch.tensor([cpu], dtype=torch.float64)
    dist.all_reduce(wall_t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    dist.all_reduce(cpu_t, op=dist.ReduceOp.SUM)  # CPU time of all ranks (less sensitive to a busy machine)
    tokens = world * cfg["tokens"] * cfg["iters"]
    dist.barrier()
    start = time.perf_counter()
    dcp.save(moe.state_dict(), checkpoint_id=ckpt_dir)
    save_s = time.perf_counter() - start
    expert_parallel(fresh, mesh)
    dist.barrier()
    start = time.perf_counter()
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=ckpt_dir)
    fresh.load_state_dict(state)
    load_s = time.perf_counter() - start
    ckpt_t = torch.tensor([save_s, load_s], dtype=torch.float64)
    dist.all_reduce(ckpt_t, op=dist.ReduceOp.MAX)
    same = torch.equal(fresh.experts.w_in_EDH, moe.experts.w_in_EDH)
    result = {
        "mesh": mesh_spec, "dp": dp, "ep": ep,
        "world": world, "seconds": float(wall_t), "tokens_per_s": tokens / float(wall_t),
        "cpu_seconds": float(cpu_t), "tokens_per_cpu_s": tokens / float(cpu_t),
        "checkpoint_save_s": float(ckpt_t[0]), "checkpoint_load_same_mesh_s": float(ckpt_t[1]),
        "checkpoint_round_trip_exact": bool(same),
    }
    if dense_moe is not None:
        wall1, cpu1 = _time_layer(dense_moe, x, cfg["iters"], cfg["warmup"], lambda: None)
        result["single_process_tokens_per_s"] = cfg["tokens"] * cfg["iters"] / wall1
        result["single_process_tokens_per_cpu_s"] = cfg["tokens"] * cfg["iters"] / cpu1
        result["ep_over_single_process_time"] = float(wall_t) / wall1
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def run(cfg: dict, meshes, tmp_dir: str) -> list[dict]:
    results = []
    for spec in meshes:
        dp, ep = parse_mesh(spec)
        world = dp * ep
        if cfg["experts"] % ep:
            raise SystemExit(f"--experts {cfg['experts']} is not a multiple of the ep size {ep}")
        out_path = os.path.join(tmp_dir, f"ep_mesh{spec}.json")
        ckpt_dir = os.path.join(tmp_dir, f"ckpt_mesh{spec}")
        ctx = mp.start_processes(
            _rank_main, args=(world, _free_port(), cfg, out_path, spec, ckpt_dir), nprocs=world, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + cfg["timeout_s"]
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise SystemExit(f"world {world}: still running after {cfg['timeout_s']} s")
        with open(out_path) as f:
            results.append(json.load(f))
        results[-1]["checkpoint_bytes"] = _dir_bytes(ckpt_dir)
    results[-1]["checkpoint_load_one_process_s"] = _load_in_one_process(cfg, ckpt_dir)
    return results


def _load_in_one_process(cfg: dict, ckpt_dir: str) -> float:
    """Seconds to load the checkpoint into the plain layer here (``no_dist=True``)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    moe = moebal.MoE(cfg["d_model"], cfg["d_ff"], cfg["experts"], cfg["top_k"], router=cfg["router"])
    start = time.perf_counter()
    state = moe.state_dict()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=ckpt_dir, no_dist=True)
    moe.load_state_dict(state)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meshes", nargs="+", default=["1", "2", "2x2"], help="P (ep) or QxP (dp x ep) per run")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", default="aux_loss")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout-s", type=int, default=600)
    p.add_argument("--json", help="save the results here")
    args = p.parse_args(argv)
    cfg = {k: v for k, v in vars(args).items() if k not in ("meshes", "json")}

    import tempfile

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = run(cfg, args.meshes, tmp)
    report = {
        "schema": SCHEMA,
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": load_before,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "moebal": moebal.__version__},
        "config": cfg,
        "results": results,
    }
    print(f"{report['device']}; torch {torch.__version__}; T={args.tokens}/rank D={args.d_model} "
          f"F={args.d_ff} E={args.experts} K={args.top_k}, fwd+bwd, {args.threads} thread(s)/rank")
    print(f"load average before the run: {load_before:.1f}")
    print(f"{'mesh':>5} {'ranks':>5} {'tokens/s':>10} {'vs first':>8} {'tokens/CPU-s':>13} "
          f"{'ckpt MB':>8} {'save s':>7} {'load s':>7}")
    base = results[0]["tokens_per_s"]
    for r in results:
        print(f"{r['mesh']:>5} {r['world']:>5} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / base:>7.2f}x "
              f"{r['tokens_per_cpu_s']:>13.0f} {r['checkpoint_bytes'] / 1e6:>8.2f} {r['checkpoint_save_s']:>7.3f} "
              f"{r['checkpoint_load_same_mesh_s']:>7.3f}")
        if "single_process_tokens_per_s" in r:
            print(f"      single-process moebal.MoE: {r['single_process_tokens_per_s']:.0f} tokens/s, "
                  f"{r['single_process_tokens_per_cpu_s']:.0f} tokens/CPU-s "
                  f"(EP path takes {r['ep_over_single_process_time']:.2f}x its time at 1 rank)")
    last = results[-1]
    print(f"the {last['mesh']} checkpoint loads into the plain layer in one process in "
          f"{last['checkpoint_load_one_process_s']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
