"""Triton kernels against their torch twins and float64 references.

On a machine without CUDA the kernels run under the Triton interpreter: TRITON_INTERPRET=1
is set only while ``moebal.triton_ops`` (and so ``moebal.kernels``) is imported, because
``triton.jit`` decides at decoration time, and then only inside these tests (autouse
fixture), so the rest of the suite sees the environment it was started with. With CUDA the
same tests run the compiled kernels on the GPU.

Tolerances: fp32 results must match the float64 reference to ~1e-6 relative; for bf16
storage (fp32 math) the kernel's error may be at most twice the bf16 torch twin's error
plus one bf16 ulp of the result's scale. Pure copies must match the twin bit for bit.
Results that are one rounded fp32 value (``grad_ys = w * dy``) match the twin bit for bit
on CUDA; the interpreter (triton 3.9) truncates fp32 -> bf16 casts instead of rounding to
nearest even, so there they may differ by one bf16 ulp.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moebal.dispatch import _combine_bwd, _TorchCombine, _TorchDispatch, combine_rows, dispatch, dispatch_rows
from moebal.plan import build_plan

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PLAN_FIELDS = ("counts_E", "kept_E", "starts_E", "group_ends_E", "row_of_pair_TK", "pair_of_row_R", "token_of_row_R")


def _interpreted(module) -> bool:
    return type(module).__name__ == "InterpretedFunction"


def _import_triton_ops():
    """Import ``moebal.triton_ops``; without CUDA, with its kernels built for the interpreter.

    ``triton.jit`` picks interpreter or compiler when a function is decorated, and
    triton.language's own helpers (``tl.sum``, ``tl.cumsum``) are jit functions decorated
    when triton is first imported, so triton must not have been imported before without
    the interpreter (its C extension cannot be imported twice in one process).
    """
    if CUDA:
        return importlib.import_module("moebal.triton_ops")
    lang = sys.modules.get("triton.language")
    ops_ = sys.modules.get("moebal.triton_ops")
    if (lang is not None and not _interpreted(lang.sum)) or (
        ops_ is not None and not _interpreted(ops_._kernels.plan._pair_rows_kernel)
    ):
        raise RuntimeError(
            "triton was imported without TRITON_INTERPRET=1 before tests/test_kernels.py, so its "
            "kernels cannot run on the CPU in this process; run pytest with TRITON_INTERPRET=1 set"
        )
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("moebal.triton_ops")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


ops = _import_triton_ops()
K = ops._kernels  # the moebal.kernels package


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if not CUDA:  # lets backend="triton" resolve for CPU tensors inside these tests only
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _indices(T, K_, E, seed=0, experts=None, one_expert=None):
    """Distinct experts per token, seeded. ``experts`` restricts the choice (empty experts);
    ``one_expert`` sends every pair to that expert (needs K = 1)."""
    g = _gen(seed)
    if one_expert is not None:
        assert K_ == 1
        return torch.full((T, 1), one_expert, dtype=torch.int64).to(DEVICE)
    pool = torch.arange(E) if experts is None else torch.tensor(experts)
    scores = torch.rand(T, len(pool), generator=g)
    return pool[torch.argsort(scores, dim=-1)[:, :K_]].to(DEVICE)


def _python_plan(idx, E, C):
    """Plain-loop plan: per expert its pairs in token order, the first C kept."""
    T, K_ = idx.shape
    flat = idx.reshape(-1).tolist()
    groups = [[p for p in range(T * K_) if flat[p] == e] for e in range(E)]
    row_of_pair = [-1] * (T * K_)
    if C is None:
        pair_of_row = [p for g in groups for p in g]
    else:
        pair_of_row = [-1] * (E * C)
        for e, g in enumerate(groups):
            for i, p in enumerate(g[:C]):
                pair_of_row[e * C + i] = p
    for r, p in enumerate(pair_of_row):
        if p >= 0:
            row_of_pair[p] = r
    return [len(g) for g in groups], row_of_pair, pair_of_row


def _check_invariants(plan, idx):
    T, K_ = idx.shape
    E, C = plan.num_experts, plan.capacity
    counts, kept, starts = plan.counts_E.cpu(), plan.kept_E.cpu(), plan.starts_E.cpu()
    ends = plan.group_ends_E.cpu().long()
    rop, por, tor = plan.row_of_pair_TK.cpu().reshape(-1), plan.pair_of_row_R.cpu(), plan.token_of_row_R.cpu()
    assert int(counts.sum()) == T * K_
    if C is None:
        assert torch.equal(ends, torch.cumsum(counts, 0))  # offsets = cumsum of counts
        assert torch.equal(starts, ends - counts)
        assert torch.equal(kept, counts)
        assert por.shape[0] == T * K_
    else:
        assert torch.equal(starts, torch.arange(E) * C)
        assert torch.equal(ends, starts + C)
        assert torch.equal(kept, counts.clamp(max=C))
        assert por.shape[0] == E * C
    # the permutation and its inverse compose to the identity on kept pairs / used rows
    kept_pairs = torch.nonzero(rop >= 0).squeeze(-1)
    used_rows = torch.nonzero(por >= 0).squeeze(-1)
    assert kept_pairs.numel() == used_rows.numel() == int(kept.sum())
    assert torch.equal(por[rop[kept_pairs]], kept_pairs)
    assert torch.equal(rop[por[used_rows]], used_rows)
    assert torch.equal(tor, torch.where(por >= 0, por // max(K_, 1), -1))
    # each row holds a pair of its group's expert, token order within the group
    flat = idx.cpu().reshape(-1)
    for e in range(E):
        group = por[int(starts[e]): int(starts[e]) + int(kept[e])]
        assert bool((flat[group] == e).all())
        assert bool((group[1:] > group[:-1]).all())


def _assert_plans_equal(got, want):
    for f in PLAN_FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype, f
        assert torch.equal(a, b), f
    assert (got.num_tokens, got.top_k, got.num_experts, got.capacity) == (
        want.num_tokens, want.top_k, want.num_experts, want.capacity)


def _max_err(got, ref64):
    return float((got.double() - ref64).abs().max()) if ref64.numel() else 0.0


def _assert_kernel_close(kernel, twin, ref64, what=""):
    """fp32/fp64: close to the float64 reference; bf16/fp16: at most 2x the twin's error + 1 ulp."""
    assert kernel.dtype == twin.dtype, what
    assert kernel.shape == twin.shape == ref64.shape, what
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    err_k, err_t = _max_err(kernel, ref64), _max_err(twin, ref64)
    if kernel.dtype in (torch.float32, torch.float64):
        tol = (1e-6 if kernel.dtype == torch.float32 else 1e-12) * (1.0 + scale)
        assert err_k <= tol, f"{what}: kernel err {err_k:.3g} > {tol:.3g}"
        assert err_t <= tol, f"{what}: twin err {err_t:.3g} > {tol:.3g}"
    else:
        atol = torch.finfo(kernel.dtype).eps * max(scale, 1e-3)
        assert err_k <= 2 * err_t + atol, f"{what}: kernel err {err_k:.3g} > 2 * twin err {err_t:.3g} + {atol:.3g}"


def _assert_same_rounding(kernel, twin):
    """Bit-equal on CUDA; under the interpreter, low-precision values within one ulp."""
    if CUDA or kernel.dtype in (torch.float32, torch.float64):
        assert torch.equal(kernel, twin)
        return
    ulp = torch.finfo(kernel.dtype).eps * twin.float().abs()
    assert bool(((kernel.float() - twin.float()).abs() <= ulp).all())


def _ref_dispatch(x64, plan):
    rows = plan.token_of_row_R
    return x64[rows.clamp(min=0)] * (rows >= 0).unsqueeze(-1)


def _ref_combine(ys64, plan, w64):
    rows = plan.row_of_pair_TK
    g = ys64[rows.clamp(min=0)] * (rows >= 0).unsqueeze(-1)
    return (w64.unsqueeze(-1) * g).sum(dim=1)


# --------------------------------------------------------------------------- plan

# (T, K, E, capacity, index pattern) and why each shape is here
PLAN_CASES = [
    pytest.param(1, 1, 1, None, {}, id="one-token-one-expert"),  # smallest plan: T = K = E = 1
    pytest.param(1, 4, 4, None, {}, id="one-token-K=E"),  # T = 1 with every expert chosen
    pytest.param(37, 3, 7, None, {}, id="primeE-oddN"),  # prime E, T*K = 111 not a multiple of any block
    pytest.param(37, 7, 7, None, {}, id="K=E"),  # every token picks every expert
    pytest.param(50, 2, 13, None, {"experts": [2, 11]}, id="empty-experts"),  # 11 of 13 experts get nothing
    pytest.param(70, 1, 5, None, {"one_expert": 3}, id="all-to-one"),  # all tokens on one expert
    pytest.param(200, 8, 67, None, {}, id="E>scan-chunk"),  # E = 67 > the 32-expert scan chunk, 25 blocks
    pytest.param(37, 3, 7, 4, {}, id="capacity-drops"),  # overflowing experts drop their latest tokens
    pytest.param(70, 1, 5, 9, {"one_expert": 3}, id="capacity-all-to-one"),  # 61 drops, 4 all-padding experts
    pytest.param(37, 3, 7, 1, {}, id="capacity-1"),  # smallest capacity
    pytest.param(20, 2, 4, 50, {}, id="capacity-no-drops"),  # capacity above every count: padding only
]


@pytest.mark.parametrize("T,K_,E,C,pattern", PLAN_CASES)
def test_plan_kernel_equals_build_plan(T, K_, E, C, pattern):
    idx = _indices(T, K_, E, seed=T + E, **pattern)
    got = ops.triton_build_plan(idx, E, C)
    _assert_plans_equal(got, build_plan(idx, E, C))
    _check_invariants(got, idx)
    counts, row_of_pair, pair_of_row = _python_plan(idx.cpu(), E, C)
    assert got.counts_E.tolist() == counts
    assert got.row_of_pair_TK.reshape(-1).tolist() == row_of_pair
    assert got.pair_of_row_R.tolist() == pair_of_row


@pytest.mark.parametrize("block_n,block_e", [(16, 4), (8, 1), (128, 2)])
@pytest.mark.parametrize("C", [None, 5])
def test_plan_kernel_any_tile(block_n, block_e, C):
    # tiles smaller than E and than N (multi-chunk scans, many blocks, ragged last block)
    idx = _indices(45, 3, 11, seed=3)
    meta = K.routing_metadata(idx, 11, C, block_n=block_n, block_e=block_e)
    want = build_plan(idx, 11, C)
    for f in PLAN_FIELDS:
        assert torch.equal(getattr(meta, f), getattr(want, f)), f


def test_plan_kernel_int32_indices_and_determinism():
    idx = _indices(96, 6, 16, seed=7)
    first = ops.triton_build_plan(idx.int(), 16, 20)
    _assert_plans_equal(first, build_plan(idx, 16, 20))
    for _ in range(3):  # bit-for-bit the same on every run
        again = ops.triton_build_plan(idx.int(), 16, 20)
        for f in PLAN_FIELDS:
            assert torch.equal(getattr(again, f), getattr(first, f))


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(0, 40),
    E=st.integers(1, 12),
    data=st.data(),
)
def test_plan_kernel_fuzzed(T, E, data):
    K_ = data.draw(st.integers(1, E), label="K")
    C = data.draw(st.one_of(st.none(), st.integers(1, 12)), label="capacity")
    idx = _indices(T, K_, E, seed=data.draw(st.integers(0, 2**16), label="seed"))
    got = ops.triton_build_plan(idx, E, C)
    _assert_plans_equal(got, build_plan(idx, E, C))
    _check_invariants(got, idx)


def test_build_plan_backend_switch():
    idx = _indices(30, 2, 6, seed=1)
    w = torch.rand(30, 2, generator=_gen(1)).to(DEVICE)
    _assert_plans_equal(build_plan(idx, 6, 7, backend="triton"), build_plan(idx, 6, 7))
    # weight-based drops are built by the torch ops whatever the backend
    _assert_plans_equal(
        build_plan(idx, 6, 7, w, "weight", backend="triton"), build_plan(idx, 6, 7, w, "weight")
    )
    with pytest.raises(ValueError, match="capacity"):
        ops.triton_build_plan(idx, 6, 0)
    with pytest.raises(TypeError, match="int64 or int32"):
        ops.triton_build_plan(idx.float(), 6)


# --------------------------------------------------------------------------- dispatch / combine

# (T, K, E, capacity, D, index pattern) and why each shape is here
ROW_CASES = [
    pytest.param(1, 2, 4, None, 64, {}, id="one-token"),  # T = 1: a single program, mostly masked
    pytest.param(37, 3, 7, None, 97, {}, id="primeE-oddD"),  # prime E, odd D (ragged column chunk), T*K = 111
    pytest.param(16, 5, 5, None, 33, {}, id="K=E"),  # K = E, D = 33 just past a power of two
    pytest.param(40, 2, 8, None, 128, {"experts": [1, 5]}, id="empty-experts"),  # 6 experts own no rows
    pytest.param(48, 1, 6, None, 64, {"one_expert": 4}, id="all-to-one"),  # one group holds every row
    pytest.param(37, 3, 7, 4, 97, {}, id="capacity-drops"),  # dropped pairs add 0, padding rows are zero
    pytest.param(48, 1, 6, 5, 40, {"one_expert": 4}, id="capacity-all-to-one"),  # 43 drops, 25 padding rows
    pytest.param(256, 8, 16, None, 128, {}, id="largest"),  # the largest interpreted shape: 2048 rows
]
DTYPES = [torch.float32, torch.bfloat16]


def _case(T, K_, E, C, D, pattern, dtype, seed=0):
    g = _gen(seed)
    idx = _indices(T, K_, E, seed=seed + 1, **pattern)
    plan = build_plan(idx, E, C)
    x = torch.randn(T, D, generator=g).to(DEVICE, dtype)
    w = (torch.rand(T, K_, generator=g) + 0.1).to(DEVICE, dtype)
    return idx, plan, x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K_,E,C,D,pattern", ROW_CASES)
def test_dispatch_kernel(T, K_, E, C, D, pattern, dtype):
    _, plan, x, _ = _case(T, K_, E, C, D, pattern, dtype)
    R = plan.num_rows
    g_xs = torch.randn(R, D, generator=_gen(5)).to(DEVICE, dtype)
    outs = {}
    for name, fn in (("triton", ops.triton_dispatch), ("torch", lambda a, p: _TorchDispatch.apply(a, p))):
        xl = x.clone().requires_grad_(True)
        xs = fn(xl, plan)
        xs.backward(g_xs)
        outs[name] = (xs.detach(), xl.grad)
    x64 = x.double().requires_grad_(True)
    xs64 = _ref_dispatch(x64, plan)
    xs64.backward(g_xs.double())
    # the forward is a copy: bit-for-bit equal to the twin, padding rows exactly zero
    assert torch.equal(outs["triton"][0], outs["torch"][0])
    assert torch.equal(outs["triton"][0].double(), xs64.detach())
    # backward sums K rows per token
    _assert_kernel_close(outs["triton"][1], outs["torch"][1], x64.grad, "grad_x")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K_,E,C,D,pattern", ROW_CASES)
def test_combine_kernel(T, K_, E, C, D, pattern, dtype):
    _, plan, _, w = _case(T, K_, E, C, D, pattern, dtype)
    R = plan.num_rows
    ys = torch.randn(R, D, generator=_gen(6)).to(DEVICE, dtype)
    dy = torch.randn(T, D, generator=_gen(7)).to(DEVICE, dtype)
    outs = {}
    for name, fn in (
        ("triton", lambda a, b: ops.triton_combine(a, plan, b)),
        ("torch", lambda a, b: _TorchCombine.apply(a, b, plan)),
    ):
        ysl, wl = ys.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(ysl, wl)
        y.backward(dy)
        outs[name] = (y.detach(), ysl.grad, wl.grad)
    ys64, w64 = ys.double().requires_grad_(True), w.double().requires_grad_(True)
    y64 = _ref_combine(ys64, plan, w64)
    y64.backward(dy.double())
    for i, (what, ref) in enumerate((("y", y64.detach()), ("grad_ys", ys64.grad), ("grad_w", w64.grad))):
        _assert_kernel_close(outs["triton"][i], outs["torch"][i], ref, what)
    # grad_ys = w * dy rounds one fp32 product: identical to the twin; padding rows zero
    _assert_same_rounding(outs["triton"][1], outs["torch"][1])
    pad = plan.pair_of_row_R < 0
    assert not bool(outs["triton"][1][pad].any())


@pytest.mark.parametrize("C", [None, 4], ids=["dropless", "capacity"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_moe_chain_public_api(C, dtype):
    # x -> dispatch -> per-expert scaling -> combine, through the public API, both backends
    T, K_, E, D = 37, 3, 7, 97  # prime E, odd D, T*K = 111
    idx, _, x, w = _case(T, K_, E, C, D, {}, dtype, seed=11)
    scale_E = torch.linspace(0.5, 2.0, E, dtype=torch.float64)
    dy = torch.randn(T, D, generator=_gen(8)).to(DEVICE, dtype)

    def run(backend, x_, w_):
        xs, plan = dispatch(x_, idx, E, C, backend=backend)
        expert_R = torch.searchsorted(plan.group_ends_E.long(), torch.arange(plan.num_rows, device=DEVICE), right=True)
        ys = xs * scale_E.to(DEVICE, x_.dtype)[expert_R.clamp(max=E - 1)].unsqueeze(-1)
        return combine_rows(ys, plan, w_, backend), plan

    outs = {}
    for backend in ("triton", "torch"):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y, plan = run(backend, xl, wl)
        y.backward(dy)
        outs[backend] = (y.detach(), xl.grad, wl.grad)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    y64, _ = run("torch", x64, w64)
    y64.backward(dy.double())
    for i, (what, ref) in enumerate((("y", y64.detach()), ("grad_x", x64.grad), ("grad_w", w64.grad))):
        _assert_kernel_close(outs["triton"][i], outs["torch"][i], ref, what)


def test_mixed_dtypes_bf16_rows_fp32_weights():
    # router weights usually stay fp32 while activations are bf16
    _, plan, _, _ = _case(37, 3, 7, 4, 97, {}, torch.bfloat16)
    w = torch.rand(37, 3, generator=_gen(2)).to(DEVICE)
    ys = torch.randn(plan.num_rows, 97, generator=_gen(3)).to(DEVICE, torch.bfloat16)
    dy = torch.randn(37, 97, generator=_gen(4)).to(DEVICE, torch.bfloat16)
    outs = {}
    for name, fn in (("triton", ops.triton_combine), ("torch", lambda a, p, b: _TorchCombine.apply(a, b, p))):
        ysl, wl = ys.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(ysl, plan, wl)
        y.backward(dy)
        outs[name] = (y.detach(), ysl.grad, wl.grad)
    assert outs["triton"][0].dtype == torch.bfloat16 and outs["triton"][2].dtype == torch.float32
    ys64, w64 = ys.double().requires_grad_(True), w.double().requires_grad_(True)
    y64 = _ref_combine(ys64, plan, w64)
    y64.backward(dy.double())
    for i, (what, ref) in enumerate((("y", y64.detach()), ("grad_ys", ys64.grad))):
        _assert_kernel_close(outs["triton"][i], outs["torch"][i], ref, what)
    # grad_w is fp32 from bf16 inputs: both accumulate the same products in fp32
    assert torch.allclose(outs["triton"][2].double(), w64.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(outs["triton"][2], outs["torch"][2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_rows,block_d", [(4, 16), (8, 32), (16, 128)])
def test_launchers_any_tile(block_rows, block_d):
    # tiles narrower than D (several column chunks, ragged last one) and ragged row blocks
    _, plan, x, w = _case(37, 3, 7, 4, 97, {}, torch.float32, seed=4)
    tiles = dict(block_rows=block_rows, block_d=block_d)
    xs = K.dispatch_rows(x, plan.token_of_row_R, **tiles)
    assert torch.equal(xs, _TorchDispatch.apply(x, plan))
    y = K.combine_rows(xs, plan.row_of_pair_TK, w, **tiles)
    torch.testing.assert_close(y, _TorchCombine.apply(xs, w, plan), rtol=1e-6, atol=1e-6)
    gx = K.dispatch_rows_backward(xs, plan.row_of_pair_TK, **tiles)
    torch.testing.assert_close(gx.double(), _ref_gather_sum(xs, plan), rtol=1e-6, atol=1e-6)
    dy = torch.randn(37, 97, generator=_gen(9)).to(DEVICE)
    gys, gw = K.combine_rows_backward(dy, xs, plan.row_of_pair_TK, w, plan.pair_of_row_R, **tiles)
    gys_t, gw_t = _combine_bwd(dy, xs, w, plan)
    assert torch.equal(gys, gys_t)
    torch.testing.assert_close(gw, gw_t, rtol=1e-5, atol=1e-5)


def _ref_gather_sum(xs, plan):
    rows = plan.row_of_pair_TK
    return (xs.double()[rows.clamp(min=0)] * (rows >= 0).unsqueeze(-1)).sum(dim=1)


def test_launcher_argument_checks():
    _, plan, x, w = _case(8, 2, 4, None, 16, {}, torch.float32)
    with pytest.raises(ValueError, match=r"\[T, D\]"):
        K.dispatch_rows(x[0], plan.token_of_row_R)
    with pytest.raises(ValueError, match="weights must have shape"):
        K.combine_rows(x, plan.row_of_pair_TK, w[:, :1])
    with pytest.raises(ValueError, match="power of two"):
        K.dispatch_rows(x, plan.token_of_row_R, block_d=48)
    with pytest.raises(ValueError, match="grad_y"):
        K.combine_rows_backward(x[:3], x, plan.row_of_pair_TK, w)


def test_empty_inputs():
    # T = 0 (an empty batch) launches nothing and returns empty results
    idx = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    plan = ops.triton_build_plan(idx, 4)
    _assert_plans_equal(plan, build_plan(idx, 4))
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    xs = dispatch_rows(x, plan, "triton")
    y = combine_rows(xs, plan, torch.zeros(0, 2, device=DEVICE), "triton")
    y.sum().backward()
    assert xs.shape == (0, 8) and y.shape == (0, 8) and x.grad.shape == (0, 8)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_int64_offsets():
    # row * D passes 2**31 elements: only correct with int64 address arithmetic
    T, K_, E, D = 65536, 4, 8, 8192
    idx = _indices(T, K_, E, seed=0)
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
    plan = ops.triton_build_plan(idx, E)
    xs = ops.triton_dispatch(x, plan)
    last = plan.row_of_pair_TK[-1]
    assert torch.equal(xs[last], x[-1].expand(K_, D))
    w = torch.full((T, K_), 0.25, device=DEVICE, dtype=torch.bfloat16)
    y = ops.triton_combine(xs, plan, w)
    assert torch.equal(y[-2:], x[-2:])  # 4 * 0.25 * x is exact
    del xs, y


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("C", [None, 2560])
def test_gpu_real_size_matches_twin(C):
    T, K_, E, D = 16384, 8, 128, 2048
    idx = _indices(T, K_, E, seed=1)
    plan = ops.triton_build_plan(idx, E, C)
    _assert_plans_equal(plan, build_plan(idx, E, C))
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
    w = torch.rand(T, K_, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(ops.triton_dispatch(x, plan), _TorchDispatch.apply(x, plan))
    ys = torch.randn(plan.num_rows, D, device=DEVICE, dtype=torch.bfloat16)
    y64 = _ref_combine(ys.double(), plan, w.double())
    _assert_kernel_close(ops.triton_combine(ys, plan, w), _TorchCombine.apply(ys, w, plan), y64, "y")
