"""moebal.SoftMoE against a float64 hand loop of the paper's formulas, closed forms
(identity experts: ``y = C Dᵀ X``), symmetries (token permutations, identical tokens,
independent groups), padding, and the training setups (checkpointing, bf16, autocast,
copies, compile with varying token counts, zero tokens).

Shape legend: B groups, M tokens per group, D model dim, E experts, S slots per expert,
N = E*S slots.
"""
import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moebal
from moebal.soft_moe import SoftMoE, soft_moe_weights

D, F, E, S = 12, 20, 3, 2  # N = 6 slots; D not a multiple of 16 bytes in fp32: the loop/bmm paths

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    layer = SoftMoE(D, F, E, S, **kw)
    with torch.no_grad():
        layer.scale.fill_(2.5)  # away from its init, so a dropped scale would show
    return layer


def _x(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _reference(layer: SoftMoE, x_MD: torch.Tensor, mask_M=None, identity=False):
    """One group in float64, scalar loops over the formulas: (y [M, D], dispatch [M][N], combine [M][N])."""
    M, N = x_MD.shape[0], layer.num_slots
    x = x_MD.double()
    phi = layer.phi_DN.detach().double()
    scale = float(layer.scale.detach())
    keep = [True] * M if mask_M is None else [bool(v) for v in mask_M]
    logit = [[0.0] * N for _ in range(M)]
    for m in range(M):
        xn = math.sqrt(sum(float(x[m, d]) ** 2 for d in range(D)))
        for n in range(N):
            pn = math.sqrt(sum(float(phi[d, n]) ** 2 for d in range(D)))
            dot = sum(float(x[m, d]) * float(phi[d, n]) for d in range(D))
            logit[m][n] = scale * dot / (max(xn, 1e-6) * max(pn, 1e-6))
    disp = [[0.0] * N for _ in range(M)]
    for n in range(N):
        z = sum(math.exp(logit[m][n]) for m in range(M) if keep[m])
        for m in range(M):
            disp[m][n] = math.exp(logit[m][n]) / z if keep[m] else 0.0
    comb = [[math.exp(logit[m][n]) / sum(math.exp(v) for v in logit[m]) for n in range(N)] for m in range(M)]
    d_t = torch.tensor(disp, dtype=torch.float64)
    c_t = torch.tensor(comb, dtype=torch.float64)
    slots = torch.zeros(N, D, dtype=torch.float64)
    for n in range(N):
        for m in range(M):
            slots[n] += disp[m][n] * x[m]
    if not identity:
        w_in = layer.experts.w_in_EDH.detach().double()
        w_out = layer.experts.w_out_EFD.detach().double()
    outs = torch.zeros(N, D, dtype=torch.float64)
    for n in range(N):
        if identity:
            outs[n] = slots[n]
            continue
        e = n // layer.slots_per_expert  # slot n belongs to expert n // S
        h = slots[n] @ w_in[e]
        gate, up = h[:F], h[F:]
        outs[n] = (gate * torch.sigmoid(gate) * up) @ w_out[e]
    y = torch.zeros(M, D, dtype=torch.float64)
    for m in range(M):
        if keep[m]:
            for n in range(N):
                y[m] += comb[m][n] * outs[n]
    return y, d_t, c_t


class _Identity(nn.Module):
    def forward(self, xs_RD, plan):
        return xs_RD


def test_forward_equals_a_float64_loop_and_weights_are_stochastic():
    layer = _layer().double()
    x = _x(2, 7, dtype=torch.float64)  # two groups of 7 tokens
    y = layer(x)
    for b in range(2):
        want, disp, comb = _reference(layer, x[b])
        torch.testing.assert_close(y[b], want, rtol=1e-10, atol=1e-12)
        got_d, got_c = soft_moe_weights(x[b:b + 1], layer.phi_DN, layer.scale)
        torch.testing.assert_close(got_d[0], disp, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got_c[0], comb, rtol=1e-10, atol=1e-13)
        # dispatch columns sum to 1 over tokens, combine rows to 1 over slots
        torch.testing.assert_close(got_d[0].sum(0), torch.ones(E * S, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(got_c[0].sum(1), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-12)
    # the fp32 module's weights sum to 1 at fp32 accuracy too
    got_d, got_c = soft_moe_weights(x.float(), layer.phi_DN.float(), layer.scale.float())
    assert got_d.dtype == torch.float32
    torch.testing.assert_close(got_d.sum(1), torch.ones(2, E * S), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_c.sum(2), torch.ones(2, 7), rtol=0, atol=1e-6)


def test_identity_experts_give_the_closed_form():
    layer = _layer().double()
    layer.experts = _Identity()
    x = _x(9, dtype=torch.float64)  # [T, D]: one group
    _, disp, comb = _reference(layer, x, identity=True)
    want = comb @ (disp.T @ x)  # y = C (D^T X)
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-12)


def test_permuting_tokens_permutes_outputs():
    layer = _layer()
    x = _x(2, 11)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], rtol=1e-5, atol=1e-6)


def test_identical_tokens_get_identical_outputs():
    layer = _layer()
    x = _x(1, 1).expand(1, 6, D).contiguous()
    y = layer(x)
    torch.testing.assert_close(y, y[:, :1].expand_as(y), rtol=1e-6, atol=1e-7)


def test_groups_are_independent_and_a_flat_input_is_one_group():
    layer = _layer()
    x = _x(3, 5)
    y = layer(x)
    for b in range(3):
        torch.testing.assert_close(y[b], layer(x[b]), rtol=1e-5, atol=1e-6)
    # [T, D] mixes all T tokens: not the same as three groups
    assert not torch.allclose(layer(x.reshape(15, D)), y.reshape(15, D), atol=1e-4)


def test_padding_gets_no_dispatch_weight_and_cannot_move_real_outputs():
    layer = _layer().double()
    x = _x(2, 8, dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, :2] = False
    disp, _ = soft_moe_weights(x, layer.phi_DN, layer.scale, mask)
    assert torch.equal(disp[~mask], torch.zeros_like(disp[~mask]))  # exactly zero
    y = layer(x, token_mask=mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    # the real tokens alone give the same outputs, whatever the padding holds
    torch.testing.assert_close(y[0, :5], layer(x[0, :5]), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(y[1, 2:], layer(x[1, 2:]), rtol=1e-6, atol=1e-9)
    x2 = x.clone()
    x2[~mask] = 1e3
    torch.testing.assert_close(layer(x2, token_mask=mask), y, rtol=0, atol=1e-12)
    want, _, _ = _reference(layer, x[0], mask[0])
    torch.testing.assert_close(y[0], want, rtol=1e-10, atol=1e-12)
    # a group of padding only: zero output, finite gradients
    full = torch.zeros(1, 4, dtype=torch.bool)
    xg = _x(1, 4).requires_grad_()
    out = _layer()(xg, token_mask=full)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("shape", [(0,), (0, 5), (2, 0)])  # T = 0; no group; groups of no token
def test_zero_tokens(shape):
    layer = _layer()
    x = _x(*shape).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.last_stats.num_tokens == 0


def test_gradients_reach_every_parameter_and_match_float64():
    layer = _layer()
    ref = copy.deepcopy(layer).double()
    x = _x(2, 6)
    layer(x).square().sum().backward()
    ref(x.double()).square().sum().backward()
    for (name, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_checkpoint_equals_plain(mode):
    plain, ck = _layer(), _layer()
    x = _x(2, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = plain(xa)
    yb = checkpoint(ck, xb, use_reentrant=(mode == "reentrant"))
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    for (n, p), (_, q) in zip(plain.named_parameters(), ck.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_bf16_cast_and_autocast():
    layer = _layer()
    x = _x(2, 6)
    want = layer(x)
    cast = copy.deepcopy(layer).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in cast.parameters())
    y = cast(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=5e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = layer(x)
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), want, rtol=5e-2, atol=5e-2)
    ya.float().sum().backward()
    assert layer.phi_DN.grad.dtype == torch.float32 and torch.isfinite(layer.phi_DN.grad).all()


def test_deepcopy_state_dict_and_save_round_trip():
    layer = _layer()
    x = _x(2, 5)
    y = layer(x)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone(x), y)
    fresh = SoftMoE(D, F, E, S)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    meta = SoftMoE(D, F, E, S, device="meta")
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert float(meta.scale.detach()) == 1.0 and meta(x).shape == x.shape


def test_compile_fullgraph_dynamic_varying_token_counts():
    from torch._dynamo.utils import counters  # here, not at collection (it imports triton)

    eager = _layer()
    moe = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True, dynamic=True)
    for B, M in ((2, 7), (3, 9), (2, 13), (4, 5)):
        x = _x(B, M, seed=B * M)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moe.phi_DN.grad, eager.phi_DN.grad, rtol=1e-5, atol=1e-6)
        eager.zero_grad(), moe.zero_grad()
    assert counters["stats"]["unique_graphs"] <= 2


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="slots_per_expert must be >= 1, got 0"):
        SoftMoE(D, F, E, 0)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        SoftMoE(D, F, 2.0)
    layer = _layer()
    with pytest.raises(ValueError, match=r"x must have shape"):
        layer(torch.zeros(5, D + 1))
    with pytest.raises(ValueError, match="token_mask must have the shape"):
        layer(_x(2, 3), token_mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_mask must be a bool"):
        layer(_x(2, 3), token_mask=torch.ones(2, 3))


def test_exported():
    assert moebal.SoftMoE is SoftMoE and "SoftMoE" in moebal.__all__
