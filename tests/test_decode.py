"""The inference-shaped expert paths ("gemv", "bmm", "onednn") and prepare_decode's layout.

Values and gradients against a float64 per-expert loop written here; the decode layout
against the same loop, its refresh when the weights change, and the layer in the setups
users run inference in (inference_mode, bf16, deepcopy, state_dict, padding masks, T=0).
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import moebal
from moebal import Router
from moebal import decode, expert_paths
from moebal.decode import DecodePack, decode_pack, onednn_supports, prepare_decode, release_decode
from moebal.dispatch import dispatch_rows
from moebal.experts import expert_ffn
from moebal.plan import build_plan

from _routing_cases import random_routing


def _act64(h, activation):
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return gate * torch.sigmoid(gate) * up
    if activation == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    if activation == "relu":
        return h.clamp_min(0)
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _ref(xs, w_in, w_out, b_in, b_out, plan, activation):
    """float64 loop: expert e maps its kept rows; every other row (padding, tail) is zero."""
    ys = torch.zeros(xs.shape[0], w_out.shape[-1], dtype=torch.float64)
    for e in range(w_in.shape[0]):
        s, n = int(plan.starts_E[e]), int(plan.kept_E[e])
        for r in range(s, s + n):
            h = xs[r].double() @ w_in[e].double() + (0 if b_in is None else b_in[e].double())
            ys[r] = _act64(h, activation) @ w_out[e].double() + (0 if b_out is None else b_out[e].double())
    return ys


def _params(E, D, F_, activation, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    H = 2 * F_ if activation in ("swiglu", "geglu") else F_
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / s[-2] ** 0.5 if len(s) > 2 \
        else torch.randn(*s, generator=g, dtype=torch.float64) * 0.1  # noqa: E731
    ps = [mk(E, D, H), mk(E, F_, D)] + ([mk(E, H), mk(E, D)] if bias else [None, None])
    return [p.to(dtype).requires_grad_(True) if p is not None else None for p in ps]


# (T, D, F, E, K, capacity, why)
CASES = [
    (1, 4, 3, 6, 2, None),  # one token: two experts touched, the rest skipped
    (3, 8, 5, 7, 3, None),  # prime E, decode-sized: runs of adjacent experts of mixed lengths
    (13, 9, 6, 5, 5, None),  # K = E: every expert touched, one run, uneven rows padded in the bmm
    (24, 8, 6, 6, 2, 3),  # capacity: drops and padded blocks
    (9, 5, 4, 4, 2, 6),  # capacity above every load: padding rows only
    (0, 8, 4, 4, 2, None),  # T = 0
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ["gemv", "bmm"])
def test_paths_match_float64_loop_values_and_grads(path, case, activation, bias):
    T, D, F_, E, K, cap = case
    idx, _ = random_routing(T, E, K, seed=T + E)
    plan = build_plan(idx, E, cap)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(plan.num_rows, D, generator=g, dtype=torch.float64)
    xs = torch.where((plan.token_of_row_R >= 0).unsqueeze(1), xs, 0.0).requires_grad_(True)
    w_in, w_out, b_in, b_out = _params(E, D, F_, activation, bias, torch.float64, seed=2)
    ys = expert_ffn(xs, w_in, w_out, plan, activation, b_in, b_out, path=path)
    ref = _ref(xs, w_in, w_out, b_in, b_out, plan, activation)
    torch.testing.assert_close(ys, ref, rtol=1e-12, atol=1e-12)
    leaves = [t for t in (xs, w_in, w_out, b_in, b_out) if t is not None]
    gy = torch.randn(ys.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(ys, leaves, gy, allow_unused=True)
    if ref.requires_grad:
        want = torch.autograd.grad(ref, leaves, gy, allow_unused=True)
    else:  # no row reaches an expert (T = 0): every gradient is zero
        want = [torch.zeros_like(t) for t in leaves]
    for a, b in zip(got, want):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


needs_onednn = pytest.mark.skipif(not onednn_supports(torch.float32), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("case", CASES)
def test_onednn_path_matches_float64_loop(case, activation, bias, packed):
    """fp32, with the reordered weights of a decode layout or reordered on the call; capacity
    padding and untouched experts give zero rows."""
    T, D, F_, E, K, cap = case
    idx, _ = random_routing(T, E, K, seed=T + E)
    plan = build_plan(idx, E, cap)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(plan.num_rows, D, generator=g, dtype=torch.float64)
    xs = torch.where((plan.token_of_row_R >= 0).unsqueeze(1), xs, 0.0)
    params = [p.detach() if p is not None else None for p in _params(E, D, F_, activation, bias, torch.float64, 2)]
    w_in, w_out, b_in, b_out = [p.float() if p is not None else None for p in params]
    pack = DecodePack(w_in, w_out, torch.float32) if packed else None
    with torch.inference_mode():
        ys = expert_ffn(xs.float(), w_in, w_out, plan, activation, b_in, b_out, path="onednn", pack=pack)
    ref = _ref(xs, *params[:2], *params[2:], plan, activation)
    assert ys.dtype == torch.float32 and ys.shape == ref.shape
    torch.testing.assert_close(ys.double(), ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_weights_are_made_once_dropped_with_the_pack_and_need_no_grad():
    torch.manual_seed(0)
    moe = moebal.MoE(16, 8, 4, 2, router=Router(16, 4, 2, balancer=None)).eval()
    base = prepare_decode(moe)
    moe.experts.path = "onednn"
    x = torch.randn(5, 16)
    with torch.inference_mode():
        y = moe(x)
        pack = decode_pack(moe.experts, torch.float32)
        made = pack.onednn_weights()
        moe(x)
        assert pack.onednn_weights() is made and len(made[0]) == 4  # one reordered weight per expert
        assert pack.nbytes >= base and pack.nbytes >= moe.experts.w_in_EDH.nbytes  # the reordered copies count
    ema = copy.deepcopy(moe)  # a copy (EMA, a checkpoint by pickling) leaves the reordered weights behind
    pickled = pickle.loads(pickle.dumps(moe))
    ref = copy.deepcopy(moe)
    release_decode(ref)
    ref.experts.path = "loop"
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)
        assert ema.experts._decode_pack._onednn is None
        torch.testing.assert_close(ema(x), y, rtol=0, atol=0)
        torch.testing.assert_close(pickled(x), y, rtol=0, atol=0)
        moe.experts.w_out_EFD.mul_(-1.0)  # a weight update: the pack and its reordered copies are remade
        torch.testing.assert_close(moe(x), -y, rtol=1e-5, atol=1e-6)
        assert decode_pack(moe.experts, torch.float32) is not pack
    with pytest.raises(ValueError, match="path='onednn' runs without gradients"):
        moe(x.requires_grad_(True))
    moe.train()
    with pytest.raises(ValueError, match="path='onednn' runs without gradients"):
        moe(torch.randn(3, 16))


def test_onednn_unsupported_is_a_clear_error_and_the_rule_steps_around_it(monkeypatch):
    assert not onednn_supports(torch.float64) and not onednn_supports(torch.float16)
    monkeypatch.setattr(decode, "onednn_supports", lambda dtype: False)
    monkeypatch.setattr(expert_paths, "onednn_supports", lambda dtype: False)
    plan = build_plan(torch.tensor([[0, 1]]), 2, None)
    w_in, w_out = torch.randn(2, 4, 6), torch.randn(2, 3, 4)
    with torch.inference_mode(), pytest.raises(ValueError, match="needs oneDNN's linear"):
        expert_ffn(torch.randn(2, 4), w_in, w_out, plan, path="onednn")
    with torch.inference_mode(), pytest.raises(ValueError, match="runs on the CPU only"):
        expert_ffn(torch.randn(2, 4, device="meta"), w_in.to("meta"), w_out.to("meta"), plan, path="onednn")
    rule = expert_paths.PathRule(table={("fp32", 1, 1): ("onednn_packed", "bmm")})
    kw = dict(device_type="cpu", dtype=torch.float32, rows_per_expert=1, threads=1, grad=False)
    assert rule.choose(packed=True, **kw) == "bmm"


@pytest.mark.parametrize("path", ["gemv", "bmm", "grouped", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_layout_matches_float64_and_the_loop_path(path, dtype):
    """With the decode layout: within 2x the loop path's own error from float64 (+ a small atol)."""
    if path == "onednn" and not onednn_supports(dtype):
        pytest.skip(f"no oneDNN linear in {dtype} here")
    torch.manual_seed(0)
    moe = moebal.MoE(32, 16, 8, 2, router=Router(32, 8, 2, balancer=None)).eval().to(dtype)
    x = torch.randn(5, 32).to(dtype)
    with torch.inference_mode():
        r = moe.router(x)
        plan = build_plan(r.indices, 8, None, r.weights)
        xs = dispatch_rows(x, plan)
        ex = moe.experts
        prepare_decode(moe)
        pack = decode_pack(ex, dtype)
        ys = expert_ffn(xs, ex.w_in_EDH, ex.w_out_EFD, plan, path=path, pack=pack)
        loop = expert_ffn(xs, ex.w_in_EDH, ex.w_out_EFD, plan, path="loop")
    ref = _ref(xs, ex.w_in_EDH, ex.w_out_EFD, None, None, plan, "swiglu")
    loop_err = (loop.double() - ref).abs().max().item()
    assert (ys.double() - ref).abs().max().item() <= 2 * loop_err + (1e-6 if dtype == torch.float32 else 1e-2)


def test_decode_layout_is_rebuilt_when_weights_change_and_never_saved():
    torch.manual_seed(0)
    moe = moebal.MoE(16, 8, 4, 2, router=Router(16, 4, 2, balancer=None)).eval()
    nbytes = prepare_decode(moe)
    assert nbytes == moe.experts._decode_pack.nbytes
    assert not any("pack" in k for k in moe.state_dict())
    x = torch.randn(3, 16)
    with torch.no_grad():
        moe.experts.w_in_EDH.mul_(2.0)  # an in-place update (an optimizer step) moves the version counter
        pack = decode_pack(moe.experts, torch.float32)
        torch.testing.assert_close(pack.w_in_EHD, moe.experts.w_in_EDH.transpose(1, 2), rtol=0, atol=0)
        y_new = moe(x)
    ref = copy.deepcopy(moe)
    release_decode(ref)
    ref.experts.path = "loop"
    with torch.no_grad():
        torch.testing.assert_close(y_new, ref(x), rtol=1e-6, atol=1e-6)
    clone = copy.deepcopy(moe).to(torch.bfloat16)  # a cast: the pack is remade in the new dtype
    with torch.inference_mode():
        clone(x.bfloat16())
    assert decode_pack(clone.experts, torch.bfloat16).w_in_EHD.dtype == torch.bfloat16
    fresh = moebal.MoE(16, 8, 4, 2, router=Router(16, 4, 2, balancer=None))
    fresh.load_state_dict(moe.state_dict())  # loads cleanly: nothing of the pack is expected
    with pytest.raises(ValueError, match="model has no moebal experts"):
        prepare_decode(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("cells,made", [
    ({"gemv_packed"}, (True, False)), ({"onednn_packed"}, (False, True)),
    ({"bmm_packed", "onednn_packed"}, (True, True)), ({"bmm", "loop"}, (False, False)),
])
def test_prepare_decode_makes_the_layouts_the_rule_runs_on(monkeypatch, cells, made):
    if "onednn_packed" in cells and not onednn_supports(torch.float32):
        made = (made[0], False)
    table = {("fp32", 1, b): (c, "loop") for b, c in zip((1, 2, 4, 8), sorted(cells) * 4)}
    table[("bf16", 1, 1)] = ("gemv_packed", "loop")  # another dtype's cell makes nothing in fp32
    table[("fp32", 2, 1)] = ("gemv_packed", "loop")  # nor another thread count's
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    torch.manual_seed(0)
    moe = moebal.MoE(16, 8, 4, 2, router=Router(16, 4, 2, balancer=None)).eval()
    old = expert_paths.use_rule(expert_paths.PathRule(table=table))
    try:
        nbytes = prepare_decode(moe)
    finally:
        expert_paths.use_rule(old)
    pack = moe.experts._decode_pack
    assert (pack._transposed is not None, pack._onednn is not None) == made
    stored = moe.experts.w_in_EDH.nbytes + moe.experts.w_out_EFD.nbytes
    assert nbytes == pack.nbytes and (nbytes == 0) == (made == (False, False))
    if made == (True, False):
        assert nbytes == stored
    with torch.inference_mode():  # a path asking for a layout not made makes it
        torch.testing.assert_close(pack.w_in_EHD, moe.experts.w_in_EDH.transpose(1, 2), rtol=0, atol=0)
    assert pack._transposed is not None


def test_training_forward_never_uses_the_decode_layout():
    """A forward that takes gradients runs on the live weights: they get the same gradient as without a pack."""
    torch.manual_seed(0)
    moe = moebal.MoE(16, 8, 4, 2, router=Router(16, 4, 2, balancer=None))
    ref = copy.deepcopy(moe)
    prepare_decode(moe)
    x = torch.randn(6, 16)
    for m in (moe, ref):
        m.experts.path = "gemv"
        m(x).square().sum().backward()
    torch.testing.assert_close(moe.experts.w_in_EDH.grad, ref.experts.w_in_EDH.grad)
    torch.testing.assert_close(moe.experts.w_out_EFD.grad, ref.experts.w_out_EFD.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_inference_with_padding_mask_and_zero_tokens(dtype):
    """The auto path at eval: masked tokens give zero, kept tokens equal the loop path; T=0 works."""
    torch.manual_seed(0)
    moe = moebal.MoE(32, 16, 8, 2, router=Router(32, 8, 2, balancer=None)).eval().to(dtype)
    ref = copy.deepcopy(moe)
    ref.experts.path = "loop"
    prepare_decode(moe)
    x = torch.randn(2, 4, 32).to(dtype)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with torch.inference_mode():
        y, y_ref = moe(x, token_mask=mask), ref(x, token_mask=mask)
        assert (y[~mask] == 0).all()
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(y, y_ref, **tol)
        assert moe(x[:, :0]).shape == (2, 0, 32)


def test_decode_layout_layer_compiles_fullgraph_with_varying_tokens():
    """Compiled, the layer ignores the decode layout (its freshness check reads data pointers) and
    keeps the grouped path; values equal the eager loop path at every token count."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = moebal.MoE(16, 8, 4, 2, router=Router(16, 4, 2, balancer=None)).eval()
    ref = copy.deepcopy(moe)
    ref.experts.path = "loop"
    prepare_decode(moe)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        for T in (3, 5, 9):
            x = torch.randn(T, 16)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)


def test_decode_layout_under_autocast_is_made_in_the_autocast_dtype():
    """fp32 master weights under bf16 autocast at eval: the pack is bf16 and the output matches the loop path's."""
    torch.manual_seed(0)
    moe = moebal.MoE(32, 16, 8, 2, router=Router(32, 8, 2, balancer=None)).eval()
    ref = copy.deepcopy(moe)
    ref.experts.path = "loop"
    prepare_decode(moe)
    x = torch.randn(3, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = moe(x), ref(x)
    assert y.dtype == torch.bfloat16 and moe.experts._decode_pack.w_in_EHD.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


@needs_onednn
def test_onednn_path_under_autocast_and_padding_matches_the_loop(monkeypatch):
    """Inference under bf16 autocast (the pack follows the compute dtype) and with a padding mask:
    the same outputs as the loop path under the same autocast, masked tokens exactly zero."""
    if not onednn_supports(torch.bfloat16):
        pytest.skip("no oneDNN bf16 linear here")
    torch.manual_seed(0)
    moe = moebal.MoE(32, 16, 8, 2, router=Router(32, 8, 2, balancer=None)).eval()
    ref = copy.deepcopy(moe)
    ref.experts.path = "loop"
    prepare_decode(moe)
    moe.experts.path = "onednn"
    from moebal import experts as experts_mod

    calls, real = [], experts_mod.onednn_experts
    monkeypatch.setattr(experts_mod, "onednn_experts", lambda *a: calls.append(a[0].dtype) or real(*a))
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = moe(x, token_mask=mask), ref(x, token_mask=mask)
        plain_got, plain_want = moe(x), ref(x)
    assert calls == [torch.bfloat16, torch.bfloat16]  # both forwards ran the onednn path, in bf16
    assert got.dtype == want.dtype
    assert torch.count_nonzero(got[1, 3:]) == 0
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(plain_got.float(), plain_want.float(), rtol=2e-2, atol=2e-2)
