"""moebal.MoE: equivalences that need no reference, state, and bad input."""
import pytest
import torch
import torch.nn.functional as F

import moebal
from moebal import AuxLoss, LinearAssignment, LossFree, Router


def _dense_swiglu(x, w_in, w_out):
    gate, up = (x @ w_in).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_out


def test_one_expert_top1_equals_dense_ffn():
    torch.manual_seed(0)
    moe = moebal.MoE(16, 24, num_experts=1, top_k=1, router=Router(16, 1, 1, renormalize=True)).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    w_in = moe.experts.w_in_EDH[0].detach().clone().requires_grad_(True)
    w_out = moe.experts.w_out_EFD[0].detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = _dense_swiglu(x2, w_in, w_out)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(moe.experts.w_in_EDH.grad[0], w_in.grad)
    torch.testing.assert_close(moe.experts.w_out_EFD.grad[0], w_out.grad)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("router", ["aux_loss", "loss_free", "base"])
@pytest.mark.parametrize("capacity_factor", [None, 4.0])
def test_identical_experts_equal_one_ffn(router, capacity_factor):
    torch.manual_seed(1)
    E, K = 6, 2
    moe = moebal.MoE(8, 12, E, K, router=router, capacity_factor=capacity_factor).double()
    with torch.no_grad():
        moe.experts.w_in_EDH.copy_(moe.experts.w_in_EDH[:1].expand_as(moe.experts.w_in_EDH))
        moe.experts.w_out_EFD.copy_(moe.experts.w_out_EFD[:1].expand_as(moe.experts.w_out_EFD))
    x = torch.randn(3, 4, 8, dtype=torch.float64)  # T=12, T*K % E == 0 for BASE
    ref = _dense_swiglu(x, moe.experts.w_in_EDH[0], moe.experts.w_out_EFD[0])
    torch.testing.assert_close(moe(x), ref)
    moe.eval()
    torch.testing.assert_close(moe(x), ref)


def test_shared_experts_add_a_dense_ffn():
    torch.manual_seed(2)
    moe = moebal.MoE(8, 6, 4, 2, num_shared_experts=2).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    routed = moebal.MoE(8, 6, 4, 2).double()
    routed.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared.")})
    shared = moe.shared(x)
    assert moe.shared.w_in.weight.shape == (2 * 2 * 6, 8)
    torch.testing.assert_close(moe(x), routed(x) + shared)


def test_gelu_experts_match_loop():
    torch.manual_seed(3)
    E, K = 5, 2
    moe = moebal.MoE(8, 10, E, K, activation="gelu").double()
    x = torch.randn(9, 8, dtype=torch.float64)
    y = moe(x)
    r = moe.router(x)
    ref = torch.zeros_like(x)
    for t in range(9):
        for j in range(K):
            e = int(r.indices[t, j])
            ref[t] += r.weights[t, j] * (F.gelu(x[t] @ moe.experts.w_in_EDH[e]) @ moe.experts.w_out_EFD[e])
    torch.testing.assert_close(y, ref)


def test_output_shape_aux_loss_and_stats():
    torch.manual_seed(4)
    moe = moebal.MoE(16, 32, 8, 2)
    x = torch.randn(2, 7, 16)
    y = moe(x)
    assert y.shape == x.shape
    assert moe.aux_loss.dim() == 0 and moe.aux_loss.item() > 0
    s = moe.last_stats
    assert s.load.dtype == torch.int64 and s.load.shape == (8,)
    assert int(s.load.sum()) == 14 * 2
    assert float(s.dropped_fraction) == 0.0
    moe.eval()
    moe(x)
    assert moe.aux_loss.item() == 0.0  # no balancing loss at eval


def test_aux_loss_value_matches_formula():
    torch.manual_seed(5)
    moe = moebal.MoE(8, 8, 4, 2, router=Router(8, 4, 2, balancer=AuxLoss(alpha=0.5), z_loss=0.1))
    x = torch.randn(20, 8)
    moe(x)
    logits = x @ moe.router.gate.weight.T
    probs = torch.softmax(logits, -1)
    idx = moe.router(x).indices
    f = torch.bincount(idx.flatten(), minlength=4).float() / 40
    ref = 0.5 * 4 * (f * probs.mean(0)).sum() + 0.1 * torch.logsumexp(logits, -1).square().mean()
    assert moe.aux_loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_sequence_variant_uses_sequence_layout():
    torch.manual_seed(6)
    moe = moebal.MoE(8, 8, 4, 1, router=Router(8, 4, 1, balancer=AuxLoss(1.0, variant="sequence")))
    x = torch.randn(3, 5, 8)
    moe(x)
    r = moe.router(x.reshape(-1, 8), seq_len=5)
    ref = sum(
        moebal.functional.switch_aux_loss(r.scores[b * 5:(b + 1) * 5], r.indices[b * 5:(b + 1) * 5], 4) for b in range(3)
    ) / 3
    assert moe.aux_loss.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        moe(torch.randn(6, 8))


def test_capacity_drops_are_counted_not_lost():
    torch.manual_seed(7)
    moe = moebal.MoE(8, 8, 4, 1, capacity_factor=0.5)
    with torch.no_grad():  # all tokens prefer expert 0
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 100
    x = torch.randn(16, 8).abs()
    y = moe(x)
    s = moe.last_stats
    assert s.load.tolist() == [16, 0, 0, 0]
    assert s.kept.tolist() == [2, 0, 0, 0]  # ceil(0.5 * 16 / 4) = 2
    assert float(s.dropped_fraction) == pytest.approx(14 / 16)
    assert (y[2:] == 0).all() and (y[:2] != 0).any()


def test_base_router_is_exactly_balanced_in_training():
    torch.manual_seed(8)
    moe = moebal.MoE(16, 16, 8, 2, router="base")
    with torch.no_grad():
        moe.router.gate.weight[3] += 2.0  # a strongly preferred expert
    x = torch.randn(64, 16) + 1
    moe(x)
    assert float(moe.last_stats.max_violation) == 0.0
    assert moe.last_stats.load.tolist() == [16] * 8
    moe.eval()
    moe(x)
    assert float(moe.last_stats.max_violation) > 0  # greedy at eval
    moe.train()
    with pytest.raises(ValueError):
        moe(torch.randn(63, 16))  # 63 * 2 % 8 != 0


def test_loss_free_bias_buffer_and_counters():
    torch.manual_seed(9)
    moe = moebal.MoE(8, 8, 4, 2, router=Router(8, 4, 2, score="sigmoid", balancer=LossFree(rate=0.1, update="manual")))
    r = moe.router
    assert r.expert_bias.dtype == torch.float32 and r.load_counts.dtype == torch.int64
    x = torch.randn(10, 8)
    moe(x)
    assert int(r.load_counts.sum()) == 20
    with torch.no_grad():
        moe(x)  # no counting under no_grad
    moe.eval()
    moe(x)  # nor at eval
    moe.train()
    assert int(r.load_counts.sum()) == 20
    load = r.load_counts.clone()
    assert moebal.update_biases(moe) == 1
    ref = 0.1 * torch.sign(load.double().mean() - load.double()).float()
    assert torch.equal(r.expert_bias, ref)
    assert int(r.load_counts.sum()) == 0
    # state_dict round trip is bit-exact
    sd = moe.state_dict()
    assert "router.expert_bias" in sd
    moe2 = moebal.MoE(8, 8, 4, 2, router=Router(8, 4, 2, score="sigmoid", balancer=LossFree(rate=0.1, update="manual")))
    moe2.load_state_dict(sd)
    assert torch.equal(moe2.router.expert_bias, r.expert_bias)


def test_loss_free_auto_updates_each_training_step():
    torch.manual_seed(10)
    moe = moebal.MoE(8, 8, 4, 1, router="loss_free")
    assert moe.router.score == "sigmoid"
    x = torch.randn(12, 8)
    idx = moe.router(x).indices  # this training forward already updated the bias
    load = torch.bincount(idx.flatten(), minlength=4)
    ref = 1e-3 * torch.sign(load.double().mean() - load.double()).float()
    assert torch.equal(moe.router.expert_bias, ref)
    assert int(moe.router.load_counts.sum()) == 0


def test_router_math_is_fp32_under_bf16_autocast():
    torch.manual_seed(11)
    moe = moebal.MoE(8, 8, 4, 2)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = moe.router(x)
        y = moe(x)
    assert r.scores.dtype == torch.float32 and r.weights.dtype == torch.float32
    assert y.shape == x.shape


def test_bf16_layer_runs_and_is_close_to_fp32():
    torch.manual_seed(12)
    moe = moebal.MoE(32, 64, 8, 2)
    x = torch.randn(40, 32)
    ref = moe(x)
    y = moe.bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


def test_nonfinite_input_is_flagged_and_visible():
    moe = moebal.MoE(4, 4, 3, 2)
    x = torch.randn(5, 4)
    x[2, 1] = float("nan")
    y = moe(x)
    assert int(moe.last_stats.nonfinite_tokens) == 1
    assert int(moe.last_stats.load.sum()) == 10  # the NaN token is still routed, not lost
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=5), ValueError, "top_k"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(num_experts=2.0), TypeError, "num_experts"),
        (dict(router="sinkhorn"), ValueError, "router"),
        (dict(capacity_factor=0), ValueError, "capacity_factor"),
        (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
        (dict(activation="tanh"), ValueError, "activation"),  # relu is an expert activation now (OPT)
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(num_shared_experts=-1), ValueError, "num_shared_experts"),
        (dict(drop_policy="random"), ValueError, "drop_policy"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    args = dict(d_model=8, d_ff=8, num_experts=4, top_k=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        moebal.MoE(**args)


def test_bad_forward_inputs():
    moe = moebal.MoE(8, 8, 4, 2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        moe(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        moe(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        moe([[0.0] * 8])


def test_router_passed_in_must_match_layer():
    with pytest.raises(ValueError, match="router was built"):
        moebal.MoE(8, 8, 4, 2, router=Router(8, 4, 1))


def test_balancer_configs_validate():
    with pytest.raises(ValueError, match="alpha"):
        AuxLoss(alpha=-1)
    with pytest.raises(ValueError, match="variant"):
        AuxLoss(variant="global")
    with pytest.raises(ValueError, match="update"):
        LossFree(update="sometimes")
    with pytest.raises(ValueError, match="solver"):
        LinearAssignment(solver="greedy")
