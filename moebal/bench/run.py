"""The entry point ``run_layer_bench``: environment header, the measurement loop and per-run summaries."""
from __future__ import annotations

import gc
import importlib.util
import os
import platform
import statistics
from dataclasses import asdict
from typing import Callable

import torch

from moebal.bench.configs import DTYPES, MODES, SCHEMA, TIMERS, _resolve_configs
from moebal.bench.impls import _build, _clone, _peer_errors, make_inputs
from moebal.bench.timing import _stage_times, _time_round_robin, gemm_floor, paired_ratio


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    import moebal

    out = {"python": platform.python_version(), "torch": torch.__version__, "moebal": moebal.__version__}
    for pkg in ("transformers", "triton", "numpy"):
        if importlib.util.find_spec(pkg) is not None:
            try:
                out[pkg] = __import__(pkg).__version__
            except Exception:  # a broken optional install must not stop the benchmark
                out[pkg] = "unimportable"
    return out


def environment(threads) -> dict:
    """Device name, library versions and threading of this process (the JSON header)."""
    return {
        "device": {
            "type": "cpu",
            "name": _cpu_name(),
            "logical_cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn": torch.backends.mkldnn.is_available(),
        },
        "versions": _versions(),
        "threads": list(threads),
        "platform": f"{platform.system()} {platform.machine()}",
    }


def run_layer_bench(
    configs=("A", "B", "C"),
    dtypes=("fp32", "bf16"),
    modes=MODES,
    threads=1,
    peers=True,
    repeats: int = 5,
    warmup: int = 1,
    stages: bool = True,
    moebal_paths=("auto", "grouped"),
    seed: int = 0,
    timer: str = "auto",
    floor: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time moebal.MoE, the dense-equivalent SwiGLU FFN and peer MoEs side by side.

    Args:
        configs: names from ``CONFIGS`` ("A", "B", "C", "tiny") or ``LayerConfig``s.
        dtypes: "fp32" and/or "bf16" (modules and activations in that dtype).
        modes: "fwd" (forward with autograd recording, as in training) and/or "fwd+bwd".
        threads: an int or a sequence of ints; each is a full pass with
            ``torch.set_num_threads``.
        peers: True (all of ``benchmarks/peers.py`` that can run here), False, or a list
            of peer names.
        repeats: timed rounds; each implementation keeps its fastest.
        warmup: untimed rounds first (buffers, oneDNN primitives).
        stages: also time each stage of the moebal layer (router, plan, dispatch, experts,
            combine; forward and backward).
        moebal_paths: expert paths timed as separate rows: "auto" is the default layer
            ("moebal"), "grouped" the grouped_mm path ("moebal_grouped"), "loop".
        timer: "auto" (CPU time of the process with one thread, wall time with more),
            "cpu" or "wall"; see ``TIMERS``. The run records which it used.
        floor: also measure ``gemm_floor`` per config and dtype (into ``gemm_floor``).
        progress: called with a one-line message as each measurement finishes.

    Returns a JSON-ready dict: the environment, then ``runs`` (one per threads x config
    x dtype x mode with per-implementation times, tokens/s and ratios to dense) and
    ``stages``.
    """
    threads = [threads] if isinstance(threads, int) else list(threads)
    cfgs = _resolve_configs(configs)
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; known: {sorted(DTYPES)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; known: {MODES}")
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r}; known: {TIMERS}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    say = progress or (lambda msg: None)
    result = {"schema": SCHEMA, **environment(threads), "settings": {
        "repeats": repeats, "warmup": warmup, "seed": seed, "timer": timer,
        "statistic": "fastest of interleaved rounds (the starting implementation rotates)",
        "fwd": "forward with autograd recording (training forward), output then dropped",
        "fwd+bwd": "forward + backward of a fixed random output gradient; grads of x and all weights",
        "dense": "DenseFFN(D, K*F, swiglu): two nn.Linear, same active FLOPs as the experts",
        "router": "moebal.Router softmax top-K renormalised, no balancing loss; peers copy its gate",
    }, "runs": [], "stages": [], "gemm_floor": [], "skipped_peers": {}}
    old_threads = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            clock = timer if timer != "auto" else ("cpu" if n_threads == 1 else "wall")
            for cfg in cfgs:
                ref32, mods32, skipped = _build(cfg, seed, peers, moebal_paths)
                result["skipped_peers"].update(skipped)
                x32, g32 = make_inputs(cfg, "fp32", seed)
                x32 = x32.detach()
                errors32 = _peer_errors(ref32, mods32, x32)
                routing = _routing_stats(ref32, x32)
                for dname in dtypes:
                    dtype = DTYPES[dname]
                    mods = mods32 if dtype == torch.float32 else {k: _clone(v).to(dtype) for k, v in mods32.items()}
                    ref = mods["moebal"] if "moebal" in mods else next(iter(mods.values()))
                    x = x32.to(dtype).requires_grad_(True)
                    g = g32.to(dtype)
                    errors = errors32 if dtype == torch.float32 else _peer_errors(ref, mods, x.detach())
                    for mode in modes:
                        times = _time_round_robin(mods, x, g, mode, repeats, warmup, clock)
                        run = _summarise(cfg, dname, mode, n_threads, times, errors, routing)
                        run["timer"] = clock
                        result["runs"].append(run)
                        say(_one_line(run))
                    if stages and "moebal" in mods:
                        st = _stage_times(mods["moebal"], x, g, repeats, clock)
                        result["stages"].append({"config": cfg.name, "dtype": dname, "threads": n_threads,
                                                 "timer": clock, **st})
                        say(f"stages {cfg.name} {dname} t={n_threads}: " + ", ".join(
                            f"{k} {v * 1e3:.1f}" for k, v in {**_prefixed(st)}.items()) + " ms")
                    del mods, x, g
                    gc.collect()
                    if floor and (cfg.tokens * cfg.top_k) % cfg.num_experts == 0:
                        fl = gemm_floor(cfg, dname, repeats, clock)
                        result["gemm_floor"].append({**fl, "threads": n_threads})
                        say(f"gemm floor {cfg.name} {dname} t={n_threads}: per-expert GEMMs {fl['ratio']:.3f} x dense "
                            f"GEMMs ({fl['cached_ratio']:.3f} x with the weights in cache)")
                del ref32, mods32
                gc.collect()
    finally:
        torch.set_num_threads(old_threads)
    return result


def _routing_stats(moe, x_TD) -> dict:
    from moebal import stats

    with torch.no_grad():
        idx = moe.router(x_TD).indices
    load = stats.expert_load(idx, moe.num_experts)
    return {"max_violation": float(stats.max_violation(load)), "min_load": int(load.min()), "max_load": int(load.max())}


def _prefixed(st: dict) -> dict:
    return {**{f"fwd.{k}": v for k, v in st["fwd_s"].items()}, **{f"bwd.{k}": v for k, v in st["bwd_s"].items()}}


def _summarise(cfg, dname, mode, n_threads, times, errors, routing) -> dict:
    best = {n: min(ts) for n, ts in times.items()}
    med = {n: statistics.median(ts) for n, ts in times.items()}
    dense, dense_med = best.get("dense"), med.get("dense")
    impls = {}
    for n, ts in times.items():
        impls[n] = {
            "times_s": ts,
            "best_s": best[n],
            "median_s": med[n],
            "tokens_per_s": cfg.tokens / best[n],
            "ratio_to_dense": best[n] / dense if dense else None,
            "median_ratio_to_dense": med[n] / dense_med if dense_med else None,
            "paired_ratio_to_dense": paired_ratio(ts, times["dense"]) if dense else None,
        }
        if n in errors:
            impls[n]["max_abs_err_vs_moebal"] = errors[n]
    flops = cfg.active_flops_fwd * (3 if mode == "fwd+bwd" else 1)
    return {
        "config": asdict(cfg), "dtype": dname, "mode": mode, "threads": n_threads,
        "dense_gflops_per_s": flops / dense / 1e9 if dense else None,
        "routing": routing, "impls": impls,
    }


def _one_line(run) -> str:
    ratios = ", ".join(
        f"{n} {v['ratio_to_dense']:.2f}" for n, v in run["impls"].items() if n != "dense" and v["ratio_to_dense"]
    )
    dense = run["impls"].get("dense", {}).get("best_s")
    head = f"{run['config']['name']} {run['dtype']} {run['mode']} t={run['threads']} ({run.get('timer', 'wall')})"
    return f"{head}: dense {dense * 1e3:.1f} ms; x dense: {ratios}" if dense else f"{head}: {ratios}"
