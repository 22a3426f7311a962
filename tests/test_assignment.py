"""Balanced assignment: the exact solver against scipy references, the approximate ones by
their balance, and every input error.

References are computed here: scipy's Hungarian ``linear_sum_assignment`` on the T x T
matrix that repeats each expert's column C = T*K/E times (K = 1 only), and HiGHS
``linprog`` on the compact transportation LP (rows sum to K, columns to C, 0 <= x <= 1),
whose optimum is integral.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment, linprog
from scipy.sparse import coo_matrix

from moebal.assignment import (
    SOLVERS,
    _cancel_negative_cycles,
    _order_by_score,
    assign,
    balanced_assignment,
    quantile_assignment,
    sinkhorn_assignment,
)

# ---------------------------------------------------------------- references and checks


def lp_optimum(scores_TE: torch.Tensor, top_k: int) -> float:
    s = scores_TE.double().numpy()
    T, E = s.shape
    C = T * top_k // E
    col = np.arange(T * E)
    rows = np.r_[col // E, T + col % E]
    A = coo_matrix((np.ones(2 * T * E), (rows, np.r_[col, col])), shape=(T + E, T * E)).tocsc()
    b = np.r_[np.full(T, top_k), np.full(E, C)]
    # HiGHS presolve takes minutes on these LPs from T ~ 1024 on; the simplex alone is quick
    res = linprog(-s.ravel(), A_eq=A, b_eq=b, bounds=(0, 1), method="highs-ds", options={"presolve": False})
    assert res.status == 0, res.message
    return -res.fun


def lsa_optimum(scores_TE: torch.Tensor) -> float:
    s = scores_TE.double().numpy()
    T, E = s.shape
    expanded = np.repeat(s, T // E, axis=1)  # column e*C + c is seat c of expert e
    r, c = linear_sum_assignment(expanded, maximize=True)
    return float(expanded[r, c].sum())


def total(scores_TE, indices_TK) -> float:
    return float(scores_TE.double().gather(1, indices_TK).sum())


def max_violation(indices_TK, num_experts) -> float:
    load = torch.bincount(indices_TK.reshape(-1), minlength=num_experts).double()
    return float((load.max() - load.mean()) / load.mean())


def assert_valid(scores_TE, indices_TK, top_k):
    T, E = scores_TE.shape
    assert indices_TK.dtype == torch.int64 and indices_TK.shape == (T, top_k)
    assert indices_TK.device == scores_TE.device
    load = torch.bincount(indices_TK.reshape(-1), minlength=E)
    assert torch.equal(load, torch.full((E,), T * top_k // E)), load
    assert (indices_TK.sort(1).values.diff(dim=1) > 0).all(), "a token got an expert twice"
    # documented order: descending score, ties toward the lower expert index
    chosen = scores_TE.double().gather(1, indices_TK)
    d_score = chosen[:, :-1] - chosen[:, 1:]
    assert (d_score >= 0).all()
    assert ((d_score > 0) | (indices_TK[:, :-1] < indices_TK[:, 1:])).all()


def assert_optimal(scores_TE, indices_TK, top_k, ref=None):
    assert_valid(scores_TE, indices_TK, top_k)
    ref = lp_optimum(scores_TE, top_k) if ref is None else ref
    got = total(scores_TE, indices_TK)
    assert abs(got - ref) <= 1e-6 * abs(ref) + 1e-9, (got, ref)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- exact solver vs references

SHAPES = [  # (T, E, K)
    (64, 4, 1), (64, 4, 2), (64, 8, 1), (64, 8, 2), (64, 8, 4), (64, 16, 4),
    (256, 4, 1), (256, 8, 2), (256, 16, 1), (256, 16, 4), (256, 64, 1), (256, 64, 2),
    (1024, 8, 1), (1024, 16, 2), (1024, 64, 1),  # larger ones kept few: HiGHS is slow there
    (64, 64, 4),  # C = 4: each expert takes very few tokens
    (1024, 64, 4),  # K = 4 at the largest size: x <= 1 binds for many tokens
]


@pytest.mark.parametrize("T,E,K", SHAPES)
def test_matches_highs_on_random_scores(T, E, K):
    # skewed so that plain top-k is far from balanced and the repair does real work
    scores = torch.randn(T, E, generator=gen(T + E + K), dtype=torch.float64)
    scores += torch.linspace(0, 2, E, dtype=torch.float64)
    assert_optimal(scores, balanced_assignment(scores, K), K)


@pytest.mark.parametrize("T,E", [(64, 4), (64, 8), (256, 16), (256, 64)])
def test_matches_hungarian_top1(T, E):
    scores = torch.rand(T, E, generator=gen(T * E), dtype=torch.float64)
    assert_optimal(scores, balanced_assignment(scores, 1), 1, ref=lsa_optimum(scores))


@pytest.mark.parametrize("T,E,K", [(256, 8, 1), (256, 16, 2), (512, 64, 4), (1024, 64, 1)])
def test_integer_scores_exactly_optimal(T, E, K):
    scores = torch.randint(-1000, 1000, (T, E), generator=gen(7 * T + E)).double()
    idx = balanced_assignment(scores, K)
    assert_valid(scores, idx, K)
    assert total(scores, idx) == round(lp_optimum(scores, K))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_input(dtype):
    scores = torch.randn(256, 16, generator=gen(3)).to(dtype)
    idx = balanced_assignment(scores, 2)
    assert_optimal(scores.double(), idx, 2)


def test_low_rank_scores():
    # correlated experts: many tokens share preferences, the hardest random family here
    g = gen(11)
    scores = torch.randn(512, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 64, generator=g, dtype=torch.float64)
    for K in (1, 2):
        assert_optimal(scores, balanced_assignment(scores, K), K)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 8).flatmap(lambda E: st.tuples(st.just(E), st.integers(1, E), st.integers(1, 6))),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["normal", "integer", "coarse"]),
)
def test_property_small_instances(ekm, seed, kind):
    E, K, mult = ekm
    T = mult * E // math.gcd(K, E)
    g = gen(seed)
    if kind == "normal":
        scores = torch.randn(T, E, generator=g, dtype=torch.float64)
    elif kind == "integer":
        scores = torch.randint(0, 5, (T, E), generator=g).double()
    else:  # many ties
        scores = torch.randint(0, 3, (T, E), generator=g).double() * 0.25
    idx = balanced_assignment(scores, K)
    assert_optimal(scores, idx, K)


# ---------------------------------------------------------------- adversarial instances


def test_all_tokens_prefer_one_expert():
    scores = torch.rand(512, 16, generator=gen(1), dtype=torch.float64)
    scores[:, 5] += 100.0
    for K in (1, 2, 4):
        assert_optimal(scores, balanced_assignment(scores, K), K)


def test_duplicated_rows():
    base = torch.randn(8, 16, generator=gen(2), dtype=torch.float64)
    scores = base.repeat(16, 1)  # 128 tokens, 8 distinct: a degenerate LP (slow for HiGHS)
    for K in (1, 3):
        idx = balanced_assignment(scores, K)
        assert_optimal(scores, idx, K)
        assert torch.equal(idx, balanced_assignment(scores, K))


def test_huge_score_range():
    g = gen(4)
    scores = torch.randn(256, 16, generator=g, dtype=torch.float64)
    scores[:, :4] *= 1e6  # four experts on a 1e6 scale, the rest of order 1
    scores[::7] *= 1e-6
    for K in (1, 2):
        assert_optimal(scores, balanced_assignment(scores, K), K)


def test_huge_integer_spread_exact():
    scores = torch.randint(-(10**6), 10**6, (256, 16), generator=gen(5)).double()
    idx = balanced_assignment(scores, 2)
    assert total(scores, idx) == round(lp_optimum(scores, 2))


def test_ties_are_deterministic():
    flat = torch.zeros(64, 8)
    idx = balanced_assignment(flat, 2)
    assert_valid(flat, idx, 2)
    assert torch.equal(idx, balanced_assignment(flat.clone(), 2))
    coarse = (torch.rand(256, 8, generator=gen(6)) * 4).floor()
    a, b = balanced_assignment(coarse, 1), balanced_assignment(coarse.clone(), 1)
    assert torch.equal(a, b)
    assert_optimal(coarse.double(), a, 1)


# ---------------------------------------------------------------- shapes and edge cases


def test_fewer_tokens_than_experts():
    scores = torch.randn(4, 8, generator=gen(8), dtype=torch.float64)  # T < E, C = 1
    assert_optimal(scores, balanced_assignment(scores, 2), 2)
    scores = torch.randn(2, 8, generator=gen(9), dtype=torch.float64)
    assert_optimal(scores, balanced_assignment(scores, 4), 4)


def test_one_expert_and_k_equals_e():
    scores = torch.randn(10, 1, generator=gen(10))
    assert torch.equal(balanced_assignment(scores, 1), torch.zeros(10, 1, dtype=torch.long))
    scores = torch.randn(6, 4, generator=gen(11))
    idx = balanced_assignment(scores, 4)
    assert_valid(scores, idx, 4)
    assert torch.equal(idx, scores.sort(dim=1, descending=True, stable=True).indices)


def test_empty_batch_and_single_token():
    assert balanced_assignment(torch.zeros(0, 8), 1).shape == (0, 1)
    idx = balanced_assignment(torch.tensor([[0.3, 0.9, 0.1, 0.5]]), 4)
    assert idx.tolist() == [[1, 3, 0, 2]]


def test_no_grad_and_non_contiguous():
    base = torch.randn(16, 64, generator=gen(12), requires_grad=True)
    scores = base.t()  # [64, 16], non-contiguous, requires grad
    idx = balanced_assignment(scores, 2)
    assert not idx.requires_grad
    assert_optimal(scores.detach(), idx, 2)


def test_fast_path_certifies_itself(monkeypatch):
    # the price/repair path must end with a passing complementary-slackness certificate on
    # ordinary and adversarial inputs alike; the cycle-cancelling fallback is a safety net
    import moebal.assignment as mod

    def no_fallback(*args):
        raise AssertionError("certificate failed: fell back to cycle cancelling")

    monkeypatch.setattr(mod, "_cancel_negative_cycles", no_fallback)
    g = gen(17)
    cases = [
        (torch.randn(1024, 64, generator=g), 1),
        (torch.randn(1024, 64, generator=g, dtype=torch.float64) * 1e6, 2),
        (torch.randint(0, 3, (512, 16), generator=g).float(), 2),
        (torch.rand(512, 16, generator=g) + torch.eye(16)[5] * 100, 1),  # one expert wanted by all
        (torch.randn(512, 4, generator=g) @ torch.randn(4, 32, generator=g), 1),
        (torch.zeros(64, 8), 3),
    ]
    for scores, K in cases:
        assert_valid(scores, balanced_assignment(scores, K), K)


def test_fallback_cycle_cancelling_reaches_optimum():
    # a balanced but poor start (round-robin seats); cancelling negative cycles alone must
    # reach the LP optimum: this is the safety net behind the certificate
    T, E, K = 96, 6, 2
    scores = torch.randn(T, E, generator=gen(13), dtype=torch.float64)
    idx_TK = (torch.arange(T * K) % E).view(T, K).clone()
    member_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, idx_TK, True)
    _cancel_negative_cycles(scores, idx_TK, member_TE, 1e-12)
    assert torch.equal(member_TE, torch.zeros_like(member_TE).scatter_(1, idx_TK, True))
    assert_optimal(scores, _order_by_score(scores, idx_TK), K)


# ---------------------------------------------------------------- approximate solvers


def skewed(T=2048, E=16, seed=14):
    scores = torch.randn(T, E, generator=gen(seed))
    return scores + torch.linspace(0, 3, E)  # argmax sends most tokens to the last experts


def test_sinkhorn_plan_and_balance():
    scores = skewed()
    T, E, K = 2048, 16, 2
    C = T * K // E
    idx, plan, iters = sinkhorn_assignment(scores, K, num_iters=200, tol=0.0, return_plan=True)
    assert iters <= 200
    # the plan is a relaxed assignment: rows sum to K, every entry in [0, 1], columns near C
    assert torch.allclose(plan.sum(1), torch.full((T,), float(K), dtype=plan.dtype), rtol=0, atol=1e-6 * K)
    assert ((plan >= 0) & (plan <= 1)).all()
    assert ((plan.sum(0) / C - 1).abs() <= 0.05).all()
    assert idx.shape == (T, K) and idx.dtype == torch.int64
    assert (idx.sort(1).values.diff(dim=1) > 0).all()
    # each token's experts are K largest entries of its row of the plan
    chosen_min = plan.gather(1, idx).amin(1)
    assert (chosen_min >= plan.scatter(1, idx, -1.0).amax(1)).all()
    top1 = sinkhorn_assignment(scores, 1)
    raw = max_violation(scores.argmax(1, keepdim=True), E)
    assert raw > 3.0
    assert max_violation(top1, E) < 0.02 * raw


def test_sinkhorn_iteration_cap_and_tol():
    scores = skewed()
    _, _, iters = sinkhorn_assignment(scores, 1, num_iters=3, tol=0.0, return_plan=True)
    assert iters == 3
    idx, _, iters = sinkhorn_assignment(scores, 2, num_iters=500, tol=0.05, return_plan=True)
    assert 1 <= iters < 500
    assert max_violation(idx, 16) <= 0.05  # tol bounds the MaxVio it stops at


def router_like(T, E, seed, sharpness=1.0):
    """benchmarks/bench_assignment.py's router scores: softmax over experts of N(0, 1) logits
    plus a per-expert popularity bias spread over [0, 1.5] (``sharpness`` scales the logits)."""
    g = gen(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    bias = torch.linspace(0.0, 1.5, E, dtype=torch.float64)[torch.randperm(E, generator=g)]
    return torch.softmax(sharpness * (logits + bias), dim=1).float()


def plain_topk(scores_TE, K):
    """Each token's K highest scores, by a float64 stable sort (ties toward the lower index)."""
    return torch.sort(scores_TE.double(), dim=1, descending=True, stable=True).indices[:, :K]


@pytest.mark.parametrize("T,E,K", [
    (1024, 16, 2),  # Sinkhorn on exp(s/tau) balanced worse than top-k here (2.98 vs 1.54, sharpness 3)
    (1024, 64, 8),  # large K: one cell of its plan took most of a row (6.99 vs 1.50, sharpness 3)
    (4096, 64, 2),
    (1024, 16, 1),
])
@pytest.mark.parametrize("sharpness", [1.0, 3.0])  # 3: peaked scores, most of them tiny
@pytest.mark.parametrize("seed", range(3))
def test_sinkhorn_balances_better_than_plain_topk(T, E, K, sharpness, seed):
    scores = router_like(T, E, seed, sharpness)
    idx = sinkhorn_assignment(scores, K)
    assert idx.shape == (T, K) and ((idx >= 0) & (idx < E)).all()
    assert (idx.sort(1).values.diff(dim=1) > 0).all(), "a token got an expert twice"
    topk = max_violation(plain_topk(scores, K), E)
    got = max_violation(idx, E)
    assert got <= topk
    assert got <= 0.3 * topk  # and by a wide margin (measured: <= 0.3 at sharpness 3, 0.016 at 1)


@pytest.mark.parametrize("K", [1, 2])
def test_sinkhorn_spreads_constant_scores(K):
    # a router at initialisation: every score equal; plain top-k sends all to experts 0..K-1
    idx = sinkhorn_assignment(torch.full((512, 16), 1 / 16), K)
    assert (idx.sort(1).values.diff(dim=1) > 0).all()
    assert max_violation(idx, 16) <= 0.25


def test_quantile_balance_and_closed_form():
    scores = skewed()
    E = scores.shape[1]
    raw = max_violation(scores.argmax(1, keepdim=True), E)
    for K in (1, 2):
        idx = quantile_assignment(scores, K)
        assert idx.shape == (2048, K) and (idx.sort(1).values.diff(dim=1) > 0).all()
        assert max_violation(idx, E) < 0.1 * raw
    assert torch.equal(quantile_assignment(scores, 1, num_rounds=0), scores.argmax(1, keepdim=True))


def test_assign_dispatch():
    scores = torch.randn(128, 8, generator=gen(15))
    assert SOLVERS == ("exact", "sinkhorn", "quantile")
    assert torch.equal(assign(scores, 2), balanced_assignment(scores, 2))
    assert torch.equal(assign(scores, 2, "sinkhorn", num_iters=5), sinkhorn_assignment(scores, 2, num_iters=5))
    assert torch.equal(assign(scores, 1, solver="quantile"), quantile_assignment(scores, 1))
    with pytest.raises(ValueError, match="solver must be one of"):
        assign(scores, 1, solver="hungarian")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [balanced_assignment, sinkhorn_assignment, quantile_assignment])
def test_input_errors(fn):
    good = torch.randn(16, 8)
    with pytest.raises(ValueError, match="pad the batch to a multiple of 4 tokens"):
        fn(torch.randn(6, 8), 2)  # 12 slots over 8 experts
    with pytest.raises(ValueError, match="pad the batch to a multiple of 8 tokens"):
        fn(torch.randn(12, 8), 1)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = good.clone()
        x[3, 2] = bad  # the token is left out of the balance: 15 finite tokens on 8 experts
        with pytest.raises(ValueError, match="1 of the T=16 tokens have NaN or Inf scores"):
            fn(x, 1)
    with pytest.raises(ValueError, match="top_k must be in"):
        fn(good, 9)
    with pytest.raises(ValueError, match="top_k must be in"):
        fn(good, 0)
    with pytest.raises(TypeError, match="top_k must be an int"):
        fn(good, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.ones(16, 8, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"shape \[T, E\].*\(16,\)"):
        fn(torch.randn(16), 1)
    with pytest.raises(ValueError, match=r"shape \[T, E\]"):
        fn(torch.randn(2, 16, 8), 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(np.zeros((16, 8)), 1)


def test_solver_option_errors():
    scores = torch.randn(16, 8)
    with pytest.raises(ValueError, match="num_iters"):
        sinkhorn_assignment(scores, 1, num_iters=0)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="tol must be >= 0, got"):
            sinkhorn_assignment(scores, 1, tol=bad)
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0, got"):
            sinkhorn_assignment(scores, 1, temperature=bad)
    with pytest.raises(ValueError, match="num_rounds"):
        quantile_assignment(scores, 1, num_rounds=-1)


# ---------------------------------------------------------------- device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    scores = torch.randn(1024, 64, generator=gen(16))
    for K in (1, 2):
        cpu = balanced_assignment(scores, K)
        cuda = balanced_assignment(scores.cuda(), K)
        assert cuda.device.type == "cuda"
        assert_optimal(scores.double(), cuda.cpu(), K)
        assert total(scores, cpu) == pytest.approx(total(scores, cuda.cpu()), rel=1e-12)
