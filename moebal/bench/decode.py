"""Decode-sized batches: the MoE layer's forward at the memory-bandwidth limit, and the path grid.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k.

``run_decode_bench`` times the forward under ``inference_mode`` of ``moebal.MoE`` (with the
decode layout of ``moebal.prepare_decode``, and as it runs without it) next to the peers
(HF's eager and ``grouped_mm`` experts) in interleaved rounds, and reports per point the
bytes of the distinct expert weights the batch touches, the achieved read rate over those
bytes and its fraction of a read bandwidth measured in the same process (the fastest of
a few ``sum()`` passes over a buffer larger than the last-level cache).

``run_path_grid`` times the experts alone on every expert path over a range of batch
sizes: the measurements behind ``moebal.expert_paths.INFERENCE_TABLE``.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict

import torch

from moebal.bench.configs import _CLOCKS, DTYPES, LayerConfig

SCHEMA = "moebal.bench.decode/1"
# fine-grained experts (DeepSeek/Qwen3-MoE-like), the shape of the inference-speed issue
DECODE_SHAPE = LayerConfig("decode", 1, 1024, 384, 64, 8)
TINY_SHAPE = LayerConfig("decode-tiny", 1, 32, 16, 8, 2)
MOEBAL_IMPLS = ("moebal", "moebal_general", "moebal_unpacked", "moebal_loop")


class _GeneralPaths(torch.nn.Module):
    """A moebal layer run with the lean inference paths switched off, for a same-process A/B.

    The layer's decode step (``moebal.layer_decode``), the lean router
    (``moebal.router_lean``), the lean dropless plan and the autograd-free dispatch/combine
    each shortcut a general path and give the same values; switched off
    for this module's forward, it runs the general router, plan and autograd Functions:
    the layer as it ran before those paths (the decode layout and the path rule stay).
    """

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        import moebal.dispatch as dispatch_mod
        import moebal.layer as layer_mod
        import moebal.plan as plan_mod
        import moebal.router as router_mod

        saved = (router_mod.lean_route, plan_mod._lean_dropless_plan, dispatch_mod._needs_graph, layer_mod.decode_forward)
        router_mod.lean_route = lambda *a, **k: None
        plan_mod._lean_dropless_plan = lambda *a, **k: None
        dispatch_mod._needs_graph = lambda *a: True
        layer_mod.decode_forward = lambda *a, **k: None
        try:
            return self.moe(x)
        finally:
            (router_mod.lean_route, plan_mod._lean_dropless_plan, dispatch_mod._needs_graph,
             layer_mod.decode_forward) = saved


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 3, timer: str = "cpu") -> float:
    """Bytes/s of the fastest of ``repeats`` fp32 ``sum()`` passes over a fresh ``nbytes`` buffer."""
    buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    clock = _CLOCKS[timer]
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass only warms up
        t0 = clock()
        buf.sum()
        best = min(best, clock() - t0)
    del buf
    return nbytes / max(best, 1e-9)


def _build_decode(shape: LayerConfig, seed: int, peers):
    import moebal
    from moebal.bench.impls import load_peers_module

    torch.manual_seed(seed)
    E, K = shape.num_experts, shape.top_k
    ref = moebal.MoE(shape.d_model, shape.d_ff, E, K, router=moebal.Router(shape.d_model, E, K, balancer=None)).eval()
    mods = {"moebal": ref}
    skipped = {}
    if peers:
        module = load_peers_module()
        if module is None:
            skipped["*"] = "benchmarks/peers.py not found"
        else:
            avail = module.available_peers()
            names = [n for n in avail if n.startswith("hf_")] if peers is True else list(peers)
            skipped.update({n: "not available here" for n in names if n not in avail})
            mods.update(module.build_peers(ref, [n for n in names if n in avail]))
    return ref, mods, skipped


def _variants(mods32: dict, dtype) -> dict:
    """The timed modules in ``dtype``: moebal with and without the decode layout, with its lean inference
    paths off, its loop path, the peers."""
    import copy

    from moebal.decode import prepare_decode

    out = {}
    base = copy.deepcopy(mods32["moebal"]).to(dtype)
    out["moebal"] = base
    prepare_decode(base)
    general = copy.deepcopy(mods32["moebal"]).to(dtype)
    prepare_decode(general)
    out["moebal_general"] = _GeneralPaths(general)
    unpacked = copy.deepcopy(mods32["moebal"]).to(dtype)
    out["moebal_unpacked"] = unpacked
    loop = copy.deepcopy(unpacked)
    loop.experts.path = "loop"
    out["moebal_loop"] = loop
    for name, m in mods32.items():
        if name != "moebal":
            out[name] = copy.deepcopy(m).to(dtype).eval()
    return out


def _touched_bytes(ref, x_TD, dtype) -> tuple[int, int]:
    """(distinct experts the batch routes to, bytes of their weights in ``dtype``)."""
    with torch.no_grad():
        idx = ref.router(x_TD.float()).indices
    n = int(idx.unique().numel()) if idx.numel() else 0
    per_expert = ref.experts.w_in_EDH[0].numel() + ref.experts.w_out_EFD[0].numel()
    return n, n * per_expert * dtype.itemsize


def _interleaved(mods: dict, x, repeats: int, warmup: int, clock) -> dict[str, list[float]]:
    names = list(mods)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                mods[n](x)
        for r in range(repeats):
            for i in range(len(names)):
                n = names[(r + i) % len(names)]
                t0 = clock()
                mods[n](x)
                times[n].append(clock() - t0)
    return times


def run_decode_bench(tokens=(1, 8, 64), dtypes=("fp32", "bf16"), shape: LayerConfig = DECODE_SHAPE, threads: int = 1,
                     peers=True, repeats: int = 15, warmup: int = 2, seed: int = 0, timer: str = "auto",
                     bandwidth_bytes: int = 1 << 30, progress=None) -> dict:
    """Forward-only MoE layer times at decode batch sizes, moebal next to the peers, with bandwidth fractions.

    Args:
        tokens: batch sizes T (tokens of one decode step).
        dtypes: "fp32" and/or "bf16".
        shape: a ``LayerConfig`` (its ``tokens`` is ignored); default d=1024, f=384, E=64, K=8.
        threads: ``torch.set_num_threads`` for the run.
        peers: True (every HF peer available), False, or a list of peer names.
        repeats: interleaved rounds (the starting implementation rotates); the median counts.
        bandwidth_bytes: size of the buffer the read bandwidth is measured over.

    Returns a JSON-ready dict: environment, ``read_bandwidth_GBps`` and ``points`` (one per
    T x dtype: per implementation median/min seconds, GB/s over the touched expert
    weights and its fraction of the read bandwidth, and its ratio to moebal's median).
    """
    from moebal.bench.run import environment

    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtypes: unknown dtype {d!r}; known: {sorted(DTYPES)}")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in tokens):
        raise ValueError(f"tokens must be ints >= 0, got {tokens!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    say = progress or (lambda msg: None)
    clock_name = timer if timer != "auto" else ("cpu" if threads == 1 else "wall")
    clock = _CLOCKS[clock_name]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, mods32, skipped = _build_decode(shape, seed, peers)
        bw = read_bandwidth(bandwidth_bytes, timer=clock_name)
        say(f"read bandwidth: {bw / 1e9:.1f} GB/s (fp32 sum over {bandwidth_bytes / 2**20:.0f} MiB)")
        result = {"schema": SCHEMA, **environment([threads]), "shape": asdict(shape), "timer": clock_name,
                  "settings": {"repeats": repeats, "warmup": warmup, "seed": seed, "statistic": "median of "
                               "interleaved rounds", "mode": "forward under torch.inference_mode, module.eval()",
                               "moebal": "prepare_decode layout", "moebal_general": "prepare_decode layout, the lean inference "
                               "paths off (general router, plan, autograd dispatch/combine)",
                               "moebal_unpacked": "no decode layout",
                               "moebal_loop": "experts.path='loop' (the CPU path before the path rule)"},
                  "read_bandwidth_GBps": bw / 1e9, "bandwidth_buffer_bytes": bandwidth_bytes,
                  "points": [], "skipped_peers": skipped}
        gen = torch.Generator().manual_seed(seed + 1)
        xs32 = {T: torch.randn(T, shape.d_model, generator=gen) for T in tokens}
        for dname in dtypes:
            dtype = DTYPES[dname]
            mods = _variants(mods32, dtype)
            for T in tokens:
                x = xs32[T].to(dtype)
                n_experts, nbytes = _touched_bytes(ref, xs32[T], dtype)
                with torch.inference_mode():
                    y_ref = mods["moebal_loop"](x).float()
                    errs = {n: (m(x).float() - y_ref).abs().max().item() if T else 0.0 for n, m in mods.items()}
                times = _interleaved(mods, x, repeats, warmup, clock)
                impls = {}
                med_moebal = statistics.median(times["moebal"])
                for n, ts in times.items():
                    med = statistics.median(ts)
                    impls[n] = {"times_s": ts, "median_s": med, "best_s": min(ts), "GBps": nbytes / med / 1e9,
                                "bandwidth_fraction": nbytes / med / bw, "ratio_to_moebal": med / med_moebal,
                                "max_abs_err_vs_loop": errs[n]}
                point = {"tokens": T, "dtype": dname, "experts_touched": n_experts, "touched_weight_bytes": nbytes,
                         "impls": impls}
                result["points"].append(point)
                say(_point_line(point))
            del mods
            gc.collect()
    finally:
        torch.set_num_threads(old_threads)
    return result


def _point_line(p: dict) -> str:
    cells = ", ".join(f"{n} {v['median_s'] * 1e3:.2f} ms {v['GBps']:.1f} GB/s ({v['bandwidth_fraction']:.0%})"
                      for n, v in p["impls"].items())
    return f"T={p['tokens']} {p['dtype']} ({p['experts_touched']} experts, {p['touched_weight_bytes'] / 1e6:.1f} MB): {cells}"


def format_decode_table(result: dict) -> str:
    """Plain-text table: rows T x dtype; per implementation median ms, GB/s and bandwidth fraction."""
    dev, vers = result.get("device", {}), result.get("versions", {})
    s = result["shape"]
    lines = [f"device: {dev.get('name')} ({dev.get('cpu_capability')}); torch {vers.get('torch')}"
             + (f", transformers {vers['transformers']}" if "transformers" in vers else ""),
             f"decode forward (inference_mode), D={s['d_model']} F={s['d_ff']} E={s['num_experts']} K={s['top_k']}, "
             f"threads={result['threads'][0]}, {result['timer']} time, median of {result['settings']['repeats']} "
             f"interleaved rounds; read bandwidth {result['read_bandwidth_GBps']:.1f} GB/s",
             "cells: ms | GB/s over the touched expert weights | fraction of the read bandwidth"]
    names = []
    for p in result["points"]:
        names += [n for n in p["impls"] if n not in names]
    rows = [["T", "dtype", "experts", "MB"] + names]
    for p in result["points"]:
        row = [str(p["tokens"]), p["dtype"], str(p["experts_touched"]), f"{p['touched_weight_bytes'] / 1e6:.1f}"]
        for n in names:
            v = p["impls"].get(n)
            row.append(f"{v['median_s'] * 1e3:.2f} | {v['GBps']:.1f} | {v['bandwidth_fraction']:.0%}" if v else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if result.get("skipped_peers"):
        lines.append("skipped peers: " + "; ".join(f"{k}: {v}" for k, v in result["skipped_peers"].items()))
    return "\n".join(lines)


PATH_CANDIDATES = ("loop", "grouped", "bmm", "gemv", "grouped_packed", "bmm_packed", "gemv_packed", "onednn_packed")


def run_path_grid(tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), dtypes=("fp32", "bf16"),
                  shape: LayerConfig = DECODE_SHAPE, threads=(1,), repeats: int = 9, seed: int = 0,
                  progress=None) -> dict:
    """The experts alone (``expert_ffn`` forward under ``inference_mode``) on every path, per batch size.

    Each point records the mean rows per touched expert (its ``rows_bucket``) and every
    path's median time; ``best`` and ``best_unpacked`` (without the decode layout) feed
    ``moebal.expert_paths.INFERENCE_TABLE``.
    """
    import moebal
    from moebal.decode import _pack, onednn_supports
    from moebal.dispatch import dispatch_rows
    from moebal.expert_paths import rows_bucket
    from moebal.experts import expert_ffn
    from moebal.plan import build_plan

    say = progress or (lambda msg: None)
    torch.manual_seed(seed)
    E, K = shape.num_experts, shape.top_k
    moe = moebal.MoE(shape.d_model, shape.d_ff, E, K, router=moebal.Router(shape.d_model, E, K, balancer=None)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    points = []
    old = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            clock = _CLOCKS["cpu" if n_threads == 1 else "wall"]
            for dname in dtypes:
                dtype = DTYPES[dname]
                w_in = moe.experts.w_in_EDH.detach().to(dtype)
                w_out = moe.experts.w_out_EFD.detach().to(dtype)
                pack = _pack(moe.experts, dtype)
                for T in tokens:
                    x = torch.randn(T, shape.d_model, generator=gen)
                    with torch.inference_mode():
                        r = moe.router(x)
                        plan = build_plan(r.indices, E, None, r.weights)
                        xs = dispatch_rows(x.to(dtype), plan)
                    touched = int((plan.counts_E > 0).sum())
                    rows = T * K / max(touched, 1)
                    fns = {p: (lambda p=p: expert_ffn(xs, w_in, w_out, plan, path=p.replace("_packed", ""),
                                                      pack=pack if p.endswith("_packed") else None))
                           for p in PATH_CANDIDATES if p != "onednn_packed" or onednn_supports(dtype)}
                    times = _interleaved({p: (lambda _x, f=f: f()) for p, f in fns.items()}, None, repeats, 1, clock)
                    med = {p: statistics.median(ts) for p, ts in times.items()}
                    unpacked = {p: v for p, v in med.items() if not p.endswith("_packed")}
                    best = min(med, key=med.get)
                    point = {"threads": n_threads, "dtype": dname, "tokens": T, "experts_touched": touched,
                             "rows_per_expert": rows, "rows_bucket": rows_bucket(rows), "median_s": med,
                             "best": best.replace("_packed", ""), "best_is_packed": best.endswith("_packed"),
                             "best_unpacked": min(unpacked, key=unpacked.get)}
                    points.append(point)
                    say(f"t={n_threads} {dname} T={T} rows/expert {rows:.1f}: "
                        + ", ".join(f"{p} {v * 1e3:.2f}" for p, v in med.items()) + f" ms -> {best}")
    finally:
        torch.set_num_threads(old)
    return {"schema": "moebal.bench.paths/1", "shape": asdict(shape), "points": points}


def table_from_grid(grid: dict) -> dict:
    """``INFERENCE_TABLE`` entries from a path grid: per (dtype, threads, bucket) the winner of the
    point(s) in that bucket (by the summed median times), and the best without the decode layout."""
    sums: dict[tuple, dict[str, float]] = {}
    for p in grid["points"]:
        key = (p["dtype"], 1 if p["threads"] <= 1 else 2, p["rows_bucket"])
        acc = sums.setdefault(key, {})
        for path, t in p["median_s"].items():
            acc[path] = acc.get(path, 0.0) + t
    table = {}
    for key, acc in sums.items():
        best = min(acc, key=acc.get)
        unpacked = {k: v for k, v in acc.items() if not k.endswith("_packed")}
        table[key] = (best, min(unpacked, key=unpacked.get))
    return table
