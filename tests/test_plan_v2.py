"""The dispatch plan with pairs that have no expert (index -1) and the "priority" drop policy.

References are independent of the plan code: a plain Python loop hands out each expert's
rows (``_loop_plan``), and the round trip is checked against a float64 loop
``y[t] = sum over kept k with an expert of w[t, k] * f_e(x[t])`` with autograd for the
gradients. Triton parts run under the interpreter on the CPU (see tests/test_kernels.py,
whose import sets it up) and must equal the torch plan bit for bit.
"""
from __future__ import annotations

import math

import pytest
import torch

from moebal.dispatch import combine, combine_rows, dispatch, dispatch_rows
from moebal.experts import GroupedExperts
from moebal.plan import DROP_POLICIES, build_plan
from test_kernels import CUDA, DEVICE, PLAN_FIELDS, ops

POLICIES = ["position", "weight", "priority"]


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if not CUDA:  # the interpreter reads TRITON_INTERPRET again at launch time
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _routing(T, K, E, seed, null_frac, levels=None):
    """``(indices [T, K], weights [T, K] fp32)``: distinct experts per token, a fraction set to -1.

    ``levels`` draws the weights from a few values (ties, NaN) instead of U(0.1, 1.1).
    """
    g = _gen(seed)
    idx = torch.argsort(torch.rand(T, E, generator=g), dim=-1)[:, :K]
    idx[torch.rand(T, K, generator=g) < null_frac] = -1
    if levels is None:
        w = torch.rand(T, K, generator=g) + 0.1
    else:
        w = torch.tensor(levels)[torch.randint(len(levels), (T, K), generator=g)]
    return idx, w


def _score(v: float) -> tuple:
    """Sort key of a score, highest first, NaN last."""
    return (1, 0.0) if math.isnan(v) else (0, -v)


def _loop_plan(idx, w, E, C, policy):
    """Plain-loop plan: dict of the expected fields as lists."""
    T, K = idx.shape
    N = T * K
    idx_l, w_l = idx.tolist(), w.tolist()

    def key(pair):
        t, k = pair
        if C is None or policy == "position":
            return (t, k)
        if policy == "weight":
            return (*_score(w_l[t][k]), t, k)
        row = w_l[t]
        prio = math.nan if any(math.isnan(v) for v in row) else max(row)
        return (k, *_score(prio), t)

    groups = [sorted(((t, k) for t in range(T) for k in range(K) if idx_l[t][k] == e), key=key) for e in range(E)]
    counts = [len(g) for g in groups]
    if C is None:
        kept = counts
        pair_of_row = [t * K + k for g in groups for t, k in g]
        pair_of_row += [-1] * (N - len(pair_of_row))  # padding after the valid pairs
        ends = [sum(counts[: e + 1]) for e in range(E)]
        ends[-1] = N  # the last group owns the padding tail
        starts = [sum(counts[:e]) for e in range(E)]
    else:
        kept = [min(c, C) for c in counts]
        pair_of_row = [-1] * (E * C)
        for e, g in enumerate(groups):
            for i, (t, k) in enumerate(g[:C]):
                pair_of_row[e * C + i] = t * K + k
        starts = [e * C for e in range(E)]
        ends = [(e + 1) * C for e in range(E)]
    row_of_pair = [-1] * N
    for r, p in enumerate(pair_of_row):
        if p >= 0:
            row_of_pair[p] = r
    return dict(
        counts_E=counts, kept_E=kept, starts_E=starts, group_ends_E=ends, row_of_pair_TK=row_of_pair,
        pair_of_row_R=pair_of_row, token_of_row_R=[p // K if p >= 0 else -1 for p in pair_of_row],
    )


def _assert_matches_loop(plan, idx, w, E, C, policy):
    want = _loop_plan(idx, w, E, C, policy)
    for f, v in want.items():
        got = getattr(plan, f)
        assert got.dtype == (torch.int32 if f == "group_ends_E" else torch.int64), f
        assert got.reshape(-1).tolist() == v, f


# (T, K, E, capacity, fraction of -1 pairs) and why each case is here
PLAN_CASES = [
    pytest.param(1, 1, 1, None, 0.0, id="one-pair"),  # smallest plan, no -1
    pytest.param(1, 2, 4, None, 1.0, id="one-token-all-null"),  # every row is padding
    pytest.param(37, 3, 7, None, 0.3, id="primeE-dropless"),  # prime E, N = 111, padding tail in the last group
    pytest.param(37, 3, 7, 4, 0.3, id="primeE-capacity"),  # overflow: -1 pairs must not take seats
    pytest.param(50, 2, 5, 3, 0.5, id="half-null-drops"),  # half the pairs -1, still heavy drops
    pytest.param(20, 4, 4, 50, 0.3, id="capacity-padding-only"),  # capacity above every count, K = E
    pytest.param(16, 2, 4, None, 1.0, id="all-null-dropless"),  # no valid pair: counts 0, all rows padding
    pytest.param(16, 2, 4, 2, 1.0, id="all-null-capacity"),  # no valid pair with a capacity
    pytest.param(40, 2, 6, 2, 0.0, id="no-null"),  # the plain plan is unchanged
    pytest.param(0, 2, 4, None, 0.3, id="T=0-dropless"),  # no tokens
    pytest.param(0, 2, 4, 3, 0.3, id="T=0-capacity"),  # no tokens, E*C padding rows
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T,K,E,C,null_frac", PLAN_CASES)
def test_plan_matches_loop(T, K, E, C, null_frac, policy):
    idx, w = _routing(T, K, E, seed=T * 7 + E, null_frac=null_frac)
    plan = build_plan(idx, E, C, w, policy)
    _assert_matches_loop(plan, idx, w, E, C, policy)
    valid = int((idx >= 0).sum())
    assert int(plan.counts_E.sum()) == valid  # -1 pairs are not counted
    assert plan.num_rows == (T * K if C is None else E * C)  # static shapes
    if plan.num_rows:
        assert int(plan.group_ends_E[-1]) == plan.num_rows  # the groups tile every row
    # the flag is exact on the CPU: gathers skip row -1 only when some pair can lack a row
    assert plan.has_drops == (C is not None or valid < T * K)


@pytest.mark.parametrize("policy", ["weight", "priority"])
@pytest.mark.parametrize("C", [1, 3])
def test_ranked_policies_ties_and_nan(policy, C):
    # few weight levels: ties and NaN everywhere; the loop's order decides every seat
    levels = [0.25, 0.5, 1.0, float("nan"), float("-inf")]
    idx, w = _routing(60, 3, 5, seed=C, null_frac=0.2, levels=levels)
    _assert_matches_loop(build_plan(idx, 5, C, w, policy), idx, w, 5, C, policy)


def test_priority_keeps_top1_before_top2():
    # V-MoE's property: at an expert, no slot-j pick is kept while a slot-i pick (i < j) is dropped
    g = _gen(3)
    T, K, E, C = 200, 3, 6, 12
    logits = torch.randn(T, E, generator=g) + torch.linspace(2, 0, E)  # skewed: the first experts overflow
    idx = torch.argsort(logits, dim=-1, descending=True)[:, :K]
    idx[torch.rand(T, K, generator=g) < 0.1] = -1
    w = torch.rand(T, K, generator=g)
    plan = build_plan(idx, E, C, w, "priority")
    kept = plan.row_of_pair_TK >= 0
    assert int((plan.counts_E - plan.kept_E).sum()) > 0  # the test needs drops
    for e in range(E):
        at_e = idx == e
        for i in range(K):
            for j in range(i + 1, K):
                if bool((at_e[:, i] & ~kept[:, i]).any()):
                    assert not bool((at_e[:, j] & kept[:, j]).any()), (e, i, j)
    # within one slot, a kept token never has a lower priority than a dropped one
    prio = w.max(dim=1).values
    for e in range(E):
        for k in range(K):
            at = idx[:, k] == e
            kp, dp = prio[at & kept[:, k]], prio[at & ~kept[:, k]]
            if kp.numel() and dp.numel():
                assert float(kp.min()) >= float(dp.max())
    _assert_matches_loop(plan, idx, w, E, C, "priority")


def test_ranked_policies_need_weights():
    idx = torch.zeros(4, 1, dtype=torch.long)
    assert "priority" in DROP_POLICIES
    for policy in ("weight", "priority"):
        with pytest.raises(ValueError, match=policy):
            build_plan(idx, 2, 2, None, policy)
        build_plan(idx, 2, None, None, policy)  # dropless: no seats to rank, no weights needed


# --------------------------------------------------------------------------- round trip


def _experts(E, D, seed=0):
    W = torch.randn(E, D, D, generator=_gen(seed), dtype=torch.float64) / D**0.5
    return W, (lambda e, v: torch.tanh(v @ W[e]))


def _through_plan(x, idx, w, E, C, policy, W):
    """dispatch -> f_e on each expert's kept rows -> combine; padding rows of ys are NaN (and,
    through ``xs * nan``, so are the padding rows of the gradient that reaches dispatch)."""
    xs, plan = dispatch(x, idx, E, capacity=C, weights=w, drop_policy=policy, backend="torch")
    owner = [-1] * plan.num_rows
    for e in range(E):
        for r in range(int(plan.starts_E[e]), int(plan.starts_E[e] + plan.kept_E[e])):
            owner[r] = e
    rows = [torch.tanh(xs[r] @ W[e]) if e >= 0 else xs[r] * math.nan for r, e in enumerate(owner)]
    ys = torch.stack(rows) if rows else xs * 1.0
    return combine(ys, plan, w, backend="torch"), plan


def _loop_y(x, idx, w, fn, plan):
    """float64 loop over the pairs the plan kept (which ones: checked by test_plan_matches_loop)."""
    T, K = idx.shape
    y = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            if idx[t, k] >= 0 and plan.row_of_pair_TK[t, k] >= 0:
                y[t] = y[t] + w[t, k] * fn(int(idx[t, k]), x[t])
    return y


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("T,K,E,C,null_frac", [
    pytest.param(13, 2, 5, None, 0.3, id="dropless"),  # padding tail in the last group
    pytest.param(24, 2, 6, 3, 0.3, id="capacity"),  # drops and -1 pairs together
    pytest.param(9, 3, 3, 2, 0.5, id="K=E-capacity"),  # every expert picked, half -1
    pytest.param(8, 2, 4, None, 1.0, id="all-null"),  # y is exactly zero everywhere
])
def test_roundtrip_matches_float64_loop(T, K, E, C, null_frac, policy):
    D = 5
    idx, w32 = _routing(T, K, E, seed=T + K, null_frac=null_frac)
    idx[0] = -1  # token 0 has no expert at all
    x = torch.randn(T, D, dtype=torch.float64, generator=_gen(1), requires_grad=True)
    w = w32.double().requires_grad_(True)
    W, fn = _experts(E, D)
    y, plan = _through_plan(x, idx, w, E, C, policy, W)
    x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y_ref = _loop_y(x_ref, idx, w_ref, fn, plan)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert bool((y[0] == 0).all())  # exactly zero, though the padding rows of ys are NaN
    gy = torch.randn(T, D, dtype=torch.float64, generator=_gen(2))
    (y * gy).sum().backward()
    if y_ref.requires_grad:
        (y_ref * gy).sum().backward()
    else:  # no kept pair at all: nothing depends on x or w
        x_ref.grad, w_ref.grad = torch.zeros_like(x_ref), torch.zeros_like(w_ref)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)
    no_row = plan.row_of_pair_TK < 0
    assert bool((w.grad[no_row] == 0).all())  # exactly 0 for -1 and dropped pairs
    assert bool((x.grad[0] == 0).all())


def test_roundtrip_float32_matches_float64():
    T, K, E, D, C = 30, 2, 4, 16, 6
    idx, w = _routing(T, K, E, seed=5, null_frac=0.3)
    x = torch.randn(T, D, generator=_gen(6), requires_grad=True)
    W, fn = _experts(E, D)
    y, plan = _through_plan(x, idx, w, E, C, "priority", W.float())
    y_ref = _loop_y(x.detach().double(), idx, w.double(), fn, plan)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)


def test_t0_roundtrip():
    for C in (None, 3):
        for policy in POLICIES:
            x = torch.zeros(0, 4, requires_grad=True)
            w = torch.zeros(0, 2, requires_grad=True)
            xs, plan = dispatch(x, torch.zeros(0, 2, dtype=torch.long), 3, capacity=C, weights=w,
                                drop_policy=policy, backend="torch")
            assert xs.shape == (0 if C is None else 9, 4)
            y = combine(xs * 2, plan, w, backend="torch")
            assert y.shape == (0, 4)
            y.sum().backward()
            assert x.grad.shape == (0, 4) and w.grad.shape == (0, 2)


def test_dispatch_checks_index_range():
    x = torch.randn(3, 2)
    dispatch(x, torch.tensor([[0, -1], [-1, -1], [2, 1]]), 3, backend="torch")  # -1 is allowed
    with pytest.raises(ValueError, match=r"indices .* got -2"):
        dispatch(x, torch.tensor([[0, -2], [1, 1], [2, 1]]), 3, backend="torch")
    with pytest.raises(ValueError, match=r"indices .* got 3"):
        dispatch(x, torch.tensor([[0, 3], [1, 1], [2, 1]]), 3, backend="torch")


@pytest.mark.parametrize("path", ["loop", "grouped"])
@pytest.mark.parametrize("C", [None, 3])
def test_grouped_experts_with_padding_tail(path, C):
    # the dropless tail rows belong to the last group: the GEMMs and biases run on zero rows
    # whose outputs are never read and whose gradients are zero (fp32 D = 8 fits grouped_mm)
    T, K, E, D = 16, 2, 4, 8
    idx, w = _routing(T, K, E, seed=9, null_frac=0.4)
    torch.manual_seed(0)
    experts = GroupedExperts(D, 6, E, bias=True, path=path)
    x = torch.randn(T, D, generator=_gen(4), requires_grad=True)
    w = w.requires_grad_(True)
    plan = build_plan(idx, E, C)
    y = combine_rows(experts(dispatch_rows(x, plan, "torch"), plan), plan, w, "torch")
    ref = GroupedExperts(D, 6, E, bias=True, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in experts.state_dict().items()})
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)

    def fn(e, v):
        h = v @ ref.w_in_EDH[e] + ref.b_in_EH[e]
        gate, up = h.chunk(2)
        return (torch.nn.functional.silu(gate) * up) @ ref.w_out_EFD[e] + ref.b_out_ED[e]

    y_ref = _loop_y(x64, idx, w64, fn, plan)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    gy = torch.randn(T, D, generator=_gen(5))
    (y * gy).sum().backward()
    (y_ref * gy.double()).sum().backward()
    for got, want in [(x.grad, x64.grad), (w.grad, w64.grad)] + [
        (p.grad, q.grad) for p, q in zip(experts.parameters(), ref.parameters())
    ]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- Triton


TRITON_CASES = PLAN_CASES + [
    pytest.param(200, 8, 67, None, 0.3, id="E>scan-chunk"),  # several blocks and expert chunks
    pytest.param(200, 8, 67, 5, 0.3, id="E>scan-chunk-capacity"),
]


@pytest.mark.parametrize("T,K,E,C,null_frac", TRITON_CASES)
def test_triton_plan_equals_torch(T, K, E, C, null_frac):
    idx, w = _routing(T, K, E, seed=T + 3 * E, null_frac=null_frac)
    idx = idx.to(DEVICE)
    want = build_plan(idx, E, C)
    for got in (ops.triton_build_plan(idx, E, C), ops.triton_build_plan(idx.int(), E, C)):
        for f in PLAN_FIELDS:
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype and torch.equal(a, b), f
        assert got.has_drops == want.has_drops
    _assert_matches_loop(want, idx.cpu(), w, E, C, "position")
    # the backend switch: position drops and dropless plans on the device, ranked drops in torch
    for policy in POLICIES:
        switched = build_plan(idx, E, C, w.to(DEVICE), policy, backend="triton")
        direct = build_plan(idx, E, C, w.to(DEVICE), policy)
        for f in PLAN_FIELDS:
            assert torch.equal(getattr(switched, f), getattr(direct, f)), (policy, f)


@pytest.mark.parametrize("C", [None, 3])
def test_triton_roundtrip_with_null_pairs(C):
    T, K, E, D = 24, 2, 4, 16
    idx, w = _routing(T, K, E, seed=11, null_frac=0.4)
    idx[0] = -1
    idx, w = idx.to(DEVICE), w.double().to(DEVICE)
    x = torch.randn(T, D, generator=_gen(12), dtype=torch.float64).to(DEVICE)
    plan = build_plan(idx, E, C, backend="triton")
    results = []
    for backend in ("triton", "torch"):
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        xs = dispatch_rows(xb, plan, backend)
        y = combine_rows(torch.tanh(xs), plan, wb, backend)
        y.backward(torch.ones_like(y))
        results.append((xs, y, xb.grad, wb.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    xs, y, gx, gw = results[0]
    assert bool((xs[plan.token_of_row_R < 0] == 0).all())  # padding rows are zero
    assert bool((y[0] == 0).all()) and bool((gx[0] == 0).all())
    assert bool((gw[plan.row_of_pair_TK < 0] == 0).all())


@pytest.mark.parametrize("C", [None, 3])
def test_fused_gather_with_null_pairs(C):
    # the gather-fused first GEMM computes only kept_E rows per group: the tail stays zero
    T, K, E, D = 24, 2, 4, 16
    idx, w = _routing(T, K, E, seed=13, null_frac=0.4)
    idx, w = idx.to(DEVICE), w.to(DEVICE)
    torch.manual_seed(0)
    experts = GroupedExperts(D, 16, E, path="grouped").to(DEVICE)
    x = torch.randn(T, D, generator=_gen(14)).to(DEVICE)
    plan = build_plan(idx, E, C, backend="triton")
    fused = combine_rows(experts.forward_tokens(x, plan), plan, w, "torch")
    plain = combine_rows(experts(dispatch_rows(x, plan, "torch"), plan), plan, w, "torch")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
