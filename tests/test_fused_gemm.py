"""The gather-fused grouped GEMM (``triton_gather_grouped_mm``) against its torch twin and float64 loops.

The twin is ``grouped_matmul(dispatch_rows(x, plan, "torch"), w, plan)``; the reference
is a float64 loop over experts that reads the routing indices directly (not the plan's
groups), with gradients written out by hand.

Interpreter: the kernels come from ``tests/test_kernels.py``'s import (TRITON_INTERPRET=1 set
only while ``moebal.triton_ops`` is imported, when there is no CUDA). The interpreter's
``tl.dot`` is wrong for bf16 tiles, so there the launchers cast bf16 tiles to fp32 before
the dot (bf16 products are exact in fp32, so the math is what the GPU's bf16 tensor-core
dot with fp32 accumulation computes); bf16 storage is tested that way on the CPU and with
the real bf16 dot on CUDA. The interpreter also truncates fp32 -> bf16 casts instead of
rounding to nearest even (see tests/test_kernels.py), which the bf16 tolerance allows.

Tolerances: every fp32 output (kernel and twin) must lie within twice the worst-case
rounding bound of a length-n fp32 dot product, ``|err| <= 2 n u (|a| @ |b|)`` elementwise
with u = 2**-24, which holds for any summation order (TF32 stays off, as in torch by
default); half-precision storage follows the flash-attention rule: the kernel's error at
most twice the same-dtype twin's error plus one ulp of the result's scale.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moebal.dispatch import dispatch_rows
from moebal.experts import grouped_matmul
from moebal.plan import build_plan
from test_kernels import CUDA, DEVICE, _gen, _indices, _max_err, ops

K = ops._kernels  # the moebal.kernels package
U32 = 2.0**-24


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if not CUDA:  # the interpreter reads TRITON_INTERPRET again at launch time
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# (T, K, E, capacity, D, H, index pattern) and why each shape is here
CASES = [
    pytest.param(1, 2, 4, None, 64, 32, {}, id="one-token"),  # T = 1: one row tile per used expert, mostly masked
    pytest.param(37, 3, 7, None, 97, 40, {}, id="primeE-oddD"),  # prime E, odd D (ragged K step), T*K = 111 not a tile multiple
    pytest.param(16, 5, 5, None, 33, 24, {}, id="K=E"),  # every token on every expert, D just past a power of two
    pytest.param(40, 2, 8, None, 48, 32, {"experts": [1, 5]}, id="empty-experts"),  # 6 groups without rows: zero tiles, zero grad_w
    pytest.param(48, 1, 6, None, 40, 24, {"one_expert": 4}, id="all-to-one"),  # one group spans every row tile
    pytest.param(37, 3, 7, 4, 97, 40, {}, id="capacity-drops"),  # every group full, dropped pairs get no row and no gradient
    pytest.param(48, 1, 6, 5, 40, 24, {"one_expert": 4}, id="capacity-all-to-one"),  # 43 drops, 5 all-padding groups
    pytest.param(20, 2, 4, 50, 32, 16, {}, id="capacity-padding-only"),  # 160 of 200 rows padding: whole tiles skip the K loop
    pytest.param(128, 4, 16, None, 64, 96, {}, id="largest"),  # 512 rows, several row and column tiles per group
]
DTYPES = [torch.float32, torch.bfloat16]


def _case(T, K_, E, C, D, H, pattern, dtype, seed=0):
    g = _gen(seed)
    idx = _indices(T, K_, E, seed=seed + 1, **pattern)
    plan = build_plan(idx, E, C)
    x = torch.randn(T, D, generator=g).to(DEVICE, dtype)
    w = (torch.randn(E, D, H, generator=g) / D**0.5).to(DEVICE, dtype)
    dh = torch.randn(plan.num_rows, H, generator=g).to(DEVICE, dtype)
    return idx, plan, x, w, dh


def _ref64(idx, plan, x, w, dh):
    """float64 loop over experts from the indices: ``(h, grad_x, grad_w)`` of ``h[row(t,k)] = x[t] @ w[idx[t,k]]``."""
    x64, w64, dh64 = x.double(), w.double(), dh.double()
    E = w.shape[0]
    h = torch.zeros(plan.num_rows, w.shape[2], dtype=torch.float64, device=x.device)
    gx, gw = torch.zeros_like(x64), torch.zeros_like(w64)
    rows_TK = plan.row_of_pair_TK
    for e in range(E):
        t, k = torch.nonzero((idx == e) & (rows_TK >= 0), as_tuple=True)
        rows = rows_TK[t, k]
        h[rows] = x64[t] @ w64[e]
        gw[e] = x64[t].T @ dh64[rows]
        gx.index_add_(0, t, dh64[rows] @ w64[e].T)
    return h, gx, gw


def _twin(x, w, plan, dh):
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h = grouped_matmul(dispatch_rows(xl, plan, "torch"), wl, plan)
    h.backward(dh)
    return h.detach(), xl.grad, wl.grad


def _fused(x, w, plan, dh):
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h = ops.triton_gather_grouped_mm(xl, wl, plan)
    h.backward(dh)
    return h.detach(), xl.grad, wl.grad


def _assert_gemm_close(got, twin, ref, bound, n, what):
    """fp32: within ``2 n u`` of the absolute-product bound, elementwise; bf16: 2x the twin's error + 1 ulp."""
    assert got.dtype == twin.dtype and got.shape == twin.shape == ref.shape, what
    if got.dtype == torch.float32:
        tol = 2 * max(n, 1) * U32 * bound + 1e-30
        for name, t in (("kernel", got), ("twin", twin)):
            excess = ((t.double() - ref).abs() - tol).max() if t.numel() else torch.tensor(-1.0)
            assert float(excess) <= 0, f"{what}: {name} error exceeds the fp32 dot bound by {float(excess):.3g}"
    else:
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        err_k, err_t = _max_err(got, ref), _max_err(twin, ref)
        atol = torch.finfo(got.dtype).eps * max(scale, 1e-3)
        assert err_k <= 2 * err_t + atol, f"{what}: kernel err {err_k:.3g} > 2 * twin err {err_t:.3g} + {atol:.3g}"


def _check_all(idx, plan, x, w, dh, got):
    twin = _twin(x, w, plan, dh)
    ref = _ref64(idx, plan, x, w, dh)
    bound = _ref64(idx, plan, x.abs(), w.abs(), dh.abs())  # |a| @ |b| for every output
    D, H = x.shape[1], w.shape[2]
    max_group = int(plan.kept_E.max()) if plan.kept_E.numel() else 0
    for i, (what, n) in enumerate((("h", D), ("grad_x", plan.top_k * H), ("grad_w", max_group))):
        _assert_gemm_close(got[i], twin[i], ref[i], bound[i], n, what)


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K_,E,C,D,H,pattern", CASES)
def test_gather_grouped_mm(T, K_, E, C, D, H, pattern, dtype):
    idx, plan, x, w, dh = _case(T, K_, E, C, D, H, pattern, dtype)
    got = _fused(x, w, plan, dh)
    _check_all(idx, plan, x, w, dh, got)
    h, _, gw = got
    # capacity padding rows are exactly zero; experts without kept rows get exactly zero grad_w
    assert not bool(h[plan.pair_of_row_R < 0].any())
    assert not bool(gw[plan.kept_E == 0].any())


@pytest.mark.parametrize("C", [None, 16], ids=["dropless", "capacity"])
def test_fp16_storage(C):
    # fp16 takes the same path as bf16 (half tiles, fp32 accumulation, one rounding at the store)
    idx, plan, x, w, dh = _case(37, 3, 7, C, 97, 40, {}, torch.float16, seed=7)
    _check_all(idx, plan, x, w, dh, _fused(x, w, plan, dh))


@settings(max_examples=15, deadline=None)
@given(T=st.integers(0, 40), E=st.integers(1, 9), D=st.integers(1, 70), H=st.integers(1, 50), data=st.data())
def test_gather_grouped_mm_fuzzed(T, E, D, H, data):
    # any sizes, including D or H of 1 and capacities from 1 up to above every count
    K_ = data.draw(st.integers(1, E), label="K")
    C = data.draw(st.one_of(st.none(), st.integers(1, 12)), label="capacity")
    idx, plan, x, w, dh = _case(T, K_, E, C, D, H, {}, torch.float32, seed=data.draw(st.integers(0, 2**16), label="seed"))
    _check_all(idx, plan, x, w, dh, _fused(x, w, plan, dh))


@pytest.mark.parametrize("block_m,block_n,block_k,block_e", [(16, 16, 16, 8), (32, 64, 32, 2), (64, 16, 64, 4)])
@pytest.mark.parametrize("C", [None, 16], ids=["dropless", "capacity"])
def test_launchers_any_tile(block_m, block_n, block_k, block_e, C):
    # tiles smaller and larger than the groups, ragged in every dimension; the group search
    # in chunks of 2 or 4 of the 7 experts (several chunks, a ragged last one) or in one
    idx, plan, x, w, dh = _case(37, 3, 7, C, 97, 40, {}, torch.float32, seed=3)
    if C is not None:  # C = 16 for 111 pairs on 7 experts: some groups drop pairs, others have padding
        assert int(plan.dropped_pairs()) > 0 and bool((plan.kept_E < C).any())
    tiles = dict(block_m=block_m, block_n=block_n, block_k=block_k)
    maps = (plan.group_ends_E, plan.token_of_row_R, plan.kept_E)
    ref_h, ref_gx, ref_gw = _ref64(idx, plan, x, w, dh)
    h = K.grouped_gemm(x, w, *maps, block_e=block_e, **tiles)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=1e-5)
    gw = K.grouped_gemm_wgrad(x, dh, *maps, **tiles)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
    # the no-gather mode on a transposed weight view is the grad_xs step of the backward
    gxs = K.grouped_gemm(dh, w.transpose(1, 2), plan.group_ends_E, None, plan.kept_E, block_e=block_e, **tiles)
    gx = K.dispatch_rows_backward(gxs, plan.row_of_pair_TK)
    torch.testing.assert_close(gx.double(), ref_gx, rtol=1e-5, atol=1e-5)
    # without rows_used every row of a group is computed, and padding rows (src = -1) still
    # read nothing, even where the memory just before x holds data
    x_after_row = torch.cat([torch.ones_like(x[:1]), x])[1:]
    maps_all = (plan.group_ends_E, plan.token_of_row_R, None)
    assert torch.equal(K.grouped_gemm(x_after_row, w, *maps_all, **tiles), h)
    assert torch.equal(K.grouped_gemm_wgrad(x_after_row, dh, *maps_all, **tiles), gw)


def test_plain_grouped_gemm_equals_grouped_matmul():
    # no gather, no rows_used: a plain grouped GEMM over already-grouped rows, any strides
    idx, plan, x, w, dh = _case(37, 3, 7, None, 97, 40, {}, torch.float32, seed=4)
    xs = dispatch_rows(x, plan, "torch")
    xs_strided = torch.cat([xs, xs], dim=1)[:, :97]  # row stride 194
    w_strided = w.transpose(1, 2).contiguous().transpose(1, 2)  # [E, D, H] with unit stride along D
    got = K.grouped_gemm(xs_strided, w_strided, plan.group_ends_E)
    torch.testing.assert_close(got, grouped_matmul(xs, w, plan), rtol=1e-5, atol=1e-5)
    gw = K.grouped_gemm_wgrad(xs_strided, dh, plan.group_ends_E)
    torch.testing.assert_close(gw.double(), _ref64(idx, plan, x, w, dh)[2], rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_grad_of_one_argument():
    # x as a column slice and w stored [E, H, D]; the Function takes the strides as they are
    idx, plan, x, w, dh = _case(37, 3, 7, 4, 97, 40, {}, torch.float32, seed=5)
    x_wide = torch.cat([x, torch.randn(37, 3, generator=_gen(1)).to(DEVICE)], dim=1)[:, :97]
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)
    ref_h, ref_gx, ref_gw = _ref64(idx, plan, x, w, dh)
    xl = x_wide.detach().requires_grad_(True)
    h = ops.triton_gather_grouped_mm(xl, w_t, plan)  # w needs no gradient here
    h.backward(dh)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xl.grad.double(), ref_gx, rtol=1e-5, atol=1e-5)
    wl = w_t.detach().requires_grad_(True)
    ops.triton_gather_grouped_mm(x_wide, wl, plan).backward(dh)  # only w needs one
    torch.testing.assert_close(wl.grad.double(), ref_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype):
    # no atomics: every output and gradient is the same bit for bit on every run
    _, plan, x, w, dh = _case(64, 4, 16, 20, 64, 96, {}, dtype, seed=6)
    first = _fused(x, w, plan, dh)
    for _ in range(2):
        again = _fused(x, w, plan, dh)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_empty_inputs():
    # T = 0 launches nothing; D = 0 gives zeros and a zero grad_w
    idx = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    plan = build_plan(idx, 4)
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 8, 5, device=DEVICE, requires_grad=True)
    h = ops.triton_gather_grouped_mm(x, w, plan)
    h.sum().backward()
    assert h.shape == (0, 5) and x.grad.shape == (0, 8)
    assert not bool(w.grad.any())
    idx, plan, _, _, _ = _case(5, 2, 4, None, 8, 8, {}, torch.float32)
    x0 = torch.zeros(5, 0, device=DEVICE)
    h0 = ops.triton_gather_grouped_mm(x0, torch.zeros(4, 0, 3, device=DEVICE), plan)
    assert h0.shape == (10, 3) and not bool(h0.any())


def test_argument_checks():
    _, plan, x, w, _ = _case(8, 2, 4, None, 16, 8, {}, torch.float32)
    f = ops.triton_gather_grouped_mm
    with pytest.raises(TypeError, match=r"w_EDH dtype torch.bfloat16 does not match x_TD dtype torch.float32"):
        f(x, w.bfloat16(), plan)
    with pytest.raises(TypeError, match=r"x_TD must be float32, bfloat16 or float16, got torch.float64"):
        f(x.double(), w.double(), plan)
    with pytest.raises(TypeError, match=r"x_TD must be a torch.Tensor, got list"):
        f([[1.0]], w, plan)
    with pytest.raises(TypeError, match=r"plan must be a DispatchPlan, got dict"):
        f(x, w, {})
    with pytest.raises(ValueError, match=r"x_TD must have shape \[T, D\] with T = plan.num_tokens = 8, got \(7, 16\)"):
        f(x[:7], w, plan)
    with pytest.raises(ValueError, match=r"x_TD must have shape \[T, D\].*got \(8, 16, 1\)"):
        f(x.unsqueeze(-1), w, plan)
    with pytest.raises(ValueError, match=r"w_EDH must have shape \[E, D, H\] with E = plan.num_experts = 4 and D = 16 .*got \(4, 15, 8\)"):
        f(x, w[:, :15], plan)
    with pytest.raises(ValueError, match=r"w_EDH must have shape .*got \(3, 16, 8\)"):
        f(x, w[:3], plan)
    with pytest.raises(ValueError, match=r"w_EDH is on meta but x_TD is on cpu"):
        f(x.cpu(), torch.empty(4, 16, 8, device="meta"), plan)
    # the launchers check their own arguments
    with pytest.raises(ValueError, match=r"a has K = 16 columns but w is \(4, 15, 8\)"):
        K.grouped_gemm(x, w[:, :15].contiguous(), plan.group_ends_E, plan.token_of_row_R)
    with pytest.raises(ValueError, match=r"group_ends must be an int32 \[E\] tensor, got torch.int64"):
        K.grouped_gemm(x, w, plan.group_ends_E.long(), plan.token_of_row_R)
    with pytest.raises(ValueError, match=r"block_m must be a power of two >= 16, got 8"):
        K.grouped_gemm(x, w, plan.group_ends_E, plan.token_of_row_R, block_m=8)
    with pytest.raises(ValueError, match=r"g has 3 rows but there are 16 rows"):
        K.grouped_gemm_wgrad(x, x[:3], plan.group_ends_E, plan.token_of_row_R)
    with pytest.raises(TypeError, match=r"g dtype torch.bfloat16 does not match a dtype torch.float32"):
        K.grouped_gemm_wgrad(x, x.bfloat16(), plan.group_ends_E, plan.token_of_row_R)


# --------------------------------------------------------------------------- the layer's opt-in path


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_moe_fused_gather_path_matches_the_dispatch_path(capacity_factor, activation, bias):
    # MoE with experts.path = "fused_gather" (never writes xs) against the same layer on the
    # torch dispatch path: output, grad of x and of every parameter (the op itself is held
    # to float64 loops above; this checks the layer wiring: biases, padding rows, drops)
    import copy

    import moebal

    torch.manual_seed(0)
    ref = moebal.MoE(24, 16, 5, 2, router="aux_loss", capacity_factor=capacity_factor, activation=activation,
                     ffn_bias=bias, backend="torch").to(DEVICE)
    fused = copy.deepcopy(ref)
    fused.backend, fused.experts.path = "triton", "fused_gather"
    x = torch.randn(2, 9, 24, device=DEVICE)
    outs = []
    for m in (ref, fused):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum().backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in m.named_parameters()}, m.last_stats))
    (y0, gx0, gp0, st0), (y1, gx1, gp1, st1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for name in gp0:
        torch.testing.assert_close(gp1[name], gp0[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(st1.kept, st0.kept) and st0.dropped_fraction == st1.dropped_fraction


def test_fused_gather_path_needs_the_triton_backend():
    import moebal
    from moebal.experts import expert_ffn

    moe = moebal.MoE(8, 4, 3, 1, backend="torch")
    moe.experts.path = "fused_gather"
    with pytest.raises(ValueError, match=r"experts.path='fused_gather'.*backend='torch'"):
        moe(torch.randn(4, 8))
    plan = build_plan(torch.zeros(4, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"forward_tokens"):
        expert_ffn(torch.randn(4, 8), moe.experts.w_in_EDH, moe.experts.w_out_EFD, plan, path="fused_gather")


# --------------------------------------------------------------------------- compiled code without a GPU

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import moebal.triton_ops
    gg = sys.modules["moebal.kernels.gather_gemm"]

    def compile_(fn, args, warps, stages):
        # specialise like the JIT: ints equal to 1 become constants, pointers and
        # multiples of 16 carry tt.divisibility = 16
        sig, consts, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            kind, v = args[name]
            if kind == "ptr":
                sig[name], attrs[(i,)] = "*" + v, [["tt.divisibility", 16]]
            elif kind == "int" and v != 1:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name], consts[name] = "constexpr", v
        c = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        ttgir = c.asm["ttgir"]
        return {"shared": c.metadata.shared, "async_copies": ttgir.count("async_copy_global_to_local"),
                "wgmma": "warp_group_dot" in ttgir}

    E, D, H = 128, 2048, 1536
    out = {}
    common = dict(src_ptr=("ptr", "i64"), group_ends_ptr=("ptr", "i32"), rows_used_ptr=("ptr", "i64"),
                  GATHER=("c", True), HAS_USED=("c", True), DOT_FP32=("c", False), INPUT_PRECISION=("c", "ieee"))
    for name, transposed in (("fwd_gather", False), ("bwd_input_no_gather", True)):
        K_, N_ = (H, D) if transposed else (D, H)
        args = dict(common, a_ptr=("ptr", "bf16"), w_ptr=("ptr", "bf16"), out_ptr=("ptr", "bf16"),
                    E=("int", E), N=("int", N_), K=("int", K_), num_tiles_m=("int", 131072 // 128 + E),
                    stride_am=("int", K_), stride_ak=("int", 1),
                    stride_we=("int", D * H), stride_wk=("int", 1 if transposed else H),
                    stride_wn=("int", D if transposed else 1), stride_om=("int", N_), stride_on=("int", 1),
                    BLOCK_M=("c", 128), BLOCK_N=("c", 128), BLOCK_K=("c", 64), BLOCK_E=("c", 128), GROUP_M=("c", 8))
        args["GATHER"] = ("c", not transposed)
        out[name] = compile_(gg._grouped_gemm_kernel, args, 8, 3)
    args = dict(common, a_ptr=("ptr", "bf16"), g_ptr=("ptr", "bf16"), out_ptr=("ptr", "bf16"),
                N=("int", H), K=("int", D), stride_am=("int", D), stride_ak=("int", 1), stride_gm=("int", H),
                stride_gn=("int", 1), stride_oe=("int", D * H), stride_ok=("int", H), stride_on=("int", 1),
                BLOCK_M=("c", 64), BLOCK_N=("c", 128), BLOCK_K=("c", 128))
    out["wgrad_gather"] = compile_(gg._grouped_gemm_wgrad_kernel, args, 8, 3)
    print(json.dumps(out))
    """
)


def test_kernels_compile_for_sm90():
    # the interpreter runs any Python; this compiles the bf16 kernels for an H100 the way the
    # JIT would at real sizes (no GPU needed) and checks they pipeline their loads
    pytest.importorskip("triton.backends.nvidia.compiler")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("ASTSource" in proc.stderr and "TypeError" in proc.stderr):
        pytest.skip(f"this triton's ahead-of-time compile API differs: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    for name, info in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert info["wgmma"], name  # bf16 tiles on the tensor cores
        assert info["async_copies"] > 0, name  # the K loop is software-pipelined
        assert info["shared"] <= 227 * 1024, name  # fits an H100's shared memory


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("C", [None, 2560])
def test_gpu_real_size_matches_twin(C):
    T, K_, E, D, H = 16384, 8, 128, 2048, 1536
    idx = _indices(T, K_, E, seed=1)
    plan = ops.triton_build_plan(idx, E, C)
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(E, D, H, device=DEVICE, dtype=torch.bfloat16) / D**0.5
    dh = torch.randn(plan.num_rows, H, device=DEVICE, dtype=torch.bfloat16)
    got, twin = _fused(x, w, plan, dh), _twin(x, w, plan, dh)
    for a, b in zip(got, twin):
        scale = float(b.float().abs().max())
        assert float((a.float() - b.float()).abs().max()) <= 4 * torch.finfo(torch.bfloat16).eps * scale


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_int64_offsets():
    # R * H > 2**31 output elements: the last rows are only right with int64 addresses
    T, K_, E, D = 32768, 4, 8, 256
    idx = _indices(T, K_, E, seed=2)
    plan = ops.triton_build_plan(idx, E)
    H = 2**31 // plan.num_rows + 128
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(E, D, H, device=DEVICE, dtype=torch.bfloat16) / D**0.5
    h = ops.triton_gather_grouped_mm(x, w, plan)
    want = x[plan.token_of_row_R[-4:]].float() @ w[E - 1].float()  # the last expert's last rows
    torch.testing.assert_close(h[-4:].float(), want, rtol=2e-2, atol=2e-2)
