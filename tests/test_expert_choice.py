"""Expert choice, its causal variants (position groups, Expert-Threshold) and experts-per-token stats.

References: brute-force selections in Python (sorted by score, ties to the lower token),
float64 loops ``y[t] = sum_e sum_{t in I_e} S_te FFN_e(x_t)`` over the layer's own
weights, the dense softmax mixture, and the EMA of the batch quantile written out by hand.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import moebal
from moebal import ExpertChoice, ExpertThreshold, MoE, Router
from moebal.functional import expert_choice
from moebal.stats import experts_per_token

D, FF, E, K = 16, 12, 6, 2


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer(policy, seed=0, causal=False, dtype=None):
    torch.manual_seed(seed)
    return MoE(D, FF, E, K, router=Router(D, E, K, balancer=policy, dtype=dtype), causal=causal, dtype=dtype)


def _ffn64(moe, e, x_D):
    """Expert e's SwiGLU FFN in float64, written out from its weights."""
    gate, up = (x_D.double() @ moe.experts.w_in_EDH[e].double()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ moe.experts.w_out_EFD[e].double()


def _scores64(moe, x_TD):
    return torch.softmax(x_TD.double() @ moe.router.gate.weight.double().t(), dim=-1)


def _brute_choice(scores_TE, C):
    T, E_ = scores_TE.shape
    s = scores_TE.tolist()
    return [sorted(range(T), key=lambda t: (-s[t][e], t))[:C] for e in range(E_)]


# --- the functional ----------------------------------------------------------------------------


@pytest.mark.parametrize("T,E_,C,levels", [
    (10, 4, 3, None),  # distinct scores
    (12, 5, 4, (0.1, 0.3, 0.3, 0.7)),  # many ties: the lower token index wins
    (5, 3, 5, None),  # C = T: every expert takes every token
    (7, 2, 0, None),  # C = 0: nothing chosen
])
def test_expert_choice_matches_brute_force(T, E_, C, levels):
    g = _gen(T * 10 + E_)
    if levels is None:
        scores = torch.rand(T, E_, generator=g)
    else:
        scores = torch.tensor(levels)[torch.randint(len(levels), (T, E_), generator=g)]
    tokens_EC, weights_EC = expert_choice(scores, C)
    assert tokens_EC.shape == (E_, C) and tokens_EC.dtype == torch.int64
    assert tokens_EC.tolist() == _brute_choice(scores, C)
    for e in range(E_):
        assert len(set(tokens_EC[e].tolist())) == C  # C distinct tokens per expert
        assert weights_EC[e].tolist() == [scores[t, e].item() for t in tokens_EC[e].tolist()]


def test_expert_choice_rejects_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        expert_choice(torch.rand(4, 3), 5)
    with pytest.raises(ValueError, match="scores"):
        expert_choice(torch.rand(4), 1)
    with pytest.raises(ValueError, match="group"):
        ExpertChoice(group="sequence")
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoice(capacity_factor=0)
    with pytest.raises(ValueError, match="renormalize"):
        Router(D, E, K, balancer=ExpertChoice(), renormalize=True)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(D, FF, E, K, router=Router(D, E, K, balancer=ExpertChoice()), capacity_factor=1.0)


# --- the layer ---------------------------------------------------------------------------------


def _reference(moe, x_TD, C):
    S = _scores64(moe, x_TD)
    y = torch.zeros(x_TD.shape[0], D, dtype=torch.float64)
    chosen = _brute_choice(S, C)
    for e, toks in enumerate(chosen):
        for t in toks:
            y[t] += S[t, e] * _ffn64(moe, e, x_TD[t])
    return y, chosen


@pytest.mark.parametrize("factor", [1.0, 0.5, 2.0])
def test_layer_equals_the_float64_expert_choice_sum(factor):
    moe = _layer(ExpertChoice(factor))
    T = 30
    x = torch.randn(T, D, generator=_gen(1))
    y = moe(x)
    C = min(T, math.ceil(factor * T * K / E))
    want, chosen = _reference(moe, x, C)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert moe.last_stats.load.tolist() == [C] * E  # perfect balance by construction
    counts = [sum(t in toks for toks in chosen) for t in range(T)]
    assert sum(counts) == E * C  # per-token counts sum to E*C
    ept = moe.last_stats.experts_per_token
    assert (int(ept.min), int(ept.max)) == (min(counts), max(counts))
    assert float(ept.zero_share) == pytest.approx(counts.count(0) / T)


def test_permutation_equivariance():
    moe = _layer(ExpertChoice(1.0))
    x = torch.randn(24, D, generator=_gen(2))
    perm = torch.randperm(24, generator=_gen(3))
    torch.testing.assert_close(moe(x[perm]), moe(x)[perm], rtol=1e-6, atol=1e-6)


def test_capacity_of_every_token_is_the_dense_softmax_mixture():
    moe = _layer(ExpertChoice(E / K))  # C = T: each expert takes every token
    x = torch.randn(17, D, generator=_gen(4))
    S = _scores64(moe, x)
    want = torch.stack([sum(S[t, e] * _ffn64(moe, e, x[t]) for e in range(E)) for t in range(17)])
    torch.testing.assert_close(moe(x).double(), want, rtol=1e-5, atol=1e-5)
    assert float(moe.last_stats.experts_per_token.min) == E


def _changes_before(moe, x_BSD, j):
    """Max |change| of the outputs at positions < j of sequence 0 when its token j changes."""
    y0 = moe(x_BSD)
    x1 = x_BSD.clone()
    x1[0, j] = 8.0 * moe.router.gate.weight[0].detach() / moe.router.gate.weight[0].detach().norm()  # j wants expert 0
    y1 = moe(x1)
    return (y1[0, :j] - y0[0, :j]).abs().max().item()


def test_leakage_probe_expert_choice_leaks_threshold_and_positions_do_not():
    x = torch.randn(4, 10, D, generator=_gen(5))
    leaky = _layer(ExpertChoice(1.0, allow_future=True), causal=True)
    # one sequence: the token that the last one displaces from expert 0 is an earlier one of it
    assert _changes_before(leaky, x[:1], 9) > 1e-3

    by_position = _layer(ExpertChoice(1.0, group="position"), causal=True)
    assert _changes_before(by_position, x, 9) == 0.0

    threshold = _layer(ExpertThreshold(decay=0.5), causal=True)
    for _ in range(3):  # set the thresholds from training batches
        threshold(torch.randn(4, 10, D, generator=_gen(6))).sum().backward()
    assert int(threshold.router.threshold_steps) == 3
    for mode in ("train", "eval"):
        threshold.train(mode == "train")
        with torch.no_grad():  # routes like training but moves no state
            assert _changes_before(threshold, x, 9) == 0.0
    assert int(threshold.router.threshold_steps) == 3


def test_causal_data_is_refused_unless_asked():
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match="later tokens"):
        _layer(ExpertChoice(), causal=True)(x)
    _layer(ExpertChoice(allow_future=True), causal=True)(x)
    _layer(ExpertChoice(), causal=False)(x)  # an encoder
    with pytest.raises(ValueError, match="sequence input"):
        _layer(ExpertChoice(group="position"))(torch.randn(10, D))


def test_position_groups_choose_among_the_same_position():
    moe = _layer(ExpertChoice(1.0, group="position"), causal=True)
    B, S = 6, 4
    x = torch.randn(B, S, D, generator=_gen(7))
    y = moe(x)
    C = math.ceil(B * K / E)
    want = torch.zeros(B, S, D, dtype=torch.float64)
    for s in range(S):
        sub, _ = _reference(moe, x[:, s], C)
        want[:, s] = sub
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert moe.last_stats.load.tolist() == [S * C] * E


# --- Expert-Threshold --------------------------------------------------------------------------


def test_thresholds_are_the_bias_corrected_ema_of_the_batch_quantile():
    decay = 0.8
    moe = _layer(ExpertThreshold(capacity_factor=1.0, decay=decay))
    T = 20
    C = math.ceil(T * K / E)
    ema = torch.zeros(E, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(T, D, generator=_gen(10 + step))
        S = _scores64(moe, x)
        moe(x).sum().backward()
        q = torch.tensor([sorted(S[:, e].tolist(), reverse=True)[C - 1] for e in range(E)], dtype=torch.float64)
        ema = decay * ema + (1 - decay) * q
        want = ema / (1 - decay ** (step + 1))
        torch.testing.assert_close(moe.router.balancer.thresholds(moe.router).double(), want, rtol=1e-5, atol=1e-6)
    # routing passes a token to e iff its score reaches e's threshold
    x = torch.randn(T, D, generator=_gen(20))
    tau = moe.router.balancer.thresholds(moe.router).double()
    S = _scores64(moe, x)
    moe.eval()
    y = moe(x)
    want = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for e in range(E):
            if S[t, e] >= tau[e]:
                want[t] += S[t, e] * _ffn64(moe, e, x[t])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_threshold_before_any_update_is_top_k_token_choice():
    moe = _layer(ExpertThreshold())
    x = torch.randn(9, D, generator=_gen(21))
    S = _scores64(moe, x)
    with torch.no_grad():
        y = moe(x)
    want = torch.stack([sum(S[t, e] * _ffn64(moe, e, x[t]) for e in S[t].topk(K).indices.tolist()) for t in range(9)])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert int(moe.router.threshold_steps) == 0


def _run(moe, x, mode):
    x = x.clone().requires_grad_()
    if mode == "plain":
        y = moe(x)
    else:
        y = checkpoint(moe, x, use_reentrant=mode == "reentrant")
    y.square().mean().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("policy", [ExpertChoice(1.0), ExpertThreshold(decay=0.5)], ids=["ec", "et"])
def test_checkpointed_steps_equal_plain_steps_and_thresholds_move_once(policy, mode):
    plain, ckpt = _layer(policy), _layer(policy)
    for step in range(3):
        x = torch.randn(24, D, generator=_gen(30 + step))
        y0, g0 = _run(plain, x, "plain")
        y1, g1 = _run(ckpt, x, mode)
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7)
        for (n, p0), p1 in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-6, atol=1e-7, msg=n)
    if isinstance(policy, ExpertThreshold):
        assert int(ckpt.router.threshold_steps) == 3
        assert torch.equal(ckpt.router.threshold_ema, plain.router.threshold_ema)


@pytest.mark.parametrize("policy", [ExpertChoice(1.0), ExpertThreshold()], ids=["ec", "et"])
def test_bf16_model_keeps_state_fp32_and_state_round_trips(policy):
    moe = _layer(policy)
    moe(torch.randn(12, D)).sum().backward()
    moe = moe.to(torch.bfloat16)
    y = moe(torch.randn(12, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    if isinstance(policy, ExpertThreshold):
        assert moe.router.threshold_ema.dtype == torch.float32
        assert moe.router.threshold_steps.dtype == torch.int64
        assert int(moe.router.threshold_steps) == 2
        copy_ = copy.deepcopy(moe)
        assert torch.equal(copy_.router.threshold_ema, moe.router.threshold_ema)
        fresh = _layer(policy, seed=1)
        fresh.load_state_dict(moe.float().state_dict())
        assert torch.equal(fresh.router.threshold_ema, moe.router.threshold_ema)
        assert int(fresh.router.threshold_steps) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _layer(policy)(torch.randn(12, D)).dtype == torch.bfloat16


@pytest.mark.parametrize("policy", [ExpertChoice(1.0), ExpertThreshold()], ids=["ec", "et"])
def test_zero_tokens_and_padding(policy):
    moe = _layer(policy)
    y = moe(torch.randn(0, D))
    assert y.shape == (0, D)
    assert moe.last_stats.load.sum() == 0
    x = torch.randn(3, 8, D, generator=_gen(40))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 2:] = False
    y = moe(x, token_mask=mask)
    assert bool((y[~mask] == 0).all())
    assert bool((moe.last_stats.indices[~mask.reshape(-1)] == -1).all())  # padding never chosen
    ept = moe.last_stats.experts_per_token
    real = (moe.last_stats.indices[mask.reshape(-1)] >= 0).sum(1)
    assert (int(ept.min), int(ept.max)) == (int(real.min()), int(real.max()))


def test_expert_choice_padding_takes_no_seat():
    # with T rows and fewer real tokens than C, experts leave seats empty rather than take padding
    moe = _layer(ExpertChoice(3.0))
    x = torch.randn(12, D, generator=_gen(41))
    mask = torch.zeros(12, dtype=torch.bool)
    mask[:4] = True
    moe(x, token_mask=mask)
    assert moe.last_stats.load.tolist() == [4] * E  # C = min(12, 12) but only 4 real tokens


@pytest.mark.parametrize("policy", [ExpertChoice(1.0), ExpertChoice(1.0, group="position"), ExpertThreshold(decay=0.5)],
                         ids=["ec", "ec_position", "et"])
def test_compiled_layer_equals_eager_for_varying_token_counts(policy):
    eager = _layer(policy)
    moe = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True, dynamic=True)
    for B in (3, 5, 8):
        x = torch.randn(B, 4, D, generator=_gen(50 + B))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(moe.last_stats.load, eager.last_stats.load)
    if isinstance(policy, ExpertThreshold):
        assert int(moe.router.threshold_steps) == 3
        torch.testing.assert_close(moe.router.threshold_ema, eager.router.threshold_ema, rtol=1e-6, atol=0)


def test_experts_per_token_statistic_against_a_loop():
    idx = torch.tensor([[0, 2, -1], [-1, -1, -1], [1, 3, 4], [5, -1, -1]])
    mask = torch.tensor([True, True, True, False])
    ept = experts_per_token(idx, mask)
    assert (int(ept.min), int(ept.max)) == (0, 3)
    assert float(ept.mean) == pytest.approx(5 / 3)
    assert float(ept.zero_share) == pytest.approx(1 / 3)
    empty = experts_per_token(torch.zeros(0, 2, dtype=torch.int64))
    assert (int(empty.min), int(empty.max), float(empty.zero_share)) == (0, 0, 0.0)
    assert moebal.stats.BalanceStats(torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64), 2, 1,
                                     indices=idx[:2]).to_dict()["zero_expert_share"] == 0.5
