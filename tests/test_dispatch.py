"""dispatch/combine (torch backend) against float64 loops, plus routing-plan invariants."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from moebal.dispatch import dispatch_rows
from moebal.functional import combine, dispatch
from moebal.plan import build_plan

from _routing_cases import random_routing


def _reference(x, ys_fn, idx, w, E, capacity, policy="position"):
    """float64 loop: per expert keep the first `capacity` pairs (by token, or by weight)."""
    T, K = idx.shape
    kept = {}
    for e in range(E):
        pairs = [(t, j) for t in range(T) for j in range(K) if idx[t, j] == e]
        if capacity is not None:
            if policy == "weight":
                pairs = sorted(pairs, key=lambda p: (-float(w.detach()[p]), p[0]))
            pairs = pairs[:capacity]
        for p in pairs:
            kept[p] = True
    y = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            if (t, j) in kept:
                y[t] += w[t, j] * ys_fn(int(idx[t, j]), x[t])
    return y, kept


def _expert_fn(E, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, D, D, generator=g, dtype=torch.float64) / D ** 0.5
    return W, (lambda e, v: torch.tanh(v.double() @ W[e]))


def _moe_through_plan(x, idx, w, E, capacity, W, policy="position"):
    xs, plan = dispatch(x, idx, E, capacity=capacity, weights=w, drop_policy=policy, backend="torch")
    # apply expert e to its group of rows
    owner = torch.full((plan.num_rows,), -1, dtype=torch.long)
    for e in range(E):
        owner[int(plan.starts_E[e]): int(plan.starts_E[e] + plan.kept_E[e])] = e
    ys = torch.stack([torch.tanh(xs[r] @ W[owner[r]]) if owner[r] >= 0 else torch.zeros_like(xs[r]) for r in range(plan.num_rows)]) if plan.num_rows else xs
    return combine(ys, plan, w, backend="torch"), plan


# shapes and why they are here
CASES = [
    (1, 4, 4, 2, None),  # one token
    (13, 97, 5, 2, None),  # odd hidden size, prime E
    (16, 8, 4, 4, None),  # K = E
    (20, 8, 7, 1, None),  # top-1, prime E, some experts empty
    (24, 8, 6, 2, 3),  # capacity drops
    (10, 8, 3, 3, 4),  # K = E with capacity drops
    (9, 5, 4, 2, 1),  # capacity 1: nearly everything dropped
]


@pytest.mark.parametrize("T,D,E,K,cap", CASES)
@pytest.mark.parametrize("policy", ["position", "weight"])
def test_moe_roundtrip_matches_float64_loop(T, D, E, K, cap, policy):
    idx, w = random_routing(T, E, K, seed=T * 31 + E)
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    w = w.clone().requires_grad_(True)
    W, fn = _expert_fn(E, D)
    y, plan = _moe_through_plan(x, idx, w, E, cap, W, policy)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = w.detach().clone().requires_grad_(True)
    y_ref, kept = _reference(x_ref, fn, idx, w_ref, E, cap, policy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    # dropped pairs are exactly those marked -1 in the plan
    for t in range(T):
        for j in range(K):
            assert (plan.row_of_pair_TK[t, j] >= 0).item() == ((t, j) in kept)
    gy = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)


def test_dispatch_gradient_is_sum_over_slots():
    T, D, E, K = 6, 3, 4, 3
    idx, w = random_routing(T, E, K, 0)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    xs, plan = dispatch(x, idx, E, backend="torch")
    g = torch.randn_like(xs)
    (xs * g).sum().backward()
    ref = torch.zeros(T, D, dtype=torch.float64)
    for r in range(plan.num_rows):
        ref[plan.token_of_row_R[r]] += g[r]
    torch.testing.assert_close(x.grad, ref)
    # forward: each row holds its token
    for r in range(plan.num_rows):
        assert torch.equal(xs[r], x[plan.token_of_row_R[r]])


def test_capacity_keeps_earliest_tokens_and_zero_pads():
    idx = torch.zeros(5, 1, dtype=torch.long)  # all tokens on expert 0
    x = torch.arange(5, dtype=torch.float32).unsqueeze(-1) + 1
    xs, plan = dispatch(x, idx, 2, capacity=3, backend="torch")
    assert xs[:, 0].tolist() == [1, 2, 3, 0, 0, 0]
    assert plan.row_of_pair_TK[:, 0].tolist() == [0, 1, 2, -1, -1]
    assert plan.counts_E.tolist() == [5, 0] and plan.kept_E.tolist() == [3, 0]
    assert int(plan.dropped_pairs()) == 2


def test_weight_policy_drops_lowest_weights():
    idx = torch.zeros(4, 1, dtype=torch.long)
    w = torch.tensor([[0.1], [0.9], [0.5], [0.7]])
    _, plan = dispatch(torch.randn(4, 2), idx, 1, capacity=2, weights=w, drop_policy="weight", backend="torch")
    kept = (plan.row_of_pair_TK[:, 0] >= 0).tolist()
    assert kept == [False, True, False, True]


def _check_invariants(plan, idx, E, cap):
    T, K = idx.shape
    ref_counts = torch.bincount(idx.flatten(), minlength=E)
    assert torch.equal(plan.counts_E, ref_counts)
    assert int(plan.counts_E.sum()) == T * K
    if cap is None:
        assert torch.equal(plan.kept_E, plan.counts_E)
        assert torch.equal(plan.group_ends_E.long(), torch.cumsum(plan.counts_E, 0))
        assert torch.equal(plan.starts_E, torch.cumsum(plan.counts_E, 0) - plan.counts_E)
        # permutation and inverse compose to identity
        rows = plan.row_of_pair_TK.flatten()
        assert torch.equal(plan.pair_of_row_R[rows], torch.arange(T * K))
        assert torch.equal(rows[plan.pair_of_row_R], torch.arange(T * K))
    else:
        assert torch.equal(plan.kept_E, torch.clamp(ref_counts, max=cap))
        assert plan.num_rows == E * cap
        rows = plan.row_of_pair_TK.flatten()
        kept = rows >= 0
        assert int(kept.sum()) == int(plan.kept_E.sum())
        assert torch.equal(plan.pair_of_row_R[rows[kept]], torch.arange(T * K)[kept])
        assert int((plan.pair_of_row_R >= 0).sum()) == int(plan.kept_E.sum())
    # every row lies in its expert's group, and groups are token-ordered
    for e in range(E):
        s, n = int(plan.starts_E[e]), int(plan.kept_E[e])
        pairs = plan.pair_of_row_R[s: s + n]
        assert (idx.flatten()[pairs] == e).all()
        assert torch.equal(pairs, torch.sort(pairs).values)
    assert torch.equal(plan.token_of_row_R[plan.pair_of_row_R >= 0], plan.pair_of_row_R[plan.pair_of_row_R >= 0] // K)


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 40),
    E=st.integers(1, 11),
    data=st.data(),
)
def test_plan_invariants_fuzzed(T, E, data):
    K = data.draw(st.integers(1, E))
    cap = data.draw(st.one_of(st.none(), st.integers(1, T * K)))
    mode = data.draw(st.sampled_from(["random", "one_expert"]))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if mode == "one_expert":  # everything on the same K experts
        idx = torch.arange(K).expand(T, K).contiguous()
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    plan = build_plan(idx, E, cap)
    _check_invariants(plan, idx, E, cap)
    # roundtrip values against the loop with identity experts
    D = data.draw(st.integers(1, 9))
    x = torch.randn(T, D, dtype=torch.float64, generator=g)
    w = torch.rand(T, K, dtype=torch.float64, generator=g)
    xs, plan = dispatch(x, idx, E, capacity=cap, backend="torch")
    y = combine(xs, plan, w, backend="torch")
    ref = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            if plan.row_of_pair_TK[t, j] >= 0:
                ref[t] += w[t, j] * x[t]
    torch.testing.assert_close(y, ref)


def test_plan_is_deterministic():
    idx, _ = random_routing(200, 7, 3, 1)
    a, b = build_plan(idx, 7, 50), build_plan(idx, 7, 50)
    for f in ("counts_E", "kept_E", "row_of_pair_TK", "pair_of_row_R", "token_of_row_R", "group_ends_E"):
        assert torch.equal(getattr(a, f), getattr(b, f))


def test_bf16_combine_accumulates_in_fp32():
    T, D, E, K = 64, 32, 4, 4
    idx = torch.arange(K).expand(T, K).contiguous()
    x = torch.randn(T, D).bfloat16()
    w = torch.full((T, K), 0.25)
    xs, plan = dispatch(x, idx, E, backend="torch")
    y = combine(xs, plan, w, backend="torch")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float(), rtol=0, atol=0)  # 4 * 0.25 * x exactly


@pytest.mark.parametrize("K", [1, 2])
def test_bf16_dispatch_backward_rounds_once(K):
    # K <= 2 sums in bf16 directly: the result must equal the fp32 sum rounded once to bf16
    T, D, E = 96, 40, 5
    idx, _ = random_routing(T, E, K, 3)
    plan = build_plan(idx, E)
    g_xs = (torch.randn(plan.num_rows, D) * torch.logspace(-3, 3, D)).bfloat16()
    x = torch.zeros(T, D, dtype=torch.bfloat16, requires_grad=True)
    xs = dispatch_rows(x, plan, "torch")
    xs.backward(g_xs)
    want = g_xs.float()[plan.row_of_pair_TK].sum(1).bfloat16()  # K <= 2: one fp32 addition, exact order-free
    assert torch.equal(x.grad, want)


def test_dispatch_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="indices must lie"):
        dispatch(x, torch.tensor([[0], [1], [5], [2]]), 4)
    with pytest.raises(ValueError, match="indices must lie"):
        dispatch(x, torch.tensor([[0], [-2], [1], [2]]), 4)
    with pytest.raises(TypeError, match="indices"):
        dispatch(x, torch.zeros(4, 1), 4)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        dispatch(torch.ones(4, 3, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="rows"):
        dispatch(x, torch.zeros(3, 1, dtype=torch.long), 4)
    for bad in (-1, 0, 2.5):
        with pytest.raises(ValueError, match="capacity"):
            dispatch(x, torch.zeros(4, 1, dtype=torch.long), 4, capacity=bad)
    with pytest.raises(ValueError, match="num_experts"):
        dispatch(x, torch.zeros(4, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="backend"):
        dispatch(x, torch.zeros(4, 1, dtype=torch.long), 4, backend="cuda")
    xs, plan = dispatch(x, torch.zeros(4, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="weights"):
        combine(xs, plan, torch.ones(4, 2))


def test_triton_on_cpu_raises_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MOEBAL_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), 2, backend="triton")


def test_env_override_applies_to_auto_only(monkeypatch):
    from moebal.backend import resolve_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MOEBAL_BACKEND", "torch")
    assert resolve_backend("auto", "cpu") == "torch"
    monkeypatch.setenv("MOEBAL_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("auto", "cpu")
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setenv("MOEBAL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MOEBAL_BACKEND"):
        resolve_backend("auto", "cpu")
