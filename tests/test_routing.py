"""Routing formulas against closed forms and float64 references."""
import math

import pytest
from hypothesis import given, settings, strategies as st
import torch

from moebal.functional import (
    loss_free_update,
    router_z_loss,
    sequence_aux_loss,
    switch_aux_loss,
    topk_routing,
)


def _tie_free_logits(T, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a random permutation per row scaled apart: no two scores within 1e-3 of each other
    perm = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]).float()
    return perm * 0.37 + 0.001 * torch.rand(T, E, generator=g)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_matches_float64_loop(score, renormalize):
    T, E, K = 64, 9, 3
    logits = _tie_free_logits(T, E)
    w, idx = topk_routing(logits, K, score=score, renormalize=renormalize)
    for t in range(T):
        row = [float(v) for v in logits[t].double()]
        if score == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            s = [v / sum(ex) for v in ex]
        else:
            s = [1 / (1 + math.exp(-v)) for v in row]
        best = sorted(range(E), key=lambda e: -s[e])[:K]
        assert idx[t].tolist() == best
        ref = [s[e] for e in best]
        if renormalize:
            ref = [v / sum(ref) for v in ref]
        torch.testing.assert_close(w[t].double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_ties_break_toward_lower_index():
    logits = torch.zeros(3, 6)
    logits[1, [2, 4]] = 1.0  # a tie between experts 2 and 4 at the top
    w, idx = topk_routing(logits, 3)
    assert idx[0].tolist() == [0, 1, 2]
    assert idx[1].tolist() == [2, 4, 0]
    assert idx[2].tolist() == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 40), E=st.integers(1, 12), data=st.data(),
    levels=st.sampled_from([2, 3, 5, 1000]),  # few distinct values: many ties
)
def test_selection_equals_the_stable_sort(T, E, data, levels):
    # the CPU fast path (topk + tie fallback) against the definition: a stable descending
    # sort, on logits full of ties, -inf and NaN
    K = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (T, E), generator=g).float()
    special = torch.rand(T, E, generator=g)
    logits[special < 0.05] = float("nan")
    logits[(special >= 0.05) & (special < 0.1)] = float("-inf")
    _, idx = topk_routing(logits, K, score="sigmoid", renormalize=False)
    select = torch.nan_to_num(torch.sigmoid(logits), nan=float("-inf"))
    assert torch.equal(idx, torch.sort(select, dim=-1, descending=True, stable=True).indices[:, :K])


def test_bias_moves_selection_not_weights():
    T, E, K = 32, 8, 2
    logits = _tie_free_logits(T, E, seed=1)
    bias = torch.linspace(-3, 3, E)
    w, idx = topk_routing(logits, K, score="sigmoid", bias=bias, renormalize=False)
    s = torch.sigmoid(logits.double())
    # weights are the gathered unbiased scores, whatever the bias
    torch.testing.assert_close(w.double(), s.gather(1, idx), rtol=1e-6, atol=0)
    # selection follows score + bias
    ref_idx = torch.sort(s + bias.double(), dim=-1, descending=True, stable=True).indices[:, :K]
    assert torch.equal(idx, ref_idx)
    # a large bias on one expert forces it into every token's top-k
    big = torch.zeros(E)
    big[5] = 10.0
    _, idx2 = topk_routing(logits, K, score="sigmoid", bias=big)
    assert (idx2 == 5).any(dim=-1).all()


def test_constant_bias_shift_changes_nothing():
    logits = _tie_free_logits(40, 7, seed=2)
    bias = torch.randn(7, generator=torch.Generator().manual_seed(3))
    w1, i1 = topk_routing(logits, 2, score="sigmoid", bias=bias)
    w2, i2 = topk_routing(logits, 2, score="sigmoid", bias=bias + 0.25)
    assert torch.equal(i1, i2) and torch.equal(w1, w2)


def test_nonfinite_logits_route_to_valid_experts():
    logits = torch.randn(4, 5)
    logits[1] = float("nan")
    logits[2, 3] = float("inf")
    w, idx = topk_routing(logits, 2)
    assert ((idx >= 0) & (idx < 5)).all()
    assert idx[1].tolist() == [0, 1]  # all-NaN row: NaN ranks lowest, ties to lower index
    assert torch.isnan(w[1]).all()
    assert torch.isfinite(w[0]).all() and torch.isfinite(w[3]).all()


@pytest.mark.parametrize("bad_k", [0, 6, -1])
def test_topk_rejects_bad_k(bad_k):
    with pytest.raises(ValueError, match="top_k"):
        topk_routing(torch.randn(3, 5), bad_k)


def test_topk_rejects_bad_inputs():
    with pytest.raises(TypeError, match="logits"):
        topk_routing(torch.ones(3, 5, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="score"):
        topk_routing(torch.randn(3, 5), 1, score="relu")
    with pytest.raises(ValueError, match="bias"):
        topk_routing(torch.randn(3, 5), 1, bias=torch.zeros(4))
    with pytest.raises(TypeError, match="top_k"):
        topk_routing(torch.randn(3, 5), 1.0)


@pytest.mark.parametrize("E,K", [(8, 1), (8, 2), (6, 3), (5, 5)])
def test_aux_loss_is_one_under_uniform_routing(E, K):
    T = E * 4
    # each expert gets exactly T*K/E pairs; probs uniform
    idx = torch.stack([(torch.arange(K) + t) % E for t in range(T)])
    probs = torch.full((T, E), 1.0 / E)
    assert switch_aux_loss(probs, idx, E).item() == pytest.approx(1.0, abs=1e-6)
    # balanced f makes the loss sum(P) = 1 for ANY probs whose rows sum to one
    probs = torch.softmax(torch.randn(T, E, generator=torch.Generator().manual_seed(0)), -1)
    assert switch_aux_loss(probs, idx, E).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("E,K", [(8, 1), (8, 2), (16, 4)])
def test_aux_loss_is_E_over_K_under_collapse(E, K):
    T = 32
    idx = torch.arange(K).expand(T, K)
    probs = torch.zeros(T, E)
    probs[:, :K] = 1.0 / K
    assert switch_aux_loss(probs, idx, E).item() == pytest.approx(E / K, rel=1e-6)


def test_aux_loss_matches_float64_formula_and_gradient():
    T, E, K = 50, 6, 2
    logits = torch.randn(T, E, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    probs = torch.softmax(logits, -1)
    idx = torch.randint(0, E, (T, K), generator=torch.Generator().manual_seed(5))
    loss = switch_aux_loss(probs, idx, E)
    f = [sum(int(v == e) for v in idx.flatten().tolist()) / (T * K) for e in range(E)]
    P = probs.detach().mean(0).tolist()
    assert loss.item() == pytest.approx(E * sum(a * b for a, b in zip(f, P)), rel=1e-6)
    loss.backward()
    # d loss / d P_i = E f_i: check through autograd on probs directly
    p = probs.detach().clone().requires_grad_(True)
    switch_aux_loss(p, idx, E).backward()
    torch.testing.assert_close(p.grad, torch.tensor(f, dtype=torch.float64).expand(T, E) * E / T, rtol=1e-5, atol=1e-7)


def test_sequence_loss_equals_batch_loss_for_one_sequence():
    T, E, K = 24, 5, 2
    probs = torch.softmax(torch.randn(T, E), -1)
    idx = torch.randint(0, E, (T, K))
    assert sequence_aux_loss(probs, idx, E, seq_len=T).item() == pytest.approx(switch_aux_loss(probs, idx, E).item(), rel=1e-6)


def test_sequence_loss_is_mean_of_per_sequence_losses():
    B, S, E, K = 3, 10, 4, 2
    probs = torch.softmax(torch.randn(B * S, E), -1)
    idx = torch.randint(0, E, (B * S, K))
    ref = sum(switch_aux_loss(probs[b * S:(b + 1) * S], idx[b * S:(b + 1) * S], E).item() for b in range(B)) / B
    assert sequence_aux_loss(probs, idx, E, seq_len=S).item() == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="seq_len"):
        sequence_aux_loss(probs, idx, E, seq_len=7)


def test_z_loss_closed_form_and_large_logits():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    ref = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(ref, rel=1e-6)
    big = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])
    z = router_z_loss(big)
    assert torch.isfinite(z)
    lse2 = (1e4 ** 2 + (-1e4 + math.log(3)) ** 2) / 2
    assert z.item() == pytest.approx(lse2, rel=1e-6)


def test_loss_free_update_sign_rule():
    bias = torch.zeros(4)
    load = torch.tensor([10, 30, 20, 20])  # mean 20
    new = loss_free_update(bias, load, 0.5)
    assert new.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert new.dtype == torch.float32


def test_loss_free_update_exact_for_large_close_counts():
    # counts near 4e4 that differ by one: mean is 40000.25, so the three 40000s are below
    # it (+rate) and the 40001 above it (-rate); float32 means would get this wrong.
    load = torch.tensor([40000, 40000, 40000, 40001], dtype=torch.int64)
    new = loss_free_update(torch.zeros(4), load, 1e-3)
    assert new.tolist() == pytest.approx([1e-3, 1e-3, 1e-3, -1e-3])
    load = torch.tensor([39999, 40000, 40001], dtype=torch.int64)  # mean exactly 40000
    new = loss_free_update(torch.zeros(3), load, 1e-3)
    assert new.tolist() == pytest.approx([1e-3, 0.0, -1e-3])


def test_loss_free_closed_loop_balances_a_skewed_router():
    """A fixed skewed router driven by the sign update at u=1e-3 balances within 1500 steps."""
    E, K, T = 16, 2, 4096
    g = torch.Generator().manual_seed(0)
    skew = torch.linspace(0, 2.0, E)  # later experts strongly preferred
    bias = torch.zeros(E)
    vios = []
    for step in range(1500):
        logits = torch.randn(T, E, generator=g) * 0.5 + skew
        _, idx = topk_routing(logits, K, score="sigmoid", bias=bias)
        load = torch.zeros(E, dtype=torch.int64).scatter_add_(0, idx.flatten(), torch.ones(T * K, dtype=torch.int64))
        vios.append(((load.max() - load.float().mean()) / load.float().mean()).item())
        bias = loss_free_update(bias, load, 1e-3)
    assert vios[0] > 2.0
    assert sum(vios[-100:]) / 100 < 0.15
