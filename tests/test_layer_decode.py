"""The MoE layer's decode step (moebal.layer_decode): the whole eval forward in one function.

Against a float64 loop over tokens and their experts written here, and bit for bit against
the general path (the decode step switched off); its dispatch plan from host lists against
``build_plan``; and every case that must leave it for the general path (training, a
gradient, a token mask, a tie, a non-finite logit, a capacity, null experts, a selecting
policy, a hook, a router subclass).
"""
import pytest
import torch
import torch.nn.functional as F

import moebal
import moebal.layer as layer_mod
import moebal.layer_decode as LD
from moebal import LossFree, Router
from moebal.plan import build_plan


def _general_forward(moe, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(layer_mod, "decode_forward", lambda *a, **k: None)
        return moe(x), moe.last_stats


def _reference64(moe, x):
    """float64: softmax/sigmoid scores, a stable descending sort, a loop over tokens and experts."""
    r, ex = moe.router, moe.experts
    x_TD = x.reshape(-1, moe.d_model).double()
    logits = x_TD @ r.gate.weight.double().t()
    scores = torch.softmax(logits, -1) if r.score == "softmax" else torch.sigmoid(logits)
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, : r.top_k]
    w = scores.gather(1, idx)
    if r.renormalize:
        w = w / w.sum(-1, keepdim=True)
    w = w * r.scale
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(r.top_k):
            e = int(idx[t, k])
            h = x_TD[t] @ ex.w_in_EDH[e].double()
            if ex.b_in_EH is not None:
                h = h + ex.b_in_EH[e].double()
            gate, up = h.chunk(2) if ex.activation == "swiglu" else (h, None)
            a = F.silu(gate) * up if up is not None else F.gelu(gate)
            o = a @ ex.w_out_EFD[e].double()
            if ex.b_out_ED is not None:
                o = o + ex.b_out_ED[e].double()
            y[t] += w[t, k] * o
    if moe.shared is not None:
        s = F.linear(x_TD, moe.shared.w_in.weight.double())
        gate, up = s.chunk(2, -1)
        s = F.linear(F.silu(gate) * up, moe.shared.w_out.weight.double())
        if moe.shared_gate is not None:
            s = torch.sigmoid(F.linear(x_TD, moe.shared_gate.weight.double())) * s
        y = y + s
    return y.reshape(x.shape), idx


def _applied(moe, x):
    calls = []
    real = LD.decode_forward

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out
    return spy, calls


# (shape, layer kwargs, router kwargs, why)
CASES = [
    ((1, 1, 64), dict(num_experts=16, top_k=2), {}, "one decode token"),
    ((2, 4, 64), dict(num_experts=16, top_k=4), dict(score="sigmoid"), "a [B, S, D] batch, sigmoid"),
    ((7, 64), dict(num_experts=8, top_k=1), dict(renormalize=False, scale=2.0), "top-1 with a scale"),
    ((3, 64), dict(num_experts=5, top_k=5), {}, "K = E"),
    ((5, 64), dict(num_experts=8, top_k=2, num_shared_experts=1, shared_gate=True, ffn_bias=True), {},
     "shared experts with a gate, expert biases"),
    ((40, 64), dict(num_experts=16, top_k=4), {}, "160 pairs: the tensor plan, not the host one"),
]


@pytest.mark.parametrize("shape,kw,rkw,why", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_matches_reference_and_general_path(shape, kw, rkw, why, dtype, monkeypatch):
    torch.manual_seed(0)
    E, K = kw["num_experts"], kw["top_k"]
    moe = moebal.MoE(64, 32, router=Router(64, E, K, **rkw), **kw).eval()
    x = torch.randn(shape)
    with torch.inference_mode():
        y_ref, idx_ref = _reference64(moe, x)
        moe = moe.to(dtype)
        spy, calls = _applied(moe, x)
        monkeypatch.setattr(layer_mod, "decode_forward", spy)
        y = moe(x.to(dtype))
        stats = moe.last_stats
        assert calls == [True], why
        y_gen, stats_gen = _general_forward(moe, x.to(dtype), monkeypatch)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, y_gen), why  # bit for bit the general path
    for f in ("load", "kept", "indices"):
        assert torch.equal(getattr(stats, f), getattr(stats_gen, f)), f
    assert int(stats.nonfinite_tokens) == 0 and int(stats.masked_tokens) == 0 and float(moe.aux_loss) == 0.0
    if dtype == torch.float32:
        assert torch.equal(stats.indices, idx_ref.reshape(-1, K))
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(y.double(), y_ref, rtol=5e-2, atol=5e-2)
    assert torch.equal(stats.load, torch.bincount(idx_ref.reshape(-1), minlength=E))


@pytest.mark.parametrize("T,K,E", [(1, 8, 64), (8, 8, 64), (6, 1, 1), (7, 3, 5), (4, 4, 4)])
def test_host_plan_equals_build_plan(T, K, E):
    torch.manual_seed(T * 100 + E)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    got = LD.host_plan(idx.reshape(-1).tolist(), T, K, E)
    want = build_plan(idx, E)
    for f in ("counts_E", "kept_E", "starts_E", "group_ends_E", "row_of_pair_TK", "pair_of_row_R", "token_of_row_R"):
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and torch.equal(a, b), f
    assert not got.has_drops and got.capacity is None
    # the host bounds it carries are what the expert paths would read back from the tensors
    assert got.host_bounds == list(zip(want.starts_E.tolist(), want.kept_E.tolist(), want.group_ends_E.tolist()))
    assert want.host_bounds is None
    # a loop: row r holds pair order[r], rows grouped by expert in token order
    rows = sorted(range(T * K), key=lambda p: (int(idx.reshape(-1)[p]), p))
    assert got.pair_of_row_R.tolist() == rows


def _leaves(moe, x, monkeypatch):
    spy, calls = _applied(moe, x)
    monkeypatch.setattr(layer_mod, "decode_forward", spy)
    return calls


def test_steps_aside_where_it_does_not_apply(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(4, 32)
    moe = moebal.MoE(32, 16, 8, 2).eval()
    calls = _leaves(moe, x, monkeypatch)
    with torch.no_grad():
        moe(x)  # applies
        moe(x, token_mask=torch.tensor([True, False, True, True]))  # a mask: never called
    moe(x)  # grad mode with parameters requiring grad
    moe.train()
    with torch.no_grad():
        moe(x)
    assert calls == [True, False, False]
    moe.eval()
    for build in (
        lambda: moebal.MoE(32, 16, 8, 2, capacity_factor=1.0),
        lambda: moebal.MoE(32, 16, 8, 2, num_null_experts=2),
        lambda: moebal.MoE(32, 16, 8, 2, router=Router(32, 8, 2, balancer=LossFree())),
        lambda: moebal.MoE(32, 16, 8, 2, router=Router(32, 8, 2, num_groups=4, top_groups=2)),
    ):
        m = build().eval()
        calls.clear()
        with torch.no_grad():
            m(x)
        assert calls == [False]
    hooked = moebal.MoE(32, 16, 8, 2).eval()
    seen = []
    hooked.router.register_forward_hook(lambda mod, a, out: seen.append(out))
    calls.clear()
    with torch.no_grad():
        hooked(x)
    assert calls == [False] and len(seen) == 1  # the hook ran: the router was called as a module

    class MyRouter(Router):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.weights.mul_(0.5)
            return out
    sub = moebal.MoE(32, 16, 8, 2, router=MyRouter(32, 8, 2)).eval()
    calls.clear()
    with torch.no_grad():
        sub(x)
    assert calls == [False]


def test_ties_and_nonfinite_logits_take_the_general_path(monkeypatch):
    moe = moebal.MoE(32, 16, 8, 2).eval()
    calls = _leaves(moe, None, monkeypatch)
    with torch.no_grad():
        moe.router.gate.weight.zero_()  # every score equal: a tie in every token's top K+1
        y_tie = moe(torch.randn(3, 32))
        assert moe.last_stats.indices.tolist() == [[0, 1]] * 3  # the general path breaks ties by index
        torch.manual_seed(2)
        moe.router.gate.reset_parameters()
        x = torch.randn(3, 32)
        x[1, 0] = float("nan")
        moe(x)
        assert int(moe.last_stats.nonfinite_tokens) == 1
    assert calls == [False, False] and torch.isfinite(y_tie).all()


def test_no_tokens_leave_it(monkeypatch):
    moe = moebal.MoE(32, 16, 8, 2).eval()
    calls = _leaves(moe, None, monkeypatch)
    with torch.no_grad():
        y = moe(torch.randn(0, 32))
    assert y.shape == (0, 32) and calls == [False]


def test_token_source_drops_an_all_true_mask_only_without_grad():
    from moebal.hf.tokens import _Frame

    mask = torch.ones(2, 5, dtype=torch.bool)
    frame = _Frame(owner=0, depth=0, mask_BX=mask, ids_BS=None, batch=2, seq=3)
    with torch.no_grad():
        assert frame.tokens(torch.Size([2, 3]))[0] is None
        assert frame.tokens(torch.Size([6]))[0] is None
        with pytest.raises(ValueError, match="token shape"):
            frame.tokens(torch.Size([2, 4]))
    got = frame.tokens(torch.Size([2, 3]))[0]  # grad mode: the mask as it is
    assert got is not None and got.shape == (2, 3) and bool(got.all())
    padded = _Frame(owner=0, depth=0, mask_BX=torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool), ids_BS=None,
                    batch=2, seq=2)
    with torch.no_grad():
        assert padded.tokens(torch.Size([2, 2]))[0].tolist() == [[True, True], [True, True]]
        assert padded.tokens(torch.Size([2, 2]))[0] is not None  # padding somewhere: the mask is kept
