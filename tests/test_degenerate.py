"""Degenerate input: zero tokens, underflowing scores, non-finite logits, NaN loads.

Every expected value here comes from a closed form, a hand count or a float64 loop, never
from the code under test.
"""
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from moebal import stats
from moebal.assignment import SOLVERS, assign, balanced_assignment, sinkhorn_assignment
from moebal.functional import router_z_loss, sequence_aux_loss, switch_aux_loss, topk_routing
from moebal.plan import build_plan
from moebal.testing import assert_balanced, balance_table

NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------- stats: NaN loads, empty loads


@pytest.mark.parametrize("load", [
    torch.tensor([3.0, NAN, 1.0]),  # one NaN count
    torch.tensor([NAN, NAN]),  # nothing but NaN
    torch.tensor([2.0, INF, 1.0]),  # an infinite count: (inf - inf) / inf
])
def test_max_violation_is_nan_on_a_nonfinite_load(load):
    assert math.isnan(float(stats.max_violation(load)))
    assert math.isnan(float(stats.coefficient_of_variation(load)))
    assert math.isnan(float(stats.load_entropy(load)))


def test_dropped_fraction_is_nan_on_a_nan_load():
    assert math.isnan(float(stats.dropped_fraction(torch.tensor([NAN, 2.0]), torch.tensor([1.0, 2.0]))))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_empty_load_reads_as_balanced(dtype):
    # T = 0: no expert got anything, so nothing is over- or under-loaded
    load = torch.zeros(4, dtype=dtype)
    assert float(stats.max_violation(load)) == 0.0
    assert float(stats.coefficient_of_variation(load)) == 0.0
    assert float(stats.load_entropy(load)) == 1.0
    assert float(stats.dropped_fraction(load, load)) == 0.0
    assert_balanced(load, max_violation=0.0)


def test_empty_batch_stats_from_expert_load():
    load = stats.expert_load(torch.empty(0, 2, dtype=torch.long), 3)
    assert load.tolist() == [0, 0, 0]
    s = stats.BalanceStats(load, load.clone(), num_tokens=0, top_k=2).to_dict()
    assert (s["max_violation"], s["cv"], s["entropy"], s["dropped_fraction"]) == (0.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize("load", [
    torch.tensor([5.0, NAN, 5.0]),
    torch.tensor([NAN, NAN, NAN]),
    torch.tensor([5.0, INF, 5.0]),
    torch.tensor([5.0, -INF, 5.0]),
])
def test_assert_balanced_fails_closed_on_nonfinite_load(load):
    with pytest.raises(AssertionError, match="not finite"):
        assert_balanced(load, max_violation=1e9)


def test_assert_balanced_fails_closed_on_nonfinite_stats():
    s = stats.BalanceStats(torch.tensor([1.0, NAN]), torch.tensor([1.0, 1.0]), num_tokens=1, top_k=1)
    with pytest.raises(AssertionError, match="stats: load is not finite"):
        assert_balanced(s, max_violation=10.0)


def test_table_prints_real_float_loads():
    table = balance_table(torch.tensor([2.5, 0.5, 1.5, 1.5]))  # mean 1.5
    over = table.split("over-loaded:")[1].split("under-loaded:")[0]
    under = table.split("under-loaded:")[1]
    assert "2.5" in over and "+66.7%" in over  # (2.5 - 1.5) / 1.5
    assert "0.5" in under and "-66.7%" in under
    assert "mean load 1.50 over 4 experts" in table


def test_table_lists_nonfinite_loads():
    table = balance_table(torch.tensor([1.0, NAN, 3.0, INF]))
    assert "not finite:" in table
    tail = table.split("not finite:")[1]
    assert "     1        nan" in tail and "     3        inf" in tail


def test_table_keeps_integer_loads_integer():
    table = balance_table(torch.tensor([10, 40, 10, 0]))
    assert "     1         40" in table and "40.0" not in table


@pytest.mark.parametrize("bad", [0, -1, -3, True, False, 1.5, "2"])
def test_maxvio_batch_rejects_a_bad_last(bad):
    m = stats.BalanceMeter()
    m.update("l0", torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=f"last must be a positive int or None, got {bad!r}"):
        m.maxvio_batch("l0", last=bad)


def test_maxvio_batch_last_none_means_all_and_last_beyond_length_means_all():
    m = stats.BalanceMeter()
    m.update("l0", torch.tensor([3, 1]))  # MaxVio 0.5
    m.update("l0", torch.tensor([2, 2]))  # MaxVio 0
    m.update("l0", torch.tensor([4, 0]))  # MaxVio 1
    assert m.maxvio_batch("l0", last=None) == pytest.approx(0.5)
    assert m.maxvio_batch("l0", last=2) == pytest.approx(0.5)
    assert m.maxvio_batch("l0", last=1) == pytest.approx(1.0)
    assert m.maxvio_batch("l0", last=10) == pytest.approx(0.5)


def test_meter_refuses_a_nan_load_and_counts_an_empty_one():
    m = stats.BalanceMeter()
    with pytest.raises(ValueError, match="load"):
        m.update("l0", torch.tensor([1.0, NAN]))
    with pytest.raises(ValueError, match="load"):
        m.update("l0", torch.tensor([1.5, 2.0]))  # not a count
    assert m.layers == []
    m.update("l0", torch.zeros(2, dtype=torch.long))  # an empty step
    m.update("l0", torch.tensor([3.0, 1.0]))  # integral floats are counts
    assert m.summed_load("l0").tolist() == [3, 1]
    assert m.maxvio_batch("l0") == pytest.approx(0.25)  # mean of 0 and 0.5
    assert m.maxvio_global("l0") == pytest.approx(0.5)


# ---------------------------------------------------------------- routing: zero tokens


def _empty(E, dtype=torch.float32):
    return torch.zeros(0, E, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["switch", "sequence", "z"])
def test_losses_of_zero_tokens_are_zero_with_zero_gradient(loss, dtype):
    E, K = 8, 2
    x = _empty(E, dtype)
    idx = torch.zeros(0, K, dtype=torch.long)
    if loss == "switch":
        out = switch_aux_loss(x, idx, E)
    elif loss == "sequence":
        out = sequence_aux_loss(x, idx, E, seq_len=4)
    else:
        out = router_z_loss(x)
    assert out.dtype == torch.float32 and out.shape == ()
    assert out.item() == 0.0  # exactly, not NaN
    out.backward()
    assert x.grad is not None and x.grad.shape == (0, E) and torch.isfinite(x.grad).all()


def test_z_loss_needs_an_expert_column():
    with pytest.raises(ValueError, match=r"logits must have at least one expert column, got shape \(3, 0\)"):
        router_z_loss(torch.zeros(3, 0))


# ---------------------------------------------------------------- routing: underflowing scores


def _log_sigmoid64(l: float) -> float:
    return -math.log1p(math.exp(-l)) if l >= 0 else l - math.log1p(math.exp(l))


def _renormalized64(chosen, log_score):
    """w_k = s_k / sum_j s_j in float64, through log-scores (no underflow for any logit here)."""
    logs = [log_score(l) for l in chosen]
    top = max(logs)
    den = sum(math.exp(v - top) for v in logs)
    return [math.exp(v - top) / den for v in logs]


# rows of finite logits whose sigmoids underflow fp32 (below about -87 they are subnormal,
# below about -104 they are 0); each row's chosen experts are its K largest logits
_SIGMOID_ROWS = [
    [-200.0, -201.0, -205.0, -300.0],  # all chosen scores are 0 in fp32: 0/0 before
    [-104.0, -104.5, -110.0, -1e4],  # at the edge of fp32's subnormals
    [-150.0, -150.0, -3e38, -150.0],  # equal logits: equal weights
    [-90.0, -95.0, -99.0, -103.0],  # subnormal: the plain formula loses digits
    [-87.0, -88.0, -200.0, -1e3],
    [-50.0, -60.0, -70.0, -80.0],
    [0.0, -1.0, -2.0, -104.0],
    [50.0, 49.0, 20.0, -200.0],  # sigmoid rounds to 1
    [3.0, -200.0, -300.0, -400.0],  # one weight near 1, the others far below fp32's range
    [1e4, 1e4, -1e4, 0.0],
]


@pytest.mark.parametrize("K", [1, 2, 3])
def test_sigmoid_renormalized_weights_are_finite_and_exact(K):
    logits = torch.tensor(_SIGMOID_ROWS, requires_grad=True)
    w, idx = topk_routing(logits, K, score="sigmoid", renormalize=True)
    assert torch.isfinite(w).all()
    s32 = torch.sigmoid(torch.tensor(_SIGMOID_ROWS)).tolist()  # experts are chosen by the fp32 score
    for t, row in enumerate(_SIGMOID_ROWS):
        order = sorted(range(4), key=lambda e: (-s32[t][e], e))[:K]  # ties toward the lower index
        assert idx[t].tolist() == order
        ref = torch.tensor(_renormalized64([row[e] for e in order], _log_sigmoid64), dtype=torch.float64)
        # fp32 rounding: the plain quotient rounds the scores, their sum and the quotient
        # (at most 2 units in the last place); subnormal results: fp32's smallest step
        torch.testing.assert_close(w[t].double(), ref, rtol=2**-22, atol=2**-149)
    (w * torch.linspace(-1, 1, K)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_sigmoid_renormalized_matches_plain_formula_where_it_is_finite():
    # the plain fp32 formula s_k / sum_j s_j, for every row where it is finite and normal
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 8, generator=g) * 30 - torch.linspace(0, 200, 512).unsqueeze(1)
    w, idx = topk_routing(logits, 3, score="sigmoid", renormalize=True)
    s = torch.sigmoid(logits).gather(1, idx)
    plain = s / s.sum(-1, keepdim=True)
    ok = s.sum(-1) >= torch.finfo(torch.float32).tiny
    assert ok.sum() > 200 and (~ok).sum() > 100  # both cases are exercised
    assert torch.equal(w[ok], plain[ok])  # bit for bit: the common path is the plain formula
    assert torch.isfinite(w).all()


def test_gradient_of_underflowing_rows_matches_float64():
    rows = [[-200.0, -201.0, -205.0], [-120.0, -100.0, -90.0]]
    logits = torch.tensor(rows, requires_grad=True)
    w, idx = topk_routing(logits, 2, score="sigmoid", renormalize=True)
    coef = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    (w * coef).sum().backward()
    ref_logits = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    ls = torch.nn.functional.logsigmoid(ref_logits.gather(1, idx))
    ref_w = (ls - ls.logsumexp(-1, keepdim=True)).exp()
    (ref_w * coef.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-6, atol=1e-7)


def test_softmax_renormalized_with_a_bias_on_underflowing_experts():
    # the bias chooses experts whose softmax probability is 0 in fp32: weights = softmax of
    # the chosen logits (p_k / sum p_j = exp(l_k) / sum exp(l_j))
    logits = torch.tensor([[0.0, -200.0, -200.0, -300.0], [0.0, -200.0, -201.0, -300.0]])
    bias = torch.tensor([-10.0, 0.0, 0.0, 0.0])
    w, idx = topk_routing(logits, 2, score="softmax", bias=bias, renormalize=True)
    assert idx.tolist() == [[1, 2], [1, 2]]
    e = math.exp(-1)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5], [1 / (1 + e), e / (1 + e)]]))


# ---------------------------------------------------------------- routing: non-finite logits, one rule


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_nonfinite_logit_makes_the_token_nan_and_keeps_it_routed(score, renormalize, bad):
    T, E, K = 5, 6, 3
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(T, E, generator=g)
    logits[1, 4] = bad  # one bad entry
    logits[3] = bad  # a whole bad row
    w, idx = topk_routing(logits, K, score=score, renormalize=renormalize)
    assert ((idx >= 0) & (idx < E)).all()
    assert (idx.sort(1).values.diff(dim=1) > 0).all()  # K distinct experts per token
    assert torch.isnan(w[[1, 3]]).all()
    assert torch.isfinite(w[[0, 2, 4]]).all()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_sync_free_path_gives_the_same_weights(score, monkeypatch):
    # on other devices and under torch.compile no host read picks the rows: both formulas
    # run and a where picks; on CPU the same path runs when is_compiling says so
    logits = torch.tensor(_SIGMOID_ROWS + [[NAN, 0.0, 1.0, 2.0], [-INF, 0.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    bias = torch.tensor([0.0, 0.0, -5.0, 0.0])
    want = [topk_routing(logits, 2, score=score, bias=b) for b in (None, bias)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for (w_ref, i_ref), b in zip(want, (None, bias)):
        x = logits.clone().requires_grad_(True)
        w, i = topk_routing(x, 2, score=score, bias=b)
        assert torch.equal(i, i_ref)
        torch.testing.assert_close(w, w_ref, rtol=0, atol=0, equal_nan=True)
        w[:-3].sum().backward()  # the underflowing rows: a finite gradient, nothing leaks from the where
        assert torch.isfinite(x.grad[:-3]).all()


# ---------------------------------------------------------------- plan: NaN weights drop first


def _kept_by_weight_loop(idx, w, E, capacity):
    """Per expert, keep the ``capacity`` pairs ranked by: finite before NaN, then weight
    descending, then pair index (token-major) ascending, i.e. ties drop the later token."""
    T, K = len(idx), len(idx[0])
    kept = [[False] * K for _ in range(T)]
    for e in range(E):
        pairs = [(t, k) for t in range(T) for k in range(K) if idx[t][k] == e]
        pairs.sort(key=lambda p: (math.isnan(w[p[0]][p[1]]), -w[p[0]][p[1]] if not math.isnan(w[p[0]][p[1]]) else 0.0,
                                  p[0] * K + p[1]))
        for t, k in pairs[:capacity]:
            kept[t][k] = True
    return kept


def test_weight_policy_drops_nan_weights_first():
    idx = torch.zeros(4, 1, dtype=torch.long)
    w = torch.tensor([[0.1], [NAN], [0.5], [0.7]])
    plan = build_plan(idx, 1, capacity=2, weights_TK=w, drop_policy="weight")
    assert (plan.row_of_pair_TK[:, 0] >= 0).tolist() == [False, False, True, True]
    plan = build_plan(idx, 1, capacity=3, weights_TK=w, drop_policy="weight")
    assert (plan.row_of_pair_TK[:, 0] >= 0).tolist() == [True, False, True, True]


@pytest.mark.parametrize("seed", range(6))
def test_weight_policy_with_nan_and_ties_matches_the_loop(seed):
    g = torch.Generator().manual_seed(seed)
    T, E, K, cap = 40, 5, 2, 6
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = (torch.randint(0, 4, (T, K), generator=g) / 4.0)  # coarse: many ties
    w[torch.rand(T, K, generator=g) < 0.2] = NAN
    w[torch.rand(T, K, generator=g) < 0.05] = -INF  # still ranks above NaN
    w[torch.rand(T, K, generator=g) < 0.05] = INF
    plan = build_plan(idx, E, capacity=cap, weights_TK=w, drop_policy="weight")
    want = _kept_by_weight_loop(idx.tolist(), w.tolist(), E, cap)
    assert (plan.row_of_pair_TK >= 0).tolist() == want


# ---------------------------------------------------------------- assignment: non-finite tokens


def _scores_with_bad_rows(T, E, bad_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=g) + torch.linspace(0, 2, E)
    for i, t in enumerate(bad_rows):
        kind = i % 4
        if kind == 0:
            scores[t] = NAN  # a whole row
        elif kind == 1:
            scores[t, (t * 7) % E] = NAN  # one entry
        elif kind == 2:
            scores[t, (t * 3) % E] = INF
        else:
            scores[t, (t * 5) % E] = -INF
    return scores


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("K", [1, 2])
def test_nonfinite_tokens_go_to_experts_0_to_k_and_the_rest_is_solved_alone(solver, K):
    T, E = 68, 8
    bad = [3, 10, 11, 40]  # each kind of bad row once; T_f = 64 balances on 8 experts
    scores = _scores_with_bad_rows(T, E, bad)
    idx = assign(scores, K, solver)
    assert idx.shape == (T, K) and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < E)).all()
    assert (idx.sort(1).values.diff(dim=1) > 0).all()
    for t in bad:
        assert idx[t].tolist() == list(range(K))
    finite = [t for t in range(T) if t not in bad]
    # the finite tokens are routed as if the others were not there
    assert torch.equal(idx[finite], assign(scores[finite], K, solver))


@pytest.mark.parametrize("K", [1, 2])
def test_exact_solver_balances_the_finite_tokens_optimally(K):
    T, E = 36, 4
    bad = [0, 17, 18, 35]  # T_f = 32, C = 32*K/4
    scores = _scores_with_bad_rows(T, E, bad, seed=3)
    idx = balanced_assignment(scores, K)
    finite = [t for t in range(T) if t not in bad]
    load = torch.bincount(idx[finite].reshape(-1), minlength=E)
    assert load.tolist() == [len(finite) * K // E] * E  # exact balance over the finite tokens
    if K == 1:  # optimal: Hungarian on the finite rows, each expert's column repeated C times
        s = scores[finite].double().numpy()
        expanded = s.repeat(len(finite) // E, axis=1)
        r, c = linear_sum_assignment(expanded, maximize=True)
        got = float(scores[finite].double().gather(1, idx[finite]).sum())
        assert got == pytest.approx(float(expanded[r, c].sum()), rel=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_all_tokens_nonfinite(solver):
    idx = assign(torch.full((5, 4), NAN), 2, solver)
    assert idx.tolist() == [[0, 1]] * 5


@pytest.mark.parametrize("solver", SOLVERS)
def test_finite_tokens_must_balance(solver):
    scores = _scores_with_bad_rows(16, 8, [2])  # 15 finite tokens on 8 experts
    msg = r"1 of the T=16 tokens have NaN or Inf scores.*the other 15 give 15\*1 = 15 slots.*num_experts=8"
    with pytest.raises(ValueError, match=msg):
        assign(scores, 1, solver)
    # 17 tokens, one NaN: 16 finite ones balance although 17*1 is not a multiple of 8
    scores = _scores_with_bad_rows(17, 8, [9])
    assert assign(scores, 1, solver)[9].tolist() == [0]


def test_sinkhorn_plan_rows_of_nonfinite_tokens_are_nan():
    scores = _scores_with_bad_rows(20, 4, [1, 6, 7, 13])
    idx, plan, _ = sinkhorn_assignment(scores, 2, return_plan=True)
    assert torch.isnan(plan[[1, 6, 7, 13]]).all()
    finite = [t for t in range(20) if t not in (1, 6, 7, 13)]
    assert torch.isfinite(plan[finite]).all()
    assert torch.allclose(plan[finite].sum(1), torch.full((16,), 2.0, dtype=plan.dtype), atol=1e-5)
