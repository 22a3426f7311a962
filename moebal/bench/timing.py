"""Timing: one run, interleaved round-robin rounds, the paired per-round ratio, per-stage times of moebal.MoE and the GEMM floor."""
from __future__ import annotations

import statistics

import torch

from moebal.bench.configs import _CLOCKS, DTYPES, MODES, _resolve_configs


def _zero_grads(m, x):
    for p in m.parameters():
        p.grad = None
    x.grad = None


def run_once(m, x, g, mode: str, timer: str = "wall") -> float:
    """One timed forward (``mode="fwd"``) or forward+backward of ``m`` on ``x``; seconds.

    ``timer`` is ``"wall"`` or ``"cpu"`` (see ``TIMERS``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    clock = _CLOCKS[timer]
    _zero_grads(m, x)
    t0 = clock()
    y = m(x)
    if mode == "fwd+bwd":
        y.backward(g)
    t = clock() - t0
    del y
    return t


def _time_round_robin(mods: dict, x, g, mode: str, repeats: int, warmup: int, timer: str) -> dict[str, list[float]]:
    names = list(mods)
    for _ in range(warmup):
        for n in names:
            run_once(mods[n], x, g, mode, timer)
    times = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            times[n].append(run_once(mods[n], x, g, mode, timer))
    for m in mods.values():
        _zero_grads(m, x)
    return times


def paired_ratio(times_s: list[float], dense_times_s: list[float]) -> float:
    """Median over rounds of ``time / dense time of the same round``.

    Every round runs each implementation once, back to back, so pairing by round cancels
    the machine's drift between rounds (on shared cores the dense time alone can move by
    a third within one run), which a ratio of two fastest times does not.
    """
    if len(times_s) != len(dense_times_s) or not times_s:
        raise ValueError(f"need one time per round for both, got {len(times_s)} and {len(dense_times_s)}")
    return statistics.median(t / d for t, d in zip(times_s, dense_times_s))


def _stage_times(moe, x_TD, g_TD, repeats: int, timer: str = "wall") -> dict:
    """Fastest time of each stage of one ``moebal.MoE`` forward and backward, in seconds.

    The stages run as the layer runs them, cut apart by ``detach()`` so each backward can be
    timed alone; the per-stage sum is within a few percent of the whole-layer time.
    """
    from moebal.dispatch import combine_rows, dispatch_rows
    from moebal.plan import build_plan

    best: dict[str, float] = {}
    clock = _CLOCKS[timer]

    def keep(name, t):
        best[name] = min(best.get(name, float("inf")), t)

    for _ in range(repeats + 1):  # the first round warms up
        _zero_grads(moe, x_TD)
        t = [clock()]
        routing = moe.router(x_TD)
        t.append(clock())
        plan = build_plan(routing.indices, moe.num_experts, moe.capacity(x_TD.shape[0]), routing.weights, moe.drop_policy)
        t.append(clock())
        xs = dispatch_rows(x_TD, plan, moe.backend)
        t.append(clock())
        xs_in = xs.detach().requires_grad_(True)
        ys = moe.experts(xs_in, plan)
        t.append(clock())
        ys_in = ys.detach().requires_grad_(True)
        w_in = routing.weights.detach().requires_grad_(True)
        y = combine_rows(ys_in, plan, w_in, moe.backend)
        t.append(clock())
        y.backward(g_TD)
        t.append(clock())
        ys.backward(ys_in.grad)
        t.append(clock())
        xs.backward(xs_in.grad)
        t.append(clock())
        routing.weights.backward(w_in.grad)
        t.append(clock())
        names = ("fwd.router", "fwd.plan", "fwd.dispatch", "fwd.experts", "fwd.combine",
                 "bwd.combine", "bwd.experts", "bwd.dispatch", "bwd.router")
        for name, a, b in zip(names, t, t[1:]):
            keep(name, b - a)
        del routing, plan, xs, xs_in, ys, ys_in, w_in, y
    _zero_grads(moe, x_TD)
    fwd = {k[4:]: v for k, v in best.items() if k.startswith("fwd.")}
    bwd = {k[4:]: v for k, v in best.items() if k.startswith("bwd.")}
    return {"fwd_s": fwd, "bwd_s": bwd, "sum_s": sum(best.values())}


def gemm_floor(config, dtype="fp32", repeats: int = 3, timer: str = "cpu") -> dict:
    """The practical limit of any per-expert-GEMM MoE here: its six GEMMs vs the dense FFN's.

    Times the forward and backward GEMMs alone (no routing, no activation, preallocated
    buffers), with every expert getting exactly T*K/E rows, in the order a layer runs them
    (per expert: both forward GEMMs; then per expert: the four backward ones). Returns both
    times and ``ratio`` = per-expert / dense. A layer cannot beat this ratio by more than the
    dense FFN's own non-GEMM share.

    ``cached_ratio`` times the same calls with every expert reading and writing expert 0's
    weights and weight gradients, so they stay in cache: the gap between the two ratios is
    the cost of streaming E distinct experts' weights and gradients (E / K times the dense
    FFN's parameters) through memory, which no per-expert schedule avoids.
    """
    cfg = _resolve_configs([config])[0]
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    T, D, F_, E, K = cfg.tokens, cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k
    if (T * K) % E:
        raise ValueError(f"gemm_floor needs T*K divisible by E, got {cfg}")
    R, H, rows = T * K, 2 * F_, T * K // E
    new = lambda *shape: torch.randn(*shape, dtype=dt)  # noqa: E731
    x, w_in, w_out, a, g, gh = new(T, D), new(2 * K * F_, D), new(D, K * F_), new(T, K * F_), new(T, D), new(T, 2 * K * F_)
    outs = [torch.empty(T, 2 * K * F_, dtype=dt), torch.empty(T, D, dtype=dt), torch.empty(T, K * F_, dtype=dt),
            torch.empty(D, K * F_, dtype=dt), torch.empty(T, D, dtype=dt), torch.empty(2 * K * F_, D, dtype=dt)]

    def dense():
        torch.mm(x, w_in.t(), out=outs[0])
        torch.mm(a, w_out.t(), out=outs[1])
        torch.mm(g, w_out, out=outs[2])
        torch.mm(g.t(), a, out=outs[3])
        torch.mm(gh, w_in, out=outs[4])
        torch.mm(gh.t(), x, out=outs[5])

    xs, ws_in, ws_out, a_s, g_s, gh_s = new(R, D), new(E, D, H), new(E, F_, D), new(R, F_), new(R, D), new(R, H)
    outs_e = [torch.empty(R, H, dtype=dt), torch.empty(R, D, dtype=dt), torch.empty(R, F_, dtype=dt),
              torch.empty(E, F_, D, dtype=dt), torch.empty(R, D, dtype=dt), torch.empty(E, D, H, dtype=dt)]

    def per_expert(cached: bool = False):
        slices = [slice(e * rows, (e + 1) * rows) for e in range(E)]
        for e, r in enumerate(slices):
            w = 0 if cached else e
            torch.mm(xs[r], ws_in[w], out=outs_e[0][r])
            torch.mm(a_s[r], ws_out[w], out=outs_e[1][r])
        for e, r in enumerate(slices):
            w = 0 if cached else e
            torch.mm(a_s[r].t(), g_s[r], out=outs_e[3][w])
            torch.mm(g_s[r], ws_out[w].t(), out=outs_e[2][r])
            torch.mm(xs[r].t(), gh_s[r], out=outs_e[5][w])
            torch.mm(gh_s[r], ws_in[w].t(), out=outs_e[4][r])

    clock = _CLOCKS[timer]
    fns = {"dense": dense, "per_expert": per_expert, "cached": lambda: per_expert(cached=True)}
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return {"config": cfg.name, "dtype": dtype if isinstance(dtype, str) else str(dt), "timer": timer,
            "dense_gemms_s": best["dense"], "per_expert_gemms_s": best["per_expert"],
            "per_expert_cached_gemms_s": best["cached"],
            "ratio": best["per_expert"] / best["dense"], "cached_ratio": best["cached"] / best["dense"]}


def ratio_bench_main(doc: str, run_config, default_configs=("A", "C")) -> dict:
    """The command line the policy benchmarks share (``benchmarks/bench_policies.py``,
    ``bench_dynamic_k.py``, ``bench_variable_k.py``): ``--configs``, ``--repeats``,
    ``--warmup``, ``--threads``, ``--out``. ``run_config(name, repeats, warmup)`` measures
    one config, prints its table and returns its JSON-able result; the results of every
    config go to ``--out`` as ``{"threads", "torch", "cpu_count", "configs": {name: result}}``."""
    import argparse
    import json
    import os

    from moebal.bench.configs import CONFIGS

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(default_configs), choices=sorted(CONFIGS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(), "configs": {}}
    for name in args.configs:
        out["configs"][name] = run_config(name, args.repeats, args.warmup)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out
