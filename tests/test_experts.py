"""Expert FFN paths (the CPU per-expert loop and grouped_mm) against a float64 per-expert loop.

Values and gradients of xs, expert weights and biases; through the whole layer also of x and
the routing weights. Plus the buffer pool's safety: a buffer is never reused while held.
"""
import pytest
import torch
import torch.nn.functional as F

import moebal
from moebal import Router
from moebal.dispatch import combine_rows, dispatch_rows
from moebal.workspace import clear_buffers, empty_buffer
from moebal.experts import GroupedExperts, expert_ffn
from moebal.plan import build_plan

from _routing_cases import random_routing


def _act64(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return gate * torch.sigmoid(gate) * up
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _ref_experts(xs, w_in, w_out, b_in, b_out, plan, activation):
    """float64 loop: expert e maps its kept rows; every other row is zero."""
    ys = torch.zeros(xs.shape[0], w_out.shape[-1], dtype=torch.float64)
    for e in range(w_in.shape[0]):
        s, n = int(plan.starts_E[e]), int(plan.kept_E[e])
        h = xs[s:s + n].double() @ w_in[e].double()
        if b_in is not None:
            h = h + b_in[e].double()
        y = _act64(h, activation) @ w_out[e].double()
        if b_out is not None:
            y = y + b_out[e].double()
        ys = ys.index_copy(0, torch.arange(s, s + n), y)
    return ys


def _params(E, D, F_, activation, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    H = 2 * F_ if activation == "swiglu" else F_
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) / s[-2] ** 0.5 if len(s) > 2
                     else torch.randn(*s, generator=g, dtype=torch.float64) * 0.1)
    ps = [mk(E, D, H), mk(E, F_, D)] + ([mk(E, H), mk(E, D)] if bias else [None, None])
    return [p.to(dtype).requires_grad_(True) if p is not None else None for p in ps]


# shapes and why they are here: (T, D, F, E, K, capacity, skew)
CASES = [
    (1, 4, 3, 4, 2, None, None),  # one token: most experts empty
    (20, 8, 5, 7, 1, None, None),  # top-1, prime E: some experts empty
    (13, 9, 6, 5, 5, None, None),  # K = E, odd sizes
    (16, 8, 4, 4, 1, None, 10.0),  # all tokens on one expert (skew), three empty experts
    (24, 8, 6, 6, 2, 3, None),  # capacity: drops and padded blocks
    (9, 5, 4, 4, 2, 6, None),  # capacity larger than any load: padding only
    (12, 6, 4, 3, 1, 2, 10.0),  # capacity with one overloaded expert and two empty blocks
]


# grouped_mm needs 16-byte row strides, so the grouped path runs the cases whose D and F
# are multiples of 4 (fp32); the loop path runs them all
PATH_CASES = [("loop", c) for c in CASES] + [("grouped", c) for c in CASES if c[1] % 4 == 0 and c[2] % 4 == 0]


@pytest.mark.parametrize("path,case", PATH_CASES)
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True), ("gelu_tanh", False), ("swiglu", True)])
def test_expert_paths_match_float64_loop(path, case, activation, bias):
    T, D, F_, E, K, cap, skew = case
    skew_E = None if skew is None else torch.tensor([skew] + [0.0] * (E - 1))
    idx, _ = random_routing(T, E, K, seed=T * 7 + E, skew=skew_E)
    plan = build_plan(idx, E, cap)
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(plan.num_rows, D, generator=gen, dtype=torch.float64)
    if cap is not None:  # padded rows of a real dispatch are zero
        xs[plan.token_of_row_R < 0] = 0
    dtype = torch.float64 if path == "loop" else torch.float32  # grouped_mm has no float64 kernel
    xs = xs.to(dtype).requires_grad_(True)
    w_in, w_out, b_in, b_out = _params(E, D, F_, activation, bias, dtype, seed=2)
    ys = expert_ffn(xs, w_in, w_out, plan, activation, b_in, b_out, path=path)
    leaves = [t for t in (xs, w_in, w_out, b_in, b_out) if t is not None]
    refs = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_args = refs[:3] + ([refs[3], refs[4]] if bias else [None, None])
    ref = _ref_experts(*ref_args, plan, activation)
    kept = torch.zeros(plan.num_rows, dtype=torch.bool)
    for e in range(E):
        kept[int(plan.starts_E[e]): int(plan.starts_E[e] + plan.kept_E[e])] = True
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ys[kept].double(), ref[kept], **tol)
    if path == "loop":  # padding rows come out exactly zero
        assert (ys[~kept] == 0).all()
    g = torch.randn(ys.shape, generator=gen, dtype=torch.float64) * kept.unsqueeze(-1)  # combine never reads padding
    grads = torch.autograd.grad(ys, leaves, g.to(dtype))
    ref_grads = torch.autograd.grad(ref, refs, g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("cap", [None, 3])
def test_empty_experts_get_zero_weight_grads(cap):
    E, D, F_ = 6, 8, 4
    idx = torch.tensor([[0], [0], [3], [3], [3]])  # experts 1, 2, 4, 5 get nothing
    plan = build_plan(idx, E, cap)
    xs = torch.randn(plan.num_rows, D, dtype=torch.float64, requires_grad=True)
    w_in, w_out, b_in, b_out = _params(E, D, F_, "swiglu", True, torch.float64, seed=3)
    ys = expert_ffn(xs, w_in, w_out, plan, "swiglu", b_in, b_out, path="loop")
    ys.sum().backward()
    for e in (1, 2, 4, 5):
        for p in (w_in, w_out, b_in, b_out):
            assert (p.grad[e] == 0).all()
    assert (w_in.grad[0] != 0).any() and (w_out.grad[3] != 0).any()


def _layer_reference(moe, x, routing):
    """float64 loop over (token, slot): y[t] = sum_k w[t,k] * FFN_e(x[t])."""
    ex = moe.experts
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            e = int(routing.indices[t, j])
            h = x[t] @ ex.w_in_EDH[e]
            y[t] = y[t] + routing.weights[t, j] * (_act64(h, ex.activation) @ ex.w_out_EFD[e])
    return y


@pytest.mark.parametrize("T,E,K", [(17, 5, 2), (1, 3, 1), (24, 8, 8)])
def test_layer_grads_of_x_routing_weights_and_experts_match_float64_loop(T, E, K):
    torch.manual_seed(T + E)
    moe = moebal.MoE(12, 10, E, K, router=Router(12, E, K, balancer=None)).double()
    assert moe.experts.path == "auto"  # the CPU loop path
    x = torch.randn(T, 12, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    ref_moe = moebal.MoE(12, 10, E, K, router=Router(12, E, K, balancer=None)).double()
    ref_moe.load_state_dict(moe.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    ref = _layer_reference(ref_moe, x2, ref_moe.router(x2))
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (name, p), p2 in zip(moe.named_parameters(), ref_moe.parameters()):
        torch.testing.assert_close(p.grad, p2.grad, msg=name)  # router gate grad: via the weights


@pytest.mark.parametrize("cap", [None, 2.0])
def test_bf16_loop_error_is_within_twice_the_grouped_error(cap):
    """flash-attention's rule: error vs float64 at most ~2x the same-dtype torch twin's, plus atol."""
    torch.manual_seed(5)
    E, K, D, F_ = 8, 2, 64, 48
    moe = moebal.MoE(D, F_, E, K, router=Router(D, E, K, balancer=None), capacity_factor=cap).double()
    x = torch.randn(96, D, dtype=torch.float64)
    g = torch.randn(96, D, dtype=torch.float64)

    def run(m, dtype, path):
        m = __import__("copy").deepcopy(m).to(dtype)
        m.experts.path = path
        xi = x.clone().to(dtype).requires_grad_(True)
        y = m(xi)
        y.backward(g.to(dtype))
        return [y.double(), xi.grad.double(), m.experts.w_in_EDH.grad.double(), m.experts.w_out_EFD.grad.double(),
                m.router.gate.weight.grad.double()]

    ref = run(moe, torch.float64, "loop")
    fast = run(moe, torch.bfloat16, "loop")
    twin = run(moe, torch.bfloat16, "grouped")
    for name, r, a, b in zip(["y", "dx", "dw_in", "dw_out", "dgate"], ref, fast, twin):
        err_fast = (a - r).abs().max().item()
        err_twin = (b - r).abs().max().item()
        assert err_fast <= 2 * err_twin + 1e-2 * r.abs().max().item(), (name, err_fast, err_twin)


def test_loop_and_grouped_paths_agree_in_fp32_with_capacity_drops():
    torch.manual_seed(6)
    moe = moebal.MoE(32, 24, 6, 2, router=Router(32, 6, 2, balancer=None), capacity_factor=0.75)
    x = torch.randn(40, 32)
    outs = []
    for path in ("loop", "grouped"):
        moe.zero_grad(set_to_none=True)
        moe.experts.path = path
        xi = x.clone().requires_grad_(True)
        y = moe(xi)
        y.square().sum().backward()
        outs.append([y, xi.grad] + [p.grad.clone() for p in moe.parameters()])
    assert float(moe.last_stats.dropped_fraction) > 0
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_frozen_expert_weights_and_no_grad_inputs():
    E, D, F_ = 4, 8, 6
    idx, _ = random_routing(10, E, 2, seed=9)
    plan = build_plan(idx, E)
    xs = torch.randn(plan.num_rows, D, dtype=torch.float64, requires_grad=True)
    w_in, w_out, _, _ = _params(E, D, F_, "swiglu", False, torch.float64, seed=4)
    w_in.requires_grad_(False)
    ys = expert_ffn(xs, w_in, w_out, plan, path="loop")
    ys.sum().backward()
    assert w_in.grad is None and w_out.grad is not None and xs.grad is not None
    xs2 = xs.detach()  # only the weights want gradients (e.g. a frozen embedding upstream)
    expert_ffn(xs2, w_in, w_out.detach().requires_grad_(True), plan, path="loop").sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(expert_ffn(xs, w_in, w_out, plan, path="loop"), ys)


def test_two_forwards_before_backward_keep_their_own_buffers():
    """Gradient accumulation: the second forward must not overwrite what the first saved."""
    torch.manual_seed(10)
    D = 64
    moe = moebal.MoE(D, 128, 8, 2, router=Router(D, 8, 2, balancer=None)).double()
    x1, x2 = torch.randn(256, D, dtype=torch.float64), torch.randn(256, D, dtype=torch.float64)
    y1 = moe(x1)
    y2 = moe(x2)  # same shapes: would reuse the first forward's buffers if they were free
    (y1.sum() + 2 * y2.sum()).backward()
    got = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad(set_to_none=True)
    moe(x1).sum().backward()
    (2 * moe(x2).sum()).backward()
    for a, b in zip(got, [p.grad for p in moe.parameters()]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(moe(x1), y1)  # y1 itself was never overwritten


def test_buffer_pool_reuses_only_free_storage():
    clear_buffers()
    a = empty_buffer((512, 256), torch.float32)  # 512 KiB: pooled
    ptr = a.data_ptr()
    b = empty_buffer((512, 256), torch.float32)
    assert b.data_ptr() != ptr  # a is still held
    held = a[3:5]  # a view keeps the storage alive
    del a
    c = empty_buffer((512, 256), torch.float32)
    assert c.data_ptr() not in (ptr, b.data_ptr())
    del held, c
    d = empty_buffer((256, 512), torch.float32)  # same bytes, other shape
    assert d.data_ptr() == ptr or d.data_ptr() != b.data_ptr()
    assert d.shape == (256, 512) and d._base is None
    small = empty_buffer((4, 4), torch.float32)  # below the pooling threshold: plain
    assert small.shape == (4, 4)
    clear_buffers()


def test_bad_path_is_rejected():
    with pytest.raises(ValueError, match="path"):
        GroupedExperts(8, 8, 4, path="fast")
    plan = build_plan(torch.zeros(2, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="path"):
        expert_ffn(torch.randn(2, 8), torch.randn(4, 8, 16), torch.randn(4, 8, 8), plan, path="fast")


def test_dispatch_combine_roundtrip_uses_pooled_buffers_safely():
    """Outputs of dispatch/combine that a caller keeps stay intact across later calls."""
    idx, w = random_routing(64, 8, 2, seed=11)
    plan = build_plan(idx, 8)
    x = torch.randn(64, 1024)
    xs1 = dispatch_rows(x, plan)
    xs1_copy = xs1.clone()
    xs2 = dispatch_rows(x * 2, plan)
    assert torch.equal(xs1, xs1_copy) and torch.equal(xs2, 2 * xs1_copy)
    y1 = combine_rows(xs1, plan, w.float())
    y1_copy = y1.clone()
    combine_rows(xs2, plan, w.float())
    assert torch.equal(y1, y1_copy)


def test_loop_path_rejects_mixed_dtypes_and_double_backward():
    plan = build_plan(torch.tensor([[0], [1]]), 2)
    xs = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(2, 8, 12, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="dtype"):
        expert_ffn(xs, w_in.float(), w_out, plan, path="loop")
    ys = expert_ffn(xs, w_in, w_out, plan, path="loop")
    (g,) = torch.autograd.grad(ys.square().sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()  # the hand-written backward is once-differentiable


def test_inference_mode_forward_matches_grad_mode():
    torch.manual_seed(12)
    moe = moebal.MoE(16, 24, 4, 2, router=Router(16, 4, 2, balancer=None)).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    y = moe(x)
    with torch.inference_mode():
        y_inf = moe(x)
        y_inf2 = moe(2 * x)  # reuses the buffers the first inference forward released
    torch.testing.assert_close(y_inf, y.detach())
    torch.testing.assert_close(y_inf2, moe(2 * x).detach())


def test_buffer_pool_best_fit_and_eviction(monkeypatch):
    from moebal import workspace

    pool = workspace._BufferPool()
    pool.limit_bytes = 3 << 20
    a = pool.empty((1 << 18,), torch.float32)  # 1 MiB
    ptr = a.data_ptr()
    del a
    b = pool.empty((240_000,), torch.float32)  # a little smaller: takes the free 1 MiB storage
    assert b.data_ptr() == ptr and b.shape == (240_000,)
    c = pool.empty((100_000,), torch.float32)  # much smaller: its own storage
    assert c.data_ptr() != ptr
    del b, c
    big = pool.empty((1 << 19,), torch.float32)  # 2 MiB: evicts free storages to fit the limit
    assert pool._bytes <= pool.limit_bytes and big.numel() == 1 << 19


@pytest.mark.parametrize("cap", [None, 5])
def test_loop_path_with_small_activation_blocks(monkeypatch, cap):
    """Many row blocks (one expert each or a few): same values and gradients as one block."""
    from moebal import experts_loop

    idx, _ = random_routing(40, 6, 2, seed=13)
    plan = build_plan(idx, 6, cap)
    xs = torch.randn(plan.num_rows, 8, dtype=torch.float64, requires_grad=True)
    w_in, w_out, b_in, b_out = _params(6, 8, 5, "swiglu", True, torch.float64, seed=14)
    leaves = [xs, w_in, w_out, b_in, b_out]
    outs = []
    for block_bytes in (1 << 30, 1, 8 * 10 * 12):  # one block, one expert per block, ~a few experts
        monkeypatch.setattr(experts_loop, "_BLOCK_BYTES", block_bytes)
        ys = expert_ffn(xs, w_in, w_out, plan, "swiglu", b_in, b_out, path="loop")
        outs.append([ys] + list(torch.autograd.grad(ys.square().sum(), leaves)))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_zero_tokens_give_empty_output_and_zero_grads(capacity_factor):
    moe = moebal.MoE(8, 8, 4, 2, capacity_factor=capacity_factor)  # capacity: 4 blocks of pure padding
    x = torch.randn(0, 8, requires_grad=True)
    y = moe(x)
    y.sum().backward()
    assert y.shape == (0, 8)
    assert (moe.experts.w_in_EDH.grad == 0).all() and (moe.experts.w_out_EFD.grad == 0).all()


@pytest.mark.parametrize("d_model,d_ff", [(97, 64), (64, 97), (6, 5)])
def test_grouped_path_takes_sizes_grouped_mm_rejects(d_model, d_ff):
    """grouped_mm needs 16-byte row strides; odd sizes run the per-expert fallback."""
    torch.manual_seed(0)
    experts = GroupedExperts(d_model, d_ff, 3, path="grouped")
    x = torch.randn(11, d_model)
    idx = torch.stack([torch.randperm(3)[:2] for _ in range(11)])
    plan = build_plan(idx, 3)
    xs = x[plan.token_of_row_R]
    experts.path = "loop"
    ref = experts(xs, plan)
    experts.path = "grouped"
    torch.testing.assert_close(experts(xs, plan), ref)
