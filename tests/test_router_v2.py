"""Router v2: composed policies, loss-free variants, token masks, null experts (issue 13).

References are independent: float64 formulas, runs on the kept tokens alone, a layer
without null experts evaluated by a loop.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import moebal
from moebal import functional as F
from moebal.router import Router


def _pair(router_a: Router, router_b: Router) -> None:
    router_b.gate.weight.data.copy_(router_a.gate.weight.data)


# --- composition ----------------------------------------------------------------------------


def test_deepseek_v3_recipe_composes_and_each_part_matches_its_single_policy():
    torch.manual_seed(0)
    both = Router(16, 8, 2, score="sigmoid", balancer=(moebal.LossFree(1e-3), moebal.AuxLoss(1e-4, "sequence")))
    lf = Router(16, 8, 2, score="sigmoid", balancer=moebal.LossFree(1e-3))
    aux = Router(16, 8, 2, score="sigmoid", balancer=moebal.AuxLoss(1e-4, "sequence"))
    _pair(both, lf), _pair(both, aux)
    for step in range(4):
        x = torch.randn(24, 16)
        rb, rl = both(x, seq_len=6), lf(x, seq_len=6)
        assert torch.equal(rb.indices, rl.indices)  # the bias decides, as in the loss-free router alone
        assert torch.equal(both.expert_bias, lf.expert_bias)
        # the sequence loss is the aux-only router's loss at the same (biased) selection
        aux_alone = 1e-4 * F.sequence_aux_loss(torch.softmax(torch.nn.functional.logsigmoid(x @ both.gate.weight.t()), -1), rb.indices, 8, 6)
        torch.testing.assert_close(rb.aux_loss, aux_alone, rtol=1e-6, atol=0)
    assert both.expert_bias.abs().sum() > 0
    assert both.policy(moebal.LossFree) is both.balancer[0] and both.policy(moebal.LinearAssignment) is None


def test_composed_losses_add_up():
    torch.manual_seed(1)
    z = Router(8, 4, 2, balancer=(moebal.AuxLoss(1e-2, "batch"),), z_loss=1e-3)
    a = Router(8, 4, 2, balancer=moebal.AuxLoss(1e-2, "batch"))
    b = Router(8, 4, 2, z_loss=1e-3)
    _pair(z, a), _pair(z, b)
    x = torch.randn(32, 8)
    torch.testing.assert_close(z(x).aux_loss, a(x).aux_loss + b(x).aux_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "balancer, match",
    [
        ((moebal.LossFree(), moebal.LinearAssignment()), "at most one"),
        ((moebal.AuxLoss(), moebal.AuxLoss(1e-3, "sequence")), "once"),
        (("aux",), "policy"),
        (42, "policy"),
    ],
)
def test_bad_balancer_is_refused(balancer, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Router(8, 4, 2, balancer=balancer)


def test_setting_balancer_keeps_shared_state_and_drops_the_rest():
    r = Router(8, 4, 2, balancer=moebal.LossFree())
    r.expert_bias.fill_(0.5)
    r.balancer = moebal.LossFree(update="manual")
    assert r.expert_bias.tolist() == [0.5] * 4
    r.balancer = moebal.AuxLoss()
    assert r.expert_bias is None and "expert_bias" not in r.state_dict()
    r.balancer = moebal.HashRouting("round_robin", num_buckets=10)
    assert r.state_dict()["hash_table"].shape == (10, 2)
    r.balancer = None
    assert "hash_table" not in r.state_dict() and not hasattr(r, "hash_table")


# --- loss-free variants ---------------------------------------------------------------------


def test_proportional_and_centred_updates_match_the_formulas():
    b = torch.tensor([0.1, -0.2, 0.0, 0.3])
    c = torch.tensor([10, 30, 20, 40])
    mean, total = 25.0, 100.0
    want = [bi + 0.5 * (mean - ci) / total for bi, ci in zip(b.tolist(), c.tolist())]
    torch.testing.assert_close(F.loss_free_update(b, c, 0.5, rule="proportional"), torch.tensor(want))
    step = [0.01 * math.copysign(1.0, mean - ci) for ci in c.tolist()]
    centred = [bi + s - sum(step) / 4 for bi, s in zip(b.tolist(), step)]
    torch.testing.assert_close(F.loss_free_update(b, c, 0.01, center=True), torch.tensor(centred))
    assert F.loss_free_update(b, torch.zeros(4, dtype=torch.int64), 1.0, rule="proportional").tolist() == b.tolist()
    with pytest.raises(ValueError, match="rule"):
        F.loss_free_update(b, c, 0.1, rule="median")


@pytest.mark.parametrize("rule", ["sign", "proportional"])
def test_centring_leaves_routing_bit_identical(rule):
    torch.manual_seed(2)
    plain = Router(8, 6, 2, score="sigmoid", balancer=moebal.LossFree(0.05, rule=rule))
    centred = Router(8, 6, 2, score="sigmoid", balancer=moebal.LossFree(0.05, rule=rule, center=True))
    _pair(plain, centred)
    for _ in range(20):
        x = torch.randn(40, 8) + 0.5
        assert torch.equal(plain(x).indices, centred(x).indices)
        assert abs(float(centred.expert_bias.double().sum())) < 1e-5
        shift = plain.expert_bias - centred.expert_bias
        torch.testing.assert_close(shift, shift.mean().expand(6), rtol=0, atol=1e-5)


def test_proportional_step_catches_up_where_the_sign_step_cannot():
    # a skewed gate: the sign step moves each bias by u per step, the proportional one by the gap
    torch.manual_seed(3)
    x = torch.randn(4096, 8)
    w = torch.randn(8, 8) * 0.3
    w[0] += 1.0  # expert 0 draws most tokens
    vio = {}
    for rule, rate in (("sign", 1e-3), ("proportional", 1.0)):
        r = Router(8, 8, 2, score="sigmoid", balancer=moebal.LossFree(rate, rule=rule))
        r.gate.weight.data.copy_(w)
        for _ in range(50):
            r(x[torch.randint(0, 4096, (512,))])
        load = moebal.stats.expert_load(r(x).indices, 8)
        vio[rule] = float(moebal.stats.max_violation(load))
    assert vio["proportional"] < 0.5 * vio["sign"], vio


def test_bad_loss_free_arguments():
    with pytest.raises(ValueError, match="rule"):
        moebal.LossFree(rule="median")
    with pytest.raises(TypeError, match="center"):
        moebal.LossFree(center=1)
    with pytest.raises(ValueError, match="null experts"):
        Router(8, 4, 2, balancer=moebal.LossFree(real_per_token=1.0))


def test_real_per_token_target_moves_the_null_share():
    torch.manual_seed(4)
    r = Router(8, 4, 2, score="sigmoid", num_null_experts=2,
               balancer=moebal.LossFree(0.5, rule="proportional", real_per_token=1.5))
    x = torch.randn(2048, 8)
    for _ in range(200):
        r(x[torch.randint(0, 2048, (256,))])
    real = (r(x).indices < 4).sum(-1).double().mean()
    assert abs(float(real) - 1.5) < 0.1


# --- token masks ----------------------------------------------------------------------------


def _masked_batch(seed=5, B=3, S=8, D=16):
    torch.manual_seed(seed)
    x = torch.randn(B, S, D)
    lengths = [8, 5, 2]
    mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask, lengths


@pytest.mark.parametrize("router", ["aux_loss", "loss_free", "seq", "z"])
def test_masked_tokens_change_nothing_for_the_kept_ones(router):
    x, mask, lengths = _masked_batch()
    balancer = {"aux_loss": moebal.AuxLoss(), "loss_free": moebal.LossFree(0.1, update="manual"), "seq": moebal.AuxLoss(1e-2, "sequence"), "z": None}[router]
    make = lambda: moebal.MoE(16, 24, 4, 2, backend="torch", router=Router(16, 4, 2, balancer=balancer, z_loss=1e-3 if router == "z" else 0.0))  # noqa: E731
    torch.manual_seed(6)
    moe = make()
    alone = copy.deepcopy(moe)
    y = moe(x, token_mask=mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    load = torch.zeros(4, dtype=torch.int64)
    ys, auxes = [], []
    for b, n in enumerate(lengths):
        ys.append(alone(x[b:b + 1, :n])[0])
        load += alone.last_stats.load
        auxes.append(alone.aux_loss)
    assert torch.equal(moe.last_stats.load, load)
    assert int(moe.last_stats.masked_tokens) == int((~mask).sum())
    for b, n in enumerate(lengths):
        torch.testing.assert_close(y[b, :n], ys[b], rtol=1e-5, atol=1e-6)
    if router == "seq":  # the sequence loss averages the sequences
        torch.testing.assert_close(moe.aux_loss, sum(auxes) / 3, rtol=1e-5, atol=0)
    if router == "loss_free":  # one update from the kept tokens' counts
        assert torch.equal(moe.router.load_counts, load)
        moebal.update_biases(moe)
        ref = F.loss_free_update(torch.zeros(4), load, 0.1)
        torch.testing.assert_close(moe.router.expert_bias, ref)


def test_masked_aux_loss_equals_the_kept_tokens_alone():
    x, mask, _ = _masked_batch()
    torch.manual_seed(7)
    r = Router(16, 4, 2, balancer=moebal.AuxLoss(1e-2), z_loss=1e-3)
    kept = x[mask]
    torch.testing.assert_close(r(x.reshape(-1, 16), token_mask=mask.reshape(-1)).aux_loss, r(kept).aux_loss, rtol=1e-6, atol=0)


def test_masked_tokens_take_no_assignment_seat():
    x, mask, _ = _masked_batch(S=8)
    mask[2, :] = True
    mask[1, :] = False  # 16 kept tokens: 16*2 % 4 == 0, the kept tokens alone are exactly balanced
    torch.manual_seed(8)
    r = Router(16, 4, 2, balancer=moebal.LinearAssignment())
    got = r(x.reshape(-1, 16), token_mask=mask.reshape(-1))
    want = r(x[mask])
    assert torch.equal(got.indices[mask.reshape(-1)], want.indices)
    assert (got.indices[~mask.reshape(-1)] == -1).all()
    mask[2, 7] = False  # 15 kept tokens: 30 pairs over 4 experts, none above the block of 32/4
    got = r(x.reshape(-1, 16), token_mask=mask.reshape(-1))
    load = moebal.stats.expert_load(got.indices, 4)
    assert int(load.sum()) == 30 and int(load.max()) <= 8


def test_token_mask_is_checked():
    moe = moebal.MoE(8, 8, 4, 2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="token_mask"):
        moe(x, token_mask=torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="token_mask"):
        moe(x, token_mask=torch.ones(6, dtype=torch.bool))


def test_all_masked_and_empty_batches_give_zero_not_nan():
    moe = moebal.MoE(8, 8, 4, 2, router=Router(8, 4, 2, balancer=moebal.AuxLoss(1e-2, "sequence"), z_loss=1e-3))
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = moe(x, token_mask=torch.zeros(2, 3, dtype=torch.bool))
    (y.sum() + moe.aux_loss).backward()
    assert float(moe.aux_loss.detach()) == 0.0 and torch.equal(y, torch.zeros_like(y))
    assert torch.isfinite(x.grad).all()
    y0 = moe(torch.randn(0, 8), token_mask=torch.zeros(0, dtype=torch.bool))
    assert y0.shape == (0, 8)


# --- null experts ---------------------------------------------------------------------------


def _reference(moe: moebal.MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """float64 loop: sum over real picks of w * expert(x), plus w * x for identity null picks."""
    routing = moe.router(x_TD)
    w_in, w_out = moe.experts.w_in_EDH.double(), moe.experts.w_out_EFD.double()
    out = torch.zeros(x_TD.shape, dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        for k in range(moe.top_k):
            e, w = int(routing.indices[t, k]), float(routing.weights[t, k])
            xt = x_TD[t].double()
            if e >= moe.num_experts:
                out[t] += w * xt if moe.null_expert == "identity" else 0.0
                continue
            h = xt @ w_in[e]
            gate, up = h.chunk(2)
            out[t] += w * ((torch.nn.functional.silu(gate) * up) @ w_out[e])
    return out


@pytest.mark.parametrize("kind", ["zero", "identity"])
def test_null_experts_contribute_exactly_their_definition(kind):
    torch.manual_seed(9)
    moe = moebal.MoE(8, 12, 4, 2, backend="torch", num_null_experts=3, null_expert=kind).eval()
    x = torch.randn(40, 8)
    y = moe(x)
    torch.testing.assert_close(y.double(), _reference(moe, x), rtol=1e-5, atol=1e-6)
    stats = moe.last_stats
    nulls = int((moe.router(x).indices >= 4).sum())
    assert nulls > 0 and int(stats.null_pairs) == nulls and int(stats.load.sum()) == 80 - nulls
    assert float(stats.null_fraction) == nulls / 80


def test_a_token_routed_only_to_zero_nulls_outputs_exactly_zero():
    moe = moebal.MoE(8, 12, 2, 2, num_null_experts=2).eval()
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[2:] = 0.0
        moe.router.gate.weight[2, 0] = 10.0
        moe.router.gate.weight[3, 0] = 9.0
    x = torch.zeros(3, 8)
    x[:, 0] = 1.0
    assert torch.equal(moe(x), torch.zeros(3, 8))


def test_null_expert_arguments():
    with pytest.raises(ValueError, match="null_expert"):
        moebal.MoE(8, 8, 4, 2, num_null_experts=1, null_expert="skip")
    r = Router(8, 4, 2, num_null_experts=2)
    with pytest.raises(ValueError, match="num_null_experts"):
        moebal.MoE(8, 8, 4, 2, router=r, num_null_experts=1)
    assert moebal.MoE(8, 8, 4, 2, router=r).router.num_null_experts == 2


def test_a_token_routed_only_to_identity_nulls_outputs_exactly_w_times_x():
    moe = moebal.MoE(8, 12, 2, 2, num_null_experts=2, null_expert="identity", router=Router(8, 2, 2, num_null_experts=2)).eval()
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[2, 0] = 3.0
        moe.router.gate.weight[3, 0] = 2.0
    x = torch.randn(5, 8)
    x[:, 0] = 1.0
    routing = moe.router(x)
    assert (routing.indices >= 2).all()
    w_T1 = routing.weights.sum(-1, keepdim=True)  # renormalised: exactly 1 up to rounding of the sum
    assert torch.equal(moe(x), w_T1 * x)
    torch.testing.assert_close(w_T1, torch.ones(5, 1), rtol=1e-6, atol=0)


def test_named_routers_take_their_options():
    from moebal.router import make_router

    r = make_router("loss_free", 8, 4, 2, rate=1e-2, update="manual", rule="proportional", z_loss=1e-3)
    assert (r.balancer.rate, r.balancer.update, r.balancer.rule, r.z_loss, r.score) == (1e-2, "manual", "proportional", 1e-3, "sigmoid")
    assert make_router("aux_loss", 8, 4, 2, alpha=1e-3, variant="sequence").balancer == moebal.AuxLoss(1e-3, "sequence")
    assert make_router("base", 8, 4, 2, solver="sinkhorn").balancer.solver == "sinkhorn"
    with pytest.raises(TypeError, match=r"\['rat'\].*rate"):
        make_router("loss_free", 8, 4, 2, rat=1e-2)
    with pytest.raises(TypeError, match="named router"):
        make_router(Router(8, 4, 2), 8, 4, 2, rate=1e-2)


def test_masks_and_identity_nulls_under_autocast_match_the_kept_tokens_alone():
    torch.manual_seed(11)
    moe = moebal.MoE(16, 24, 4, 2, backend="torch", num_null_experts=2, null_expert="identity",
                     router=Router(16, 4, 2, num_null_experts=2, balancer=moebal.AuxLoss(1e-2)))
    x, mask, lengths = _masked_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x, token_mask=mask)
        alone = [moe(x[b:b + 1, :n])[0] for b, n in enumerate(lengths)]
    assert y.dtype == torch.bfloat16 and torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    for b, n in enumerate(lengths):
        torch.testing.assert_close(y[b, :n], alone[b], rtol=2e-2, atol=2e-2)
