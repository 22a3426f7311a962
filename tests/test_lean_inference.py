"""The lean inference paths: the router's plain top-k (moebal.router_lean), the dropless plan
without pairs lacking an expert, and dispatch/combine without autograd bookkeeping.

Each against a float64 reference written here (softmax/sigmoid, a stable sort by score,
a loop over experts and tokens) and bit for bit against the general path they shortcut,
which runs when the lean one is switched off; plus the cases that must leave the lean
path (ties, non-finite logits, training, gradients, selecting policies, autocast).
"""
import dataclasses

import pytest
import torch

import moebal
import moebal.layer as layer_mod
import moebal.plan as plan_mod
import moebal.router as router_mod
from moebal import AuxLoss, LossFree, Router
from moebal.dispatch import combine_rows, dispatch_rows
from moebal.plan import build_plan
from moebal.router_lean import lean_route


def _general(monkeypatch):
    """Switch the lean router, lean plan and the layer's decode step off: the general path runs."""
    monkeypatch.setattr(router_mod, "lean_route", lambda *a, **k: None)
    monkeypatch.setattr(plan_mod, "_lean_dropless_plan", lambda *a, **k: None)
    monkeypatch.setattr(layer_mod, "decode_forward", lambda *a, **k: None)


def _route64(x, weight, top_k, score, renormalize, scale):
    """float64 reference: scores, a stable descending sort (ties to the lower index), weights."""
    logits = x.double() @ weight.double().t()
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = scores.gather(1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return idx, w * scale, scores


# (T, E, K, score, renormalize, scale, balancer, why)
ROUTER_CASES = [
    (1, 64, 8, "softmax", True, 1.0, None, "one decode token, the issue's shape"),
    (8, 16, 4, "sigmoid", True, 1.0, None, "sigmoid scores renormalised"),
    (5, 7, 7, "softmax", False, 2.5, None, "K = E and a scale, no renormalisation"),
    (33, 12, 2, "softmax", True, 1.0, AuxLoss(1e-2), "a loss policy: none adds a term at eval"),
]


@pytest.mark.parametrize("T,E,K,score,renorm,scale,balancer,why", ROUTER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_route_matches_reference_and_general_path(T, E, K, score, renorm, scale, balancer, why, dtype, monkeypatch):
    torch.manual_seed(0)
    router = Router(32, E, K, score=score, balancer=balancer, renormalize=renorm, scale=scale).eval().to(dtype)
    x = torch.randn(T, 32).to(dtype)
    mask = torch.arange(T) % 3 != 1
    with torch.inference_mode():
        assert lean_route(router, x) is not None and lean_route(router, x, token_mask=mask) is not None
        lean, lean_masked = router(x), router(x, token_mask=mask)
    idx, w, scores = _route64(x.float(), router.gate.weight.float(), K, score, renorm, scale)
    assert torch.equal(lean.indices, idx)
    torch.testing.assert_close(lean.weights.double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean.scores.double(), scores, rtol=1e-5, atol=1e-7)
    assert lean.aux_loss.item() == 0.0 and lean.nonfinite_tokens.item() == 0
    assert torch.equal(lean_masked.indices[~mask], torch.full_like(lean_masked.indices[~mask], -1))
    assert torch.equal(lean_masked.weights[~mask], torch.zeros_like(lean_masked.weights[~mask]))
    _general(monkeypatch)
    with torch.inference_mode():
        general, general_masked = router(x), router(x, token_mask=mask)
    for a, b in ((lean, general), (lean_masked, general_masked)):  # bit for bit, same dtypes and shapes
        for f in ("indices", "weights", "scores", "aux_loss", "nonfinite_tokens"):
            assert getattr(a, f).dtype == getattr(b, f).dtype
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        assert (a.replayed, a.pair_based, a.num_rows) == (b.replayed, b.pair_based, b.num_rows)


def test_lean_route_bf16_gate_cache_follows_the_weight():
    torch.manual_seed(1)
    router = Router(16, 8, 2, balancer=None).eval().to(torch.bfloat16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.no_grad():
        first = lean_route(router, x)
        router.gate.weight.mul_(-1)  # an in-place change: the cached fp32 gate must follow
        second = lean_route(router, x)
    idx, _, _ = _route64(x.float(), router.gate.weight.float(), 2, "softmax", True, 1.0)
    assert torch.equal(second.indices, idx) and not torch.equal(first.indices, second.indices)


def test_lean_route_steps_aside():
    """Where the general path must decide, lean_route returns None (and the router still routes)."""
    torch.manual_seed(2)
    x = torch.randn(4, 16)
    plain = Router(16, 8, 2, balancer=None)
    with torch.no_grad():
        assert lean_route(plain.train(), x) is None  # training
        assert lean_route(plain.eval(), torch.zeros(4, 16)) is None  # every score tied
        nan_x = x.clone()
        nan_x[1, 0] = float("nan")
        assert lean_route(plain, nan_x) is None  # a non-finite logit
        assert plain(nan_x).nonfinite_tokens.item() == 1
        assert lean_route(plain, x[:0]) is None  # no tokens
        assert lean_route(Router(16, 8, 2, balancer=LossFree(1e-3)).eval(), x) is None  # a selecting policy
        assert lean_route(Router(16, 8, 2, num_groups=4, top_groups=2).eval(), x) is None  # group-limited
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lean_route(plain, x) is None
    assert lean_route(plain, x) is None  # grad enabled and the gate requires grad
    assert lean_route(plain, x.detach()) is None


def _plan64(indices, E):
    """Reference dropless plan by a loop: expert e's rows are its pairs in token order."""
    T, K = indices.shape
    rows, counts = [], [0] * E
    for e in range(E):
        for p in range(T * K):
            if int(indices.reshape(-1)[p]) == e:
                rows.append(p)
                counts[e] += 1
    return rows, counts


# (T, K, E, why)
PLAN_CASES = [
    (1, 8, 64, "one decode token"),
    (8, 8, 64, "a decode batch: some experts empty"),
    (6, 1, 1, "one expert, top-1: everything in one group"),
    (7, 3, 5, "prime E"),
    (4, 4, 4, "K = E: every token on every expert"),
]


@pytest.mark.parametrize("T,K,E,why", PLAN_CASES)
@pytest.mark.parametrize("int32", [False, True])
def test_lean_plan_matches_loop_and_general_plan(T, K, E, why, int32, monkeypatch):
    g = torch.Generator().manual_seed(T * 100 + K)
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if int32:
        indices = indices.int()
    lean = build_plan(indices, E)
    rows, counts = _plan64(indices, E)
    assert lean.pair_of_row_R.tolist() == rows
    assert lean.counts_E.tolist() == counts and lean.kept_E.tolist() == counts
    assert lean.group_ends_E.dtype == torch.int32 and lean.group_ends_E.tolist() == torch.tensor(counts).cumsum(0).tolist()
    assert torch.equal(lean.starts_E, lean.group_ends_E.long() - lean.counts_E)
    assert lean.token_of_row_R.tolist() == [p // K for p in rows]
    flat = lean.row_of_pair_TK.reshape(-1)
    assert torch.equal(lean.pair_of_row_R[flat], torch.arange(T * K))  # the two maps invert each other
    assert not lean.has_drops
    _general(monkeypatch)
    general = build_plan(indices, E)
    for f in dataclasses.fields(general):
        a, b = getattr(lean, f.name), getattr(general, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name


def test_lean_plan_leaves_pairs_without_an_expert_to_the_general_plan():
    indices = torch.tensor([[0, 2], [-1, 1], [3, 4]])  # a -1 and an index >= E = 4
    plan = build_plan(indices, 4)
    assert plan.has_drops and plan.counts_E.tolist() == [1, 1, 1, 1]
    assert plan.row_of_pair_TK[1, 0].item() == -1 and plan.row_of_pair_TK[2, 1].item() == -1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_dispatch_combine_match_loop(dtype):
    g = torch.Generator().manual_seed(3)
    T, K, E, D = 5, 3, 6, 8
    indices = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    x = torch.randn(T, D, generator=g).to(dtype)
    w = torch.rand(T, K, generator=g)
    plan = build_plan(indices, E)
    with torch.no_grad():
        xs = dispatch_rows(x, plan)
        ys = xs * 2
        y = combine_rows(ys, plan, w)
    for r, p in enumerate(plan.pair_of_row_R.tolist()):
        assert torch.equal(xs[r], x[p // K])
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            ref[t] += w[t, k].double() * 2 * x[t].double()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), ref, **tol)
    xg = x.clone().requires_grad_(True)  # with a gradient the autograd Functions still run
    assert dispatch_rows(xg, plan).grad_fn is not None
    y_graph = combine_rows(ys.clone().requires_grad_(True), plan, w)  # the pooled, chunked forward
    assert y_graph.grad_fn is not None and torch.equal(y, y_graph.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_combine_of_no_tokens_and_of_dropped_pairs(dtype):
    plan = build_plan(torch.zeros(0, 2, dtype=torch.long), 4)
    with torch.no_grad():
        assert combine_rows(torch.zeros(0, 8, dtype=dtype), plan, torch.zeros(0, 2)).shape == (0, 8)
    indices = torch.tensor([[0, 1], [0, 2], [0, 3]])  # capacity 1: expert 0 drops tokens 1 and 2
    plan = build_plan(indices, 4, capacity=1)
    ys = torch.arange(4 * 3, dtype=dtype).view(4, 3) + 1
    with torch.no_grad():
        y = combine_rows(ys, plan, torch.ones(3, 2))
    ref = torch.stack([ys[0] + ys[1], ys[2], ys[3]])  # rows: expert e's one seat is row e
    assert torch.equal(y, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 8])
def test_layer_inference_bit_identical_to_general_path(T, dtype, monkeypatch):
    torch.manual_seed(4)
    moe = moebal.MoE(32, 16, 8, 2, router=Router(32, 8, 2, balancer=None)).eval().to(dtype)
    x = torch.randn(T, 32).to(dtype)
    with torch.inference_mode():
        y = moe(x).clone()
        load = moe.last_stats.load.clone()
    _general(monkeypatch)
    with torch.inference_mode():
        y_general = moe(x)
    assert torch.equal(y, y_general) and torch.equal(load, moe.last_stats.load)
    assert int(load.sum()) == T * 2
