"""GPU check: moebal's Triton kernels against their torch twins at real sizes, their
bandwidth, and the MoE layer against plain-torch baselines. Writes one JSON file.

    python benchmarks/gpu_check.py --out results.json          # one H100/H200, < 5 min
    python benchmarks/gpu_check.py --smoke --out smoke.json    # CPU, tiny shapes, interpreter

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R rows of xs.

Per shape (bf16, T = 16384; Mixtral, Qwen3-30B-A3B, DeepSeek-V2-Lite):
- plan: ``triton_build_plan`` equal to ``build_plan`` (every field, twice), and both timed;
- dispatch / combine, forward and backward: Triton vs the torch twin (bit equality where
  the op is a copy, else max error of each against a float64 reference) and timings;
  achieved bandwidth against the minimum bytes ``T*D*b*(1+K) + 8*T*K`` (dropless) and
  against a device-to-device copy measured in the same run;
- fused gather + first expert GEMM (``triton_gather_grouped_mm``, w_in ``[E, D, 2F]``),
  forward and backward: max error of it and of its torch twin ``grouped_matmul(dispatch_rows
  (x, plan), w, plan)`` against float64 on sampled rows / tokens / experts, bit-for-bit
  repeatability, and timings against (Triton dispatch + ``grouped_matmul``), with TFLOP/s;
- layer fwd+bwd: ``moebal.MoE`` (Triton and torch backends) vs (a) a torchtitan-style
  plain-torch MoE (gpu_check_layer.py: stable argsort, ``x[idx]``, three grouped_mm,
  ``scatter_add``) and (b) the dense-equivalent SwiGLU FFN with hidden K*F.
Every section records its own error instead of stopping the run; the JSON is rewritten
after each shape so a run cut short still leaves results.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_check_common import Bench, _gbps, _max_err, _routing, _section
from gpu_check_layer import layer_for_shape

REPO = Path(__file__).resolve().parent.parent

SHAPES = {  # name: (D, F, E, K)
    "mixtral_8x7b": (4096, 14336, 8, 2),
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "deepseek_v2_lite": (2048, 1408, 64, 6),
}
SMOKE_SHAPES = {"tiny_top2": (32, 48, 4, 2), "tiny_top4_primeE": (48, 40, 7, 4)}
CAPACITY_FACTOR = 1.25


# --------------------------------------------------------------------------- environment


def environment(device: torch.device) -> dict:
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_GiB=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
        )
    else:
        env["device_name"] = platform.processor() or platform.machine()
    try:
        import moebal

        env["moebal"] = getattr(moebal, "__version__", "unknown")
    except Exception as err:
        env["moebal"] = f"import failed: {err}"
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    return env


def copy_bandwidth(device: torch.device, bench: Bench, smoke: bool) -> dict:
    nbytes = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return {"bytes_moved": 2 * nbytes, "ms": ms, "GBps": _gbps(2 * nbytes, ms)}


# --------------------------------------------------------------------------- kernels


def _ref_gather_sum(src_RD: torch.Tensor, rows_TK: torch.Tensor, w_TK: torch.Tensor | None, chunk: int = 2048):
    """float64 ``sum_k w[t,k] * src[row(t,k)]`` (row -1 adds 0), in token chunks."""
    T = rows_TK.shape[0]
    out = torch.empty(T, src_RD.shape[1], dtype=torch.float64, device=src_RD.device)
    for t0 in range(0, T, chunk):
        rows = rows_TK[t0:t0 + chunk]
        g = src_RD[rows.clamp(min=0)].double() * (rows >= 0).unsqueeze(-1)
        if w_TK is not None:
            g = g * w_TK[t0:t0 + chunk].double().unsqueeze(-1)
        out[t0:t0 + chunk] = g.sum(1)
    return out


def kernels_for_shape(T: int, D: int, E: int, K: int, device: torch.device, bench: Bench, copy_GBps: float) -> dict:
    from moebal.dispatch import _combine_bwd, _TorchCombine, _TorchDispatch
    from moebal.plan import build_plan
    from moebal.triton_ops import _kernels as kern
    from moebal.triton_ops import triton_build_plan

    fields = ("counts_E", "kept_E", "starts_E", "group_ends_E", "row_of_pair_TK", "pair_of_row_R", "token_of_row_R")
    idx, w = _routing(T, E, K, device)
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    b = x.element_size()
    out = {}
    for label, cap in (("dropless", None), ("capacity", max(1, math.ceil(CAPACITY_FACTOR * T * K / E)))):
        res = out[label] = {"capacity": cap}
        # plan
        p_ref = build_plan(idx, E, cap)
        p1, p2 = triton_build_plan(idx, E, cap), triton_build_plan(idx, E, cap)
        res["plan_equal_to_build_plan"] = all(torch.equal(getattr(p1, f), getattr(p_ref, f)) for f in fields)
        res["plan_deterministic"] = all(torch.equal(getattr(p1, f), getattr(p2, f)) for f in fields)
        res["plan_ms"] = {"triton": bench(lambda: triton_build_plan(idx, E, cap)), "torch": bench(lambda: build_plan(idx, E, cap))}
        plan = p_ref
        R, kept = plan.num_rows, int(plan.kept_E.sum())
        res["rows"], res["kept_pairs"] = R, kept
        idx_bytes = 8 * T * K

        # dispatch forward: a copy, must be bit-equal
        xs_t = kern.dispatch_rows(x, plan.token_of_row_R)
        xs_ref = _TorchDispatch.apply(x, plan)
        ms_t = bench(lambda: kern.dispatch_rows(x, plan.token_of_row_R))
        ms_r = bench(lambda: _TorchDispatch.apply(x, plan))
        nbytes = T * D * b + R * D * b + idx_bytes  # dropless: T*D*b*(1+K) + 8*T*K
        res["dispatch_fwd"] = {
            "bit_equal_to_twin": bool(torch.equal(xs_t, xs_ref)),
            "ms": {"triton": ms_t, "torch": ms_r}, "speedup_vs_torch": ms_r / ms_t,
            "min_bytes": nbytes, "GBps": _gbps(nbytes, ms_t), "fraction_of_copy": _gbps(nbytes, ms_t) / copy_GBps,
        }
        del xs_t

        # dispatch backward: gather-sum over K
        g_xs = torch.randn(R, D, device=device, dtype=torch.bfloat16)
        ref = _ref_gather_sum(g_xs, plan.row_of_pair_TK, None)
        gx_t = kern.dispatch_rows_backward(g_xs, plan.row_of_pair_TK)
        xl = x.detach().requires_grad_(True)
        xs_l = _TorchDispatch.apply(xl, plan)
        gx_r = torch.autograd.grad(xs_l, xl, g_xs)[0]
        ms_t = bench(lambda: kern.dispatch_rows_backward(g_xs, plan.row_of_pair_TK))
        ms_r = bench(lambda: torch.autograd.grad(_TorchDispatch.apply(xl, plan), xl, g_xs)[0])
        nbytes = kept * D * b + T * D * b + idx_bytes
        res["dispatch_bwd"] = {
            "max_err_vs_fp64": {"triton": _max_err(gx_t, ref), "torch": _max_err(gx_r, ref)},
            "ms": {"triton": ms_t, "torch_incl_fwd": ms_r},
            "min_bytes": nbytes, "GBps": _gbps(nbytes, ms_t), "fraction_of_copy": _gbps(nbytes, ms_t) / copy_GBps,
        }
        del g_xs, gx_t, gx_r, xs_l, ref

        # combine forward
        ys = torch.randn(R, D, device=device, dtype=torch.bfloat16)
        ref = _ref_gather_sum(ys, plan.row_of_pair_TK, w)
        y_t = kern.combine_rows(ys, plan.row_of_pair_TK, w)
        y_r = _TorchCombine.apply(ys, w, plan)
        ms_t = bench(lambda: kern.combine_rows(ys, plan.row_of_pair_TK, w))
        ms_r = bench(lambda: _TorchCombine.apply(ys, w, plan))
        nbytes = kept * D * b + T * D * b + idx_bytes  # dropless: T*D*b*(1+K) + 8*T*K
        res["combine_fwd"] = {
            "max_err_vs_fp64": {"triton": _max_err(y_t, ref), "torch": _max_err(y_r, ref)},
            "ms": {"triton": ms_t, "torch": ms_r}, "speedup_vs_torch": ms_r / ms_t,
            "min_bytes": nbytes, "GBps": _gbps(nbytes, ms_t), "fraction_of_copy": _gbps(nbytes, ms_t) / copy_GBps,
        }
        del y_t, y_r, ref

        # combine backward: grad_ys and grad_w in one pass
        dy = torch.randn(T, D, device=device, dtype=torch.bfloat16)
        pad = plan.pair_of_row_R if plan.has_drops else None
        gys_t, gw_t = kern.combine_rows_backward(dy, ys, plan.row_of_pair_TK, w, pad)
        gys_r, gw_r = _combine_bwd(dy, ys, w, plan)
        gw_ref = torch.stack([_ref_gather_sum(ys, plan.row_of_pair_TK[:, k:k + 1], None).mul_(dy.double()).sum(-1) for k in range(K)], 1)
        ms_t = bench(lambda: kern.combine_rows_backward(dy, ys, plan.row_of_pair_TK, w, pad))
        ms_r = bench(lambda: _combine_bwd(dy, ys, w, plan))
        nbytes = T * D * b + kept * D * b + R * D * b + idx_bytes + 4 * T * K
        res["combine_bwd"] = {
            "grad_ys_bit_equal_to_twin": bool(torch.equal(gys_t, gys_r)),
            "grad_w_max_err_vs_fp64": {"triton": _max_err(gw_t, gw_ref), "torch": _max_err(gw_r, gw_ref)},
            "ms": {"triton": ms_t, "torch": ms_r}, "speedup_vs_torch": ms_r / ms_t,
            "min_bytes": nbytes, "GBps": _gbps(nbytes, ms_t), "fraction_of_copy": _gbps(nbytes, ms_t) / copy_GBps,
        }
        del dy, gys_t, gw_t, gys_r, gw_r, ys, xs_ref
    out["min_bytes_formula"] = {
        "dispatch_fwd": "T*D*b + R*D*b + 8*T*K  (= T*D*b*(1+K) + 8*T*K dropless)",
        "dispatch_bwd": "kept*D*b + T*D*b + 8*T*K",
        "combine_fwd": "kept*D*b + T*D*b + 8*T*K  (= T*D*b*(1+K) + 8*T*K dropless)",
        "combine_bwd": "T*D*b + kept*D*b + R*D*b + 8*T*K + 4*T*K",
    }
    return out


def int64_offsets_check(device: torch.device) -> dict:
    """row * D beyond 2**31 elements: wrong unless addresses are computed in int64."""
    from moebal.triton_ops import triton_build_plan, triton_combine, triton_dispatch

    T, K, E, D = 65536, 4, 8, 8192
    idx, _ = _routing(T, E, K, device)
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    plan = triton_build_plan(idx, E)
    xs = triton_dispatch(x, plan)
    rows_last = plan.row_of_pair_TK[-1]
    ok_dispatch = bool(torch.equal(xs[rows_last], x[-1].expand(K, D)))
    y = triton_combine(xs, plan, torch.full((T, K), 1.0 / K, device=device))
    ok_combine = bool(torch.equal(y[-4:], x[-4:]))
    del xs, y
    # fused gather-GEMM: R * H = 2**31 output elements
    from moebal.triton_ops import triton_gather_grouped_mm

    H = 2**31 // plan.num_rows + 128  # the last rows of h start past 2**31 elements
    w = torch.randn(E, D, H, device=device, dtype=torch.bfloat16) / math.sqrt(D)
    h = triton_gather_grouped_mm(x, w, plan)
    last_rows = plan.token_of_row_R[-4:]  # the last expert's last rows
    want = x[last_rows].float() @ w[E - 1].float()
    ok_fused = bool(torch.allclose(h[-4:].float(), want, rtol=2e-2, atol=2e-2))
    del h, w
    return {"rows_times_D": plan.num_rows * D, "dispatch_ok": ok_dispatch, "combine_ok": ok_combine,
            "rows_times_H": plan.num_rows * H, "fused_gather_gemm_ok": ok_fused}


# --------------------------------------------------------------------------- fused gather-GEMM


def _fp64_refs(x, w, plan, idx, dh, n_rows: int = 2048, n_tokens: int = 256) -> dict:
    """float64 references of ``h = x[token(r)] @ w[e(r)]`` and its gradients, from the routing
    indices: ``h`` on sampled rows, ``grad_x`` on sampled tokens, ``grad_w`` for three experts
    (the fullest, the first, the last). One expert's weights are in float64 at a time."""
    T, D = x.shape
    E, R, dev = w.shape[0], plan.num_rows, x.device
    rows = torch.linspace(0, max(R - 1, 0), min(n_rows, R), device=dev).long().unique()
    tok_rows = plan.token_of_row_R[rows]
    expert_rows = torch.searchsorted(plan.group_ends_E.long(), rows, right=True)
    toks = torch.linspace(0, max(T - 1, 0), min(n_tokens, T), device=dev).long().unique()
    pair_rows_nK, pair_experts_nK = plan.row_of_pair_TK[toks], idx[toks]
    experts_w = sorted({int(plan.kept_E.argmax()), 0, E - 1})
    h = torch.zeros(rows.shape[0], w.shape[2], dtype=torch.float64, device=dev)
    gx = torch.zeros(toks.shape[0], D, dtype=torch.float64, device=dev)
    gw = {}
    for e in range(E):
        sel = (expert_rows == e) & (tok_rows >= 0)
        n, k = torch.nonzero((pair_experts_nK == e) & (pair_rows_nK >= 0), as_tuple=True)
        if not bool(sel.any()) and n.numel() == 0 and e not in experts_w:
            continue
        w64 = w[e].double()
        h[sel] = x[tok_rows[sel]].double() @ w64
        gx.index_add_(0, n, dh[pair_rows_nK[n, k]].double() @ w64.T)
        if e in experts_w:
            pairs = torch.nonzero((idx == e) & (plan.row_of_pair_TK >= 0), as_tuple=True)
            gw[e] = x[pairs[0]].double().T @ dh[plan.row_of_pair_TK[pairs]].double()
    return {"rows": rows, "h": h, "tokens": toks, "grad_x": gx, "experts": experts_w,
            "grad_w": torch.stack([gw[e] for e in experts_w])}


def _errors_vs_fp64(got: dict, x, w, plan, idx, dh) -> tuple[list, dict]:
    """Max error of the fused op and of the torch twin against the float64 references."""
    ref = _fp64_refs(x, w, plan, idx, dh)
    errs = {}
    for what, i, at, key in (
        ("h_sampled_rows", 0, ref["rows"], "h"),
        ("grad_x_sampled_tokens", 1, ref["tokens"], "grad_x"),
        ("grad_w_checked_experts", 2, ref["experts"], "grad_w"),
    ):
        want = ref[key]
        e_f, e_t = _max_err(got["fused"][i][at], want), _max_err(got["torch_twin"][i][at], want)
        scale = float(want.abs().max()) if want.numel() else 0.0
        errs[what] = {"fused": e_f, "torch_twin": e_t, "ref_max_abs": scale,
                      "within_2x_twin_plus_ulp": e_f <= 2 * e_t + torch.finfo(torch.bfloat16).eps * scale}
    return ref["experts"], errs


def _time_fwd_bwd(fn, x, w, plan, graph, dh, bench: Bench) -> tuple[float, float]:
    """ms of ``fn`` without autograd, and of the backward of a kept graph (grad_x and grad_w)."""
    with torch.no_grad():
        fwd = bench(lambda: fn(x, w, plan))
    h, xl, wl = graph
    return fwd, bench(lambda: torch.autograd.grad(h, (xl, wl), dh, retain_graph=True))


def fused_gemm_for_shape(T: int, D: int, F_: int, E: int, K: int, device: torch.device, bench: Bench) -> dict:
    from moebal.dispatch import dispatch_rows
    from moebal.experts import grouped_matmul
    from moebal.plan import build_plan
    from moebal.triton_ops import triton_dispatch, triton_gather_grouped_mm

    H = 2 * F_  # w_in of a SwiGLU expert: gate then up
    idx, _ = _routing(T, E, K, device, seed=1)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.randn(E, D, H, device=device, dtype=torch.bfloat16, generator=g) / math.sqrt(D)
    variants = {
        "fused": lambda x_, w_, plan: triton_gather_grouped_mm(x_, w_, plan),
        "dispatch_plus_grouped_mm": lambda x_, w_, plan: grouped_matmul(triton_dispatch(x_, plan), w_, plan),
        "torch_twin": lambda x_, w_, plan: grouped_matmul(dispatch_rows(x_, plan, "torch"), w_, plan),
    }
    timed = ("fused", "dispatch_plus_grouped_mm")
    out: dict = {"H": H}
    for label, cap in (("dropless", None), ("capacity", max(1, math.ceil(CAPACITY_FACTOR * T * K / E)))):
        plan = build_plan(idx, E, cap)
        R, kept = plan.num_rows, int(plan.kept_E.sum())
        res = out[label] = {"capacity": cap, "rows": R, "kept_pairs": kept, "xs_bytes_not_written": R * D * x.element_size()}
        dh = torch.randn(R, H, device=device, dtype=torch.bfloat16, generator=g)
        got, graphs = {}, {}
        for name, fn in variants.items():
            xl, wl = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
            h = fn(xl, wl, plan)
            got[name] = (h.detach(), *torch.autograd.grad(h, (xl, wl), dh, retain_graph=name in timed))
            if name in timed:
                graphs[name] = (h, xl, wl)  # kept for the backward timing
        h, xl, wl = graphs["fused"]
        again = (triton_gather_grouped_mm(x, w, plan), *torch.autograd.grad(h, (xl, wl), dh, retain_graph=True))
        res["deterministic"] = all(bool(torch.equal(a, b)) for a, b in zip(got["fused"], again))
        res["padding_rows_zero"] = not bool(got["fused"][0][plan.pair_of_row_R < 0].any())
        res["h_max_abs_diff_fused_vs_twin"] = _max_err(got["fused"][0], got["torch_twin"][0].double())
        del again, h, xl, wl
        res["grad_w_checked_experts"], res["max_err_vs_fp64"] = _errors_vs_fp64(got, x, w, plan, idx, dh)
        del got
        # timings: the forward without autograd, the backward (grad_x and grad_w) on a kept graph
        ms: dict = {"fwd": {}, "bwd": {}}
        for name in timed:
            ms["fwd"][name], ms["bwd"][name] = _time_fwd_bwd(variants[name], x, w, plan, graphs.pop(name), dh, bench)
        del dh
        res["ms"] = ms
        res["speedup_fused"] = {k: v["dispatch_plus_grouped_mm"] / v["fused"] for k, v in ms.items()}
        flops = {"fwd": 2.0 * kept * D * H, "bwd": 4.0 * kept * D * H}
        res["TFLOPs"] = {f"{k}_{name}": flops[k] / (v[name] * 1e-3) / 1e12 for k, v in ms.items() for name in v}
    out["flops_formula"] = "fwd 2*kept*D*H, bwd 4*kept*D*H (grad_x and grad_w); capacity padding rows not counted"
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; on a machine without CUDA runs the kernels in the Triton interpreter")
    ap.add_argument("--tokens", type=int, default=None, help="T (default 16384, smoke 64)")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of: " + ", ".join(SHAPES))
    ap.add_argument("--skip-layer", action="store_true", help="kernels only")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            ap.error("no CUDA device: run with --smoke (Triton interpreter, tiny shapes)")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    if importlib.util.find_spec("moebal") is None:
        ap.error("moebal is not installed: pip install -e . in the checkout first")

    device = torch.device("cuda" if cuda else "cpu")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    T = args.tokens or (64 if args.smoke else 16384)
    bench = Bench(device, rep_ms=20 if args.smoke else 100)
    t_start = time.perf_counter()
    results: dict = {"mode": "smoke" if args.smoke else "full", "tokens": T, "dtype": "bfloat16"}
    out_path = Path(args.out)

    def save():
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        out_path.write_text(json.dumps(results, indent=2, default=str))

    if not cuda:
        results["note"] = (
            "Triton interpreter: its fp32->bf16 casts truncate instead of rounding to nearest even, "
            "so bf16 results may sit one ulp from the twin; timings are the interpreter's, not a GPU's"
        )
    _section(results, "env", environment, device)
    _section(results, "copy", copy_bandwidth, device, bench, args.smoke)
    copy_GBps = results["copy"].get("GBps") or float("nan")
    if cuda and not args.smoke:
        _section(results, "int64_offsets", int64_offsets_check, device)
    save()
    results["shapes"] = {}
    for name, (D, F_, E, K) in shapes.items():
        entry = results["shapes"][name] = {"D": D, "F": F_, "E": E, "K": K, "T": T}
        _section(entry, "kernels", kernels_for_shape, T, D, E, K, device, bench, copy_GBps)
        save()
        _section(entry, "fused_gather_gemm", fused_gemm_for_shape, T, D, F_, E, K, device, bench)
        save()
        if not args.skip_layer:
            _section(entry, "layer", layer_for_shape, T, D, F_, E, K, device, bench)
            save()
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name} done", flush=True)
    save()
    print(f"wrote {out_path} in {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
