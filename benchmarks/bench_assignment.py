"""Exact balanced assignment: moebal vs HiGHS vs scipy's Hungarian, side by side.

    python benchmarks/bench_assignment.py [--json PATH] [--skip-lsa] [--threads N] [--quick]

Part 1 (float64 scores, T = 4096, E in {8, 64}, K in {1, 2}): moebal's
``balanced_assignment``, HiGHS (``scipy.optimize.linprog``) on the compact T x E
transportation LP (rows sum to K, columns to C = T*K/E, 0 <= x <= 1) and, for K = 1,
``scipy.optimize.linear_sum_assignment`` on the T x T matrix that repeats each expert's
column C times (K = 2 has no such reduction: a token could take two seats of one
expert). All three run in this process on the same scores; the objectives must agree to
1e-6 relative, and the table prints the time ratios.

HiGHS runs as ``method="highs-ds"`` with presolve off: its presolve alone takes minutes
on these LPs (about 90 s at T = 1024, E = 64 on the development machine) while the dual
simplex finishes in about a second, so this is HiGHS at its fastest. ``--highs-default``
also times ``method="highs"`` with default options under a time limit.

Part 2: moebal alone, K = 1, T in {1k, 4k, 16k, 64k} x E in {8, 64, 256}.

Scores are router-like: softmax over experts of logits ``N(0, 1) + b_e`` with a per-
expert popularity bias ``b`` spread over [0, 1.5] (``--scores randn`` for plain normal
scores). moebal times are the median of ``--repeats`` runs after one warm-up; the
peers run once (``--peer-repeats``). torch runs with ``--threads`` threads (default 1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import scipy
import torch
from scipy.optimize import linear_sum_assignment, linprog
from scipy.sparse import coo_matrix

from moebal.assignment import balanced_assignment


def make_scores(T: int, E: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    if kind == "randn":
        return logits
    bias = torch.linspace(0.0, 1.5, E, dtype=torch.float64)[torch.randperm(E, generator=g)]
    return torch.softmax(logits + bias, dim=1)


def highs_solve(s: np.ndarray, K: int, default: bool = False, time_limit: float = 120.0):
    T, E = s.shape
    col = np.arange(T * E)
    A = coo_matrix((np.ones(2 * T * E), (np.r_[col // E, T + col % E], np.r_[col, col])), shape=(T + E, T * E))
    b = np.r_[np.full(T, K), np.full(E, T * K // E)]
    A = A.tocsc()
    t0 = time.perf_counter()
    if default:
        res = linprog(-s.ravel(), A_eq=A, b_eq=b, bounds=(0, 1), method="highs", options={"time_limit": time_limit})
    else:
        res = linprog(-s.ravel(), A_eq=A, b_eq=b, bounds=(0, 1), method="highs-ds", options={"presolve": False})
    dt = time.perf_counter() - t0
    return (-res.fun if res.status == 0 else float("nan")), dt, res.status


def lsa_solve(s: np.ndarray):
    T, E = s.shape
    expanded = np.repeat(s, T // E, axis=1)
    t0 = time.perf_counter()
    r, c = linear_sum_assignment(expanded, maximize=True)
    dt = time.perf_counter() - t0
    return float(expanded[r, c].sum()), dt


def time_moebal(scores: torch.Tensor, K: int, repeats: int):
    idx = balanced_assignment(scores, K)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        idx = balanced_assignment(scores, K)
        times.append(time.perf_counter() - t0)
    return float(scores.gather(1, idx).sum()), statistics.median(times), min(times), idx


def check_balanced(idx: torch.Tensor, E: int, K: int) -> None:
    T = idx.shape[0]
    load = torch.bincount(idx.reshape(-1), minlength=E)
    assert torch.equal(load, torch.full((E,), T * K // E)), "moebal result is not balanced"
    assert (idx.sort(1).values.diff(dim=1) > 0).all(), "moebal gave a token the same expert twice"


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def environment(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "device": f"cpu: {cpu}, {os.cpu_count()} cores",
        "torch_threads": threads,
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def side_by_side(args) -> list[dict]:
    rows = []
    T = 512 if args.quick else 4096
    for E in (8, 64):
        for K in (1, 2):
            scores = make_scores(T, E, args.scores, seed=E + K)
            print(f"[side-by-side] T={T} E={E} K={K}: moebal ...", flush=True)
            obj, med, best, idx = time_moebal(scores, K, args.repeats)
            check_balanced(idx, E, K)
            row = {"T": T, "E": E, "K": K, "moebal_s": med, "moebal_min_s": best, "moebal_obj": obj}
            print(f"    moebal {med * 1e3:8.2f} ms (min {best * 1e3:.2f})", flush=True)
            s = scores.numpy()
            hs = [highs_solve(s, K) for _ in range(args.peer_repeats)]
            row.update(highs_s=min(h[1] for h in hs), highs_obj=hs[0][0])
            assert rel(obj, row["highs_obj"]) <= 1e-6, (obj, row["highs_obj"])
            row["highs_ratio"] = row["highs_s"] / med
            print(f"    HiGHS  {row['highs_s'] * 1e3:8.1f} ms  -> {row['highs_ratio']:.0f}x  (objectives agree to "
                  f"{rel(obj, row['highs_obj']):.1e})", flush=True)
            if args.highs_default:
                hobj, hdt, status = highs_solve(s, K, default=True, time_limit=args.highs_time_limit)
                row.update(highs_default_s=hdt, highs_default_status=status)
                print(f"    HiGHS default options {hdt:.1f} s (status {status})", flush=True)
            if K == 1 and not args.skip_lsa:
                ls = [lsa_solve(s) for _ in range(args.peer_repeats)]
                row.update(lsa_s=min(x[1] for x in ls), lsa_obj=ls[0][0])
                assert rel(obj, row["lsa_obj"]) <= 1e-6, (obj, row["lsa_obj"])
                row["lsa_ratio"] = row["lsa_s"] / med
                print(f"    LSA    {row['lsa_s'] * 1e3:8.1f} ms  -> {row['lsa_ratio']:.0f}x", flush=True)
            rows.append(row)
    return rows


def scaling(args) -> list[dict]:
    rows = []
    Ts = (1024, 4096) if args.quick else (1024, 4096, 16384, 65536)
    for T in Ts:
        for E in (8, 64, 256):
            if T % E or T < E:
                print(f"[scaling] T={T} E={E}: skipped (T*K not a multiple of E)", flush=True)
                continue
            scores = make_scores(T, E, args.scores, seed=T + E)
            repeats = args.repeats if T * E <= 4096 * 256 else max(1, args.repeats // 3)
            obj, med, best, idx = time_moebal(scores, 1, repeats)
            check_balanced(idx, E, 1)
            rows.append({"T": T, "E": E, "K": 1, "moebal_s": med, "moebal_min_s": best, "tokens_per_s": T / med})
            print(f"[scaling] T={T:6d} E={E:4d}: {med * 1e3:9.2f} ms (min {best * 1e3:.2f}), "
                  f"{T / med / 1e6:.2f} M tokens/s", flush=True)
    return rows


def print_tables(side: list[dict], scale: list[dict]) -> None:
    print("\nExact balanced assignment, float64, side by side (median moebal time; ratio = peer / moebal)")
    print(f"{'T':>6} {'E':>4} {'K':>2} {'moebal ms':>10} {'HiGHS ms':>10} {'x HiGHS':>8} {'LSA ms':>10} {'x LSA':>7}")
    for r in side:
        lsa = f"{r['lsa_s'] * 1e3:10.1f} {r['lsa_ratio']:7.0f}" if "lsa_s" in r else f"{'-':>10} {'-':>7}"
        print(f"{r['T']:6d} {r['E']:4d} {r['K']:2d} {r['moebal_s'] * 1e3:10.2f} {r['highs_s'] * 1e3:10.1f} "
              f"{r['highs_ratio']:8.0f} {lsa}")
    print("\nScaling, K = 1 (median ms)")
    Es = sorted({r["E"] for r in scale})
    print(f"{'T':>6} " + " ".join(f"{'E=' + str(e):>10}" for e in Es))
    for T in sorted({r["T"] for r in scale}):
        cells = {r["E"]: r for r in scale if r["T"] == T}
        print(f"{T:6d} " + " ".join(f"{cells[e]['moebal_s'] * 1e3:10.2f}" if e in cells else f"{'-':>10}" for e in Es))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--skip-lsa", action="store_true", help="skip linear_sum_assignment (~15 s per T=4096 case)")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--peer-repeats", type=int, default=1)
    p.add_argument("--scores", choices=("router", "randn"), default="router")
    p.add_argument("--highs-default", action="store_true", help="also time linprog(method='highs') as is")
    p.add_argument("--highs-time-limit", type=float, default=120.0)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(f"{env['device']}; torch {env['torch']} ({args.threads} thread(s)), scipy {env['scipy']}", flush=True)
    side = side_by_side(args)
    scale = [] if args.skip_scaling else scaling(args)
    print_tables(side, scale)
    result = {"env": env, "scores": args.scores, "side_by_side": side, "scaling": scale}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
