"""The variable-k plan: built from (token, expert) pairs, R = the pairs' rows.

References are independent of the plan code: a plain Python loop groups the pairs by
expert (token order inside an expert), and the round trip is checked against a float64
loop ``y[t] = sum over pairs (t, e) of w * f_e(x[t])`` with autograd for the gradients.
The Triton dispatch/combine run the same plan under the interpreter on the CPU (see
tests/test_kernels.py, whose import sets it up) and must equal the torch path.
"""
from __future__ import annotations

import pytest
import torch

from moebal.dispatch import combine_rows, dispatch_rows
from moebal.experts import GroupedExperts
from moebal.plan import build_pair_plan, slots_from_pairs
from test_kernels import CUDA, DEVICE, ops  # noqa: F401  (imports the kernels for the interpreter)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pairs(T, E, density, seed, shuffle=True):
    """Distinct (token, expert) pairs, each present with probability ``density``, in a random order."""
    g = _gen(seed)
    keep_TE = torch.rand(T, E, generator=g) < density
    t_N, e_N = keep_TE.nonzero(as_tuple=True)
    if shuffle:
        perm = torch.randperm(t_N.numel(), generator=g)
        t_N, e_N = t_N[perm], e_N[perm]
    w_N = torch.rand(t_N.numel(), generator=g, dtype=torch.float64) + 0.1
    return t_N, e_N, w_N


def _loop_rows(t_N, e_N, E):
    """Per expert, its tokens in token order (the plan's row order)."""
    rows = [[] for _ in range(E)]
    for t, e in sorted(zip(t_N.tolist(), e_N.tolist()), key=lambda p: (p[1], p[0])):
        rows[e].append(t)
    return rows


CASES = [
    # (T, E, density, why)
    (1, 4, 1.0, "one token holding every expert"),
    (12, 5, 0.3, "prime E, a few pairs per token, some tokens with none"),
    (20, 6, 0.0, "no pairs at all"),
    (16, 4, 0.9, "nearly dense: R close to T*E"),
    (0, 3, 0.5, "zero tokens"),
]


@pytest.mark.parametrize("T,E,density,why", CASES)
def test_pair_plan_invariants_against_a_loop(T, E, density, why):
    t_N, e_N, _ = _pairs(T, E, density, seed=T + E)
    N = t_N.numel()
    indices_TW, pair_TW = slots_from_pairs(t_N, e_N, T)
    # every pair sits in exactly one slot of its own token, slots by increasing expert
    assert indices_TW.shape[0] == T
    used = pair_TW[pair_TW >= 0]
    assert sorted(used.tolist()) == list(range(N))
    for t in range(T):
        got = [int(e) for e in indices_TW[t] if e >= 0]
        assert got == sorted(int(e) for tt, e in zip(t_N.tolist(), e_N.tolist()) if tt == t), why
    assert indices_TW.shape[1] == (max([(t_N == t).sum().item() for t in range(T)], default=0))  # exact width

    plan = build_pair_plan(indices_TW, E)
    rows = _loop_rows(t_N, e_N, E)
    assert plan.num_rows == N, why  # R = the pairs, not T*W
    assert plan.counts_E.tolist() == [len(r) for r in rows]
    assert plan.kept_E.tolist() == plan.counts_E.tolist()
    ends = torch.tensor([len(r) for r in rows]).cumsum(0)
    assert plan.starts_E.tolist() == (ends - torch.tensor([len(r) for r in rows])).tolist()
    assert plan.group_ends_E.tolist() == ends.tolist()
    assert plan.token_of_row_R.tolist() == [t for r in rows for t in r]
    # row_of_pair and pair_of_row are inverse on the used slots
    W = indices_TW.shape[1]
    for r in range(N):
        slot = int(plan.pair_of_row_R[r])
        assert int(plan.row_of_pair_TK.view(-1)[slot]) == r
        assert int(indices_TW.view(-1)[slot]) == next(e for e in range(E) if ends[e] > r)
        assert slot // max(W, 1) == int(plan.token_of_row_R[r])
    assert bool((plan.row_of_pair_TK[indices_TW < 0] == -1).all())


def test_skipped_pairs_and_a_static_width():
    t_N, e_N, _ = _pairs(10, 5, 0.5, seed=3)
    t_N = t_N.clone()
    t_N[::3] = -1  # skipped pairs take no slot
    exact_TW, _ = slots_from_pairs(t_N, e_N, 10)
    wide_TW, _ = slots_from_pairs(t_N, e_N, 10, width=5)  # the static bound E (what torch.compile uses)
    assert int((exact_TW >= 0).sum()) == int((t_N >= 0).sum()) == int((wide_TW >= 0).sum())
    assert torch.equal(wide_TW[:, : exact_TW.shape[1]], exact_TW)
    assert bool((wide_TW[:, exact_TW.shape[1]:] == -1).all())
    a, b = build_pair_plan(exact_TW, 5), build_pair_plan(wide_TW, 5, num_rows=int((t_N >= 0).sum()) + 2)
    assert torch.equal(a.token_of_row_R, b.token_of_row_R[: a.num_rows])
    assert bool((b.token_of_row_R[a.num_rows:] == -1).all())  # spare rows are padding of the last group
    assert b.group_ends_E[-1] == b.num_rows


def _reference(x_TD, t_N, e_N, w_N, W_EDD):
    """float64 loop: y[t] = sum over pairs of w * tanh(x[t] @ W_e)."""
    y = 0.0 * x_TD  # a token without pairs gets zero (and a zero gradient)
    for t, e, w in zip(t_N.tolist(), e_N.tolist(), w_N):
        y[t] = y[t] + w * torch.tanh(x_TD[t] @ W_EDD[e])
    return y


def _plan_forward(x_TD, plan, weights_TW, W_EDD, backend):
    xs = dispatch_rows(x_TD, plan, backend)
    rows = torch.arange(plan.num_rows, device=xs.device)
    expert_R = torch.searchsorted(plan.group_ends_E.long(), rows, right=True).clamp(max=W_EDD.shape[0] - 1)
    ys = torch.tanh(torch.einsum("rd,rdf->rf", xs, W_EDD[expert_R]))
    return combine_rows(ys, plan, weights_TW, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("T,E,density", [(12, 5, 0.3), (9, 4, 1.0), (6, 3, 0.0)])
def test_round_trip_equals_a_float64_loop_with_gradients(T, E, density, backend):
    D = 8
    t_N, e_N, w_N = _pairs(T, E, density, seed=7 * T + E)
    g = _gen(1)
    W_EDD = torch.randn(E, D, D, generator=g, dtype=torch.float64) / D**0.5
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    indices_TW, pair_TW = slots_from_pairs(t_N, e_N, T)
    plan = build_pair_plan(indices_TW.to(DEVICE), E)

    xa, wa = x.clone().requires_grad_(), w_N.clone().requires_grad_()
    want = _reference(xa, t_N, e_N, wa, W_EDD)
    want.backward(torch.ones_like(want))

    xb, wb = x.clone().to(DEVICE).requires_grad_(), w_N.clone().to(DEVICE).requires_grad_()
    pair = pair_TW.to(DEVICE)
    weights_TW = torch.where(pair >= 0, wb[pair.clamp(min=0)] if wb.numel() else torch.zeros_like(pair, dtype=wb.dtype), 0.0)
    got = _plan_forward(xb, plan, weights_TW, W_EDD.to(DEVICE), backend)
    got.backward(torch.ones_like(got))
    torch.testing.assert_close(got.cpu(), want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xb.grad.cpu(), xa.grad, rtol=1e-12, atol=1e-12)
    if w_N.numel():
        torch.testing.assert_close(wb.grad.cpu(), wa.grad, rtol=1e-12, atol=1e-12)


def test_combine_is_deterministic_and_the_grouped_experts_run_the_plan():
    T, E, D = 40, 6, 16
    t_N, e_N, w_N = _pairs(T, E, 0.4, seed=5)
    indices_TW, pair_TW = slots_from_pairs(t_N, e_N, T)
    plan = build_pair_plan(indices_TW, E)
    weights_TW = torch.where(pair_TW >= 0, w_N.float()[pair_TW.clamp(min=0)], 0.0)
    torch.manual_seed(0)
    experts = GroupedExperts(D, 12, E, activation="relu")
    x = torch.randn(T, D, generator=_gen(2))
    runs = [combine_rows(experts(dispatch_rows(x, plan, "torch"), plan), plan, weights_TW, "torch") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # the same experts applied token by token (float64)
    w_in, w_out = experts.w_in_EDH.double(), experts.w_out_EFD.double()
    want = torch.zeros(T, D, dtype=torch.float64)
    for t, e, w in zip(t_N.tolist(), e_N.tolist(), w_N.tolist()):
        want[t] += w * (torch.relu(x[t].double() @ w_in[e]) @ w_out[e])
    torch.testing.assert_close(runs[0].double(), want, rtol=1e-5, atol=1e-5)
