"""swap_ffn beyond Llama/GPT-2/Phi: Phi-3, Gemma 1-3, GPT-NeoX, Falcon, GPT-J, GPTBigCode,
Starcoder2, OPT and Bloom upcycle to their dense logits; the GeGLU and ReLU experts against
float64 references; register_ffn with a toy FFN; the nothing-matched message; router_kwargs.

Every model is a tiny random config built locally (no downloads). Their weights are
re-drawn at a larger scale (``_spread``) so the FFNs move the logits by far more than the
1e-5 tolerance: a wrongly mapped FFN (a swapped gate/up, a lost bias) cannot pass.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers", reason="the HF integration tests need transformers (moebal[hf])")

import moebal  # noqa: E402
from moebal import LossFree, Router  # noqa: E402
from moebal.experts import activate, expert_ffn  # noqa: E402
from moebal.hf import (  # noqa: E402
    ConversionError,
    FFNPattern,
    MoEWithDropout,
    MoEWithResidual,
    ffn_patterns,
    register_ffn,
    unregister_ffn,
)
from moebal.layer import DenseFFN  # noqa: E402
from moebal.plan import build_plan  # noqa: E402

V = 97
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)
SIZES = dict(hidden_size=64, num_hidden_layers=2)


def _ids(seed=0, B=2, S=12):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _spread(model):
    """Matrices ~ N(0, 1/fan_in), vectors (norm scales, biases) moved by N(0, 0.1)."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if p.dim() >= 2:
            p.copy_(noise / math.sqrt(p.shape[-1]))
        else:
            p.add_(0.1 * noise)
    return model


def _dense(family, **overrides):
    """A tiny dense causal LM (eval mode), F = 96 where the config has a knob for it."""
    T = transformers
    torch.manual_seed(0)
    head = dict(head_dim=16)
    table = {
        "phi3": (T.Phi3ForCausalLM, T.Phi3Config, dict(intermediate_size=96, pad_token_id=0, **SIZES, **ATTN)),
        "gemma": (T.GemmaForCausalLM, T.GemmaConfig, dict(intermediate_size=96, **head, **SIZES, **ATTN)),
        "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config, dict(intermediate_size=96, **head, **SIZES, **ATTN)),
        "gemma3": (T.Gemma3ForCausalLM, T.Gemma3TextConfig, dict(intermediate_size=96, **head, **SIZES, **ATTN)),
        "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig,
                     dict(intermediate_size=96, num_attention_heads=4, vocab_size=V, max_position_embeddings=64,
                          **SIZES)),
        "falcon": (T.FalconForCausalLM, T.FalconConfig,
                   dict(ffn_hidden_size=96, num_attention_heads=4, vocab_size=V, **SIZES)),
        "gptj": (T.GPTJForCausalLM, T.GPTJConfig,
                 dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_inner=96, vocab_size=V, n_positions=64,
                      bos_token_id=0, eos_token_id=0)),
        "gpt_bigcode": (T.GPTBigCodeForCausalLM, T.GPTBigCodeConfig,
                        dict(n_embd=64, n_layer=2, n_head=4, n_inner=96, vocab_size=V, n_positions=64,
                             bos_token_id=0, eos_token_id=0)),
        "starcoder2": (T.Starcoder2ForCausalLM, T.Starcoder2Config, dict(intermediate_size=96, **SIZES, **ATTN)),
        "opt": (T.OPTForCausalLM, T.OPTConfig,
                dict(ffn_dim=96, num_attention_heads=4, vocab_size=V, max_position_embeddings=64,
                     word_embed_proj_dim=64, **SIZES)),
        "bloom": (T.BloomForCausalLM, T.BloomConfig, dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=V)),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig, dict(intermediate_size=96, **SIZES, **ATTN)),
    }
    cls, cfg_cls, kw = table[family]
    return _spread(cls(cfg_cls(**{**kw, **overrides}))).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# (family, config overrides, expert activation, new class, bias); each row a distinct mapping
ARCHS = [
    ("phi3", {}, "swiglu", "MoE", False),  # fused gate_up_proj, gate half first
    ("phi3", {"hidden_act": "gelu_pytorch_tanh"}, "geglu", "MoE", False),  # fused GeGLU
    ("gemma", {}, "geglu", "MoE", False),  # hidden_act gelu_pytorch_tanh
    ("gemma", {"hidden_act": "gelu"}, "geglu", "MoE", False),  # legacy value: the config rewrites it to tanh
    ("gemma2", {}, "geglu", "MoE", False),  # hidden_activation gelu_pytorch_tanh
    ("gemma3", {}, "geglu", "MoE", False),
    ("gpt_neox", {}, "gelu", "MoE", True),  # dense_h_to_4h / dense_4h_to_h, exact GELU, parallel residual
    ("gpt_neox", {"use_parallel_residual": False, "hidden_act": "gelu_new"}, "gelu_tanh", "MoE", True),
    ("falcon", {}, "gelu", "MoE", False),  # FalconLinear (an nn.Linear subclass), no bias by default
    ("falcon", {"bias": True, "new_decoder_architecture": True, "num_kv_heads": 2}, "gelu", "MoE", True),
    ("gptj", {"resid_pdrop": 0.1}, "gelu_tanh", "MoEWithDropout", True),  # fc_in / fc_out, gelu_new, nn.Dropout child
    ("gpt_bigcode", {}, "gelu_tanh", "MoEWithDropout", True),  # c_fc / c_proj as nn.Linear
    ("starcoder2", {"residual_dropout": 0.1}, "gelu_tanh", "MoEWithDropout", True),  # float residual_dropout
    ("starcoder2", {"use_bias": False}, "gelu_tanh", "MoE", False),
    ("opt", {}, "relu", "MoE", True),  # fc1 / fc2 on the decoder layer, layer norm before
    ("opt", {"do_layer_norm_before": False}, "relu", "MoE", True),  # OPT-350m's layer norm after
    ("bloom", {}, "gelu_tanh", "MoEWithResidual", True),  # the MLP adds the residual itself
]


@pytest.mark.parametrize("family,overrides,activation,new_class,bias", ARCHS,
                         ids=[f"{a[0]}-{i}" for i, a in enumerate(ARCHS)])
def test_upcycled_model_equals_dense_at_init(family, overrides, activation, new_class, bias):
    model = _dense(family, **overrides)
    ids = _ids()
    ref = _logits(model, ids)
    report = moebal.swap_ffn(model, num_experts=4, top_k=2)  # dropless
    assert [r.layer for r in report] == [0, 1] and all(r.upcycled for r in report)
    assert {r.new_class for r in report} == {new_class}
    moes = [model.get_submodule(r.path) for r in report]
    assert all(m.experts.activation == activation and (m.experts.b_in_EH is not None) == bias for m in moes)
    # fp32: the router's top-2 weights sum to 1 within fp32 rounding; the tanh GELUs written
    # in Python (gelu_new, Bloom's) agree with torch's kernel to a few ulps
    out = _logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # control: the FFNs matter far beyond the tolerance (a scaling alone is
        for m in moes:     # undone by the FFN output norms of Gemma 2/3)
            w = m.experts.w_out_EFD
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(2)) * w.std())
    assert (_logits(model, ids) - ref).abs().max() > 1e-2


def test_phi3_fused_gate_up_is_copied_gate_first():
    model = _dense("phi3")
    dense = model.model.layers[0].mlp
    w_gate_up = dense.gate_up_proj.weight.detach().clone()  # [2F, D]: rows 0..F-1 are the gate
    moebal.swap_ffn(model, 4, 2)
    moe = model.model.layers[0].mlp
    assert moe.experts.w_in_EDH.shape == (4, 64, 2 * 96)
    for e in range(4):
        assert torch.equal(moe.experts.w_in_EDH[e], w_gate_up.t())


def test_opt_ffn_on_the_layer_becomes_an_moe_at_fc1():
    model = _dense("opt")
    report = moebal.swap_ffn(model, 4, 2)
    r = report.replaced[0]
    assert (r.path, r.old_class) == ("model.decoder.layers.0.fc1", "OPTDecoderLayer.fc1/activation_fn/fc2")
    layer = model.model.decoder.layers[0]
    assert isinstance(layer.fc1, moebal.MoE)
    assert isinstance(layer.fc2, nn.Identity) and isinstance(layer.activation_fn, nn.Identity)
    assert not any(k.startswith("model.decoder.layers.0.fc2") for k in model.state_dict())
    with pytest.raises(ConversionError, match="(?s)replaced nothing.*layers.0.fc1.*already a moebal.MoE"):
        moebal.swap_ffn(model, 4, 2)
    # the mask reaches the MoE although OPT flattens the rows to [B * S, D]
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    model(_ids(), attention_mask=mask)
    assert int(layer.fc1.last_stats.load.sum()) == (2 * 12 - 3) * 2


def test_opt_with_dropout_between_activation_and_fc2_is_refused():
    model = _dense("opt")
    for layer in model.model.decoder.layers:
        layer.activation_dropout = 0.1  # as BART-style layers have; OPT's forward has none
    with pytest.raises(ConversionError, match="activation_dropout=0.1 .* no dropout inside"):
        moebal.swap_ffn(model, 4, 2)
    assert isinstance(model.model.decoder.layers[0].fc1, nn.Linear)


def test_bloom_mlp_keeps_its_residual_and_dropout_contract():
    model = _dense("bloom", hidden_dropout=0.25)
    moebal.swap_ffn(model, 4, 2)
    moe = model.transformer.h[0].mlp
    assert isinstance(moe, MoEWithResidual) and moe.dropout.p == 0.25
    x, res = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    torch.testing.assert_close(moe(x, res), res + moebal.MoE.forward(moe, x))


def test_dropout_is_kept_in_training_mode():
    model = _dense("starcoder2", residual_dropout=0.5)
    moebal.swap_ffn(model, 4, 2)
    moe = model.model.layers[0].mlp
    assert isinstance(moe, MoEWithDropout) and moe.dropout.p == 0.5
    moe.train()
    y = moe(torch.randn(40, 64))
    assert 0.3 < (y == 0).float().mean() < 0.7


def test_gated_ffn_with_an_exact_gelu_gate_is_refused():
    model = _dense("gemma2", hidden_activation="gelu")  # gemma2's config keeps the exact GELU
    with pytest.raises(ConversionError, match="SwiGLU \\(SiLU gate\\) and GeGLU \\(tanh-GELU gate\\) only"):
        moebal.swap_ffn(model, 4, 2, upcycle=False)
    assert type(model.model.layers[0].mlp).__name__ == "Gemma2MLP"


def test_gemma_fresh_experts_are_geglu():
    model = _dense("gemma")
    report = moebal.swap_ffn(model, 8, 2, upcycle=False, d_ff=24)
    moe = model.get_submodule(report.replaced[0].path)
    assert moe.experts.activation == "geglu" and moe.experts.w_in_EDH.shape == (8, 64, 48)
    out = model(_ids(), labels=_ids())
    assert torch.isfinite(out.loss)


def test_an_unrepresentable_later_layer_leaves_earlier_layers_alone():
    model = _dense("llama")
    model.model.layers[1].mlp.act_fn = nn.Tanh()
    with pytest.raises(ConversionError, match="layer 1, model.layers.1.mlp: .*Tanh"):
        moebal.swap_ffn(model, 4, 2)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


# --- the GeGLU and ReLU experts ----------------------------------------------------------------


def _gelu_tanh64(g):
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def _act64(h, activation):
    if activation == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return _gelu_tanh64(gate) * up
    return h.clamp_min(0)


def test_geglu_is_a_tanh_gelu_gate_times_up():
    h = torch.linspace(-6, 6, 2 * 101, dtype=torch.float64).view(2, 101)
    h = torch.cat([h, h.flip(-1) * 0.5], dim=-1)  # [2, 2 * 101]: gate then up
    want = _act64(h, "geglu")
    torch.testing.assert_close(activate(h, "geglu"), want, rtol=1e-12, atol=1e-14)
    got32 = activate(h.float(), "geglu").double()
    assert (got32 - want).abs().max() < 4 * torch.finfo(torch.float32).eps * want.abs().max()
    assert (activate(h, "swiglu") - want).abs().max() > 1e-2  # a different gate
    torch.testing.assert_close(activate(h, "relu"), h.clamp_min(0), rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["geglu", "relu"])
def test_dense_ffn_takes_the_new_activations(activation):
    ffn = DenseFFN(12, 10, activation).double()
    assert ffn.w_in.out_features == (20 if activation == "geglu" else 10)
    x = torch.randn(7, 12, dtype=torch.float64)
    want = _act64(x @ ffn.w_in.weight.t(), activation) @ ffn.w_out.weight.t()
    torch.testing.assert_close(ffn(x), want, rtol=1e-12, atol=1e-12)


# (T, D, F, E, K, capacity): dropless with an empty expert; capacity with drops and padding
EXPERT_CASES = [(20, 8, 4, 5, 2, None), (24, 8, 8, 4, 2, 5)]


@pytest.mark.parametrize("path", ["loop", "grouped"])
@pytest.mark.parametrize("case", EXPERT_CASES)
@pytest.mark.parametrize("activation,bias", [("geglu", False), ("geglu", True), ("relu", True)])
def test_geglu_and_relu_experts_match_a_float64_loop(path, case, activation, bias):
    T, D, F_, E, K, cap = case
    g = torch.Generator().manual_seed(T + E)
    idx = torch.rand(T, E - 1, generator=g).argsort(-1)[:, :K]  # distinct experts; expert E-1 gets nothing
    plan = build_plan(idx, E, cap)
    dtype = torch.float64 if path == "loop" else torch.float32  # grouped_mm has no float64 kernel
    H = 2 * F_ if activation == "geglu" else F_

    def mk(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    xs = mk(plan.num_rows, D)
    if cap is not None:  # padded rows of a real dispatch are zero
        xs[plan.token_of_row_R < 0] = 0
    leaves = [xs, mk(E, D, H, scale=D**-0.5), mk(E, F_, D, scale=F_**-0.5)]
    leaves += [mk(E, H, scale=0.1), mk(E, D, scale=0.1)] if bias else []
    got_in = [t.to(dtype).requires_grad_(True) for t in leaves]
    ref_in = [t.clone().requires_grad_(True) for t in leaves]
    b = (lambda ts: (ts[3], ts[4])) if bias else (lambda ts: (None, None))
    ys = expert_ffn(got_in[0], got_in[1], got_in[2], plan, activation, *b(got_in), path=path)
    ref = torch.zeros(plan.num_rows, D, dtype=torch.float64)
    kept = torch.zeros(plan.num_rows, dtype=torch.bool)
    x64, w_in, w_out = ref_in[:3]
    b_in, b_out = b(ref_in)
    for e in range(E):
        s, n = int(plan.starts_E[e]), int(plan.kept_E[e])
        h = x64[s:s + n] @ w_in[e] + (b_in[e] if bias else 0)
        y = _act64(h, activation) @ w_out[e] + (b_out[e] if bias else 0)
        ref = ref.index_copy(0, torch.arange(s, s + n), y)
        kept[s:s + n] = True
    assert int(plan.kept_E[E - 1]) == 0 and (cap is None or int(plan.kept_E.sum()) < T * K)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ys[kept].double(), ref[kept], **tol)
    grad = torch.randn(ys.shape, generator=g, dtype=torch.float64) * kept.unsqueeze(-1)
    for got, want in zip(torch.autograd.grad(ys, got_in, grad.to(dtype)), torch.autograd.grad(ref, ref_in, grad)):
        torch.testing.assert_close(got.double(), want, **tol)


# --- register_ffn ---------------------------------------------------------------------------------


class ToyFFN(nn.Module):
    """An FFN moebal does not know: a fused up-then-gate projection, SiLU called as a function."""

    def __init__(self, d, f):
        super().__init__()
        self.inp = nn.Linear(d, 2 * f)  # [up | gate]
        self.outp = nn.Linear(f, d)

    def forward(self, x):
        up, gate = self.inp(x).chunk(2, dim=-1)
        return self.outp(F.silu(gate) * up)


class ToyBlock(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn_proj = nn.Linear(d, d)
        self.ffn = ToyFFN(d, f)

    def forward(self, x):
        x = x + self.attn_proj(self.norm(x))
        return x + self.ffn(self.norm(x))


class ToyModel(nn.Module):
    def __init__(self, d=16, f=24, n=2):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(d, f) for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture
def registry():
    """Patterns a test registers are removed after it."""
    before = {p.name for p in ffn_patterns()}
    yield
    for p in ffn_patterns():
        if p.name not in before:
            unregister_ffn(p.name)


def test_nothing_matched_names_the_mlp_like_modules_and_register_ffn():
    torch.manual_seed(0)
    model = ToyModel()
    with pytest.raises(ConversionError) as err:
        moebal.swap_ffn(model, 4, 2)
    text = str(err.value)
    assert "blocks.0.ffn (ToyFFN: inp: Linear, outp: Linear)" in text
    assert "attn_proj" not in text.split("MLP-like modules seen:")[1].split("blocks.0.ffn")[0]
    assert "moebal.hf.register_ffn(" in text
    with pytest.raises(ConversionError, match="no decoder layer list .*no MLP-like module.*register_ffn"):
        moebal.swap_ffn(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 4, 2)


def test_register_ffn_upcycles_a_toy_ffn_exactly(registry):
    torch.manual_seed(0)
    model = _spread(ToyModel()).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    ref = model(x)
    pattern = register_ffn("toy", w_in="inp", w_out="outp", activation="swiglu", gated=True, fused_order="up_gate")
    assert isinstance(pattern, FFNPattern) and pattern.w_in == ("inp",) and ffn_patterns()[0] is pattern
    dense = model.blocks[0].ffn
    w_up, w_gate = dense.inp.weight.detach().clone().chunk(2)
    with pytest.warns(UserWarning, match="top_k=1, renormalize=True"):  # fine for an equality test
        report = moebal.swap_ffn(model, 4, 1)
    assert [(r.path, r.old_class) for r in report] == [("blocks.0.ffn", "ToyFFN"), ("blocks.1.ffn", "ToyFFN")]
    moe = model.blocks[0].ffn
    assert moe.experts.activation == "swiglu" and moe.experts.b_in_EH.shape == (4, 48)
    assert torch.equal(moe.experts.w_in_EDH[2], torch.cat([w_gate, w_up]).t())  # reordered gate first
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)  # top-1: weight exactly 1


def test_register_ffn_with_an_activation_child_and_its_checks(registry):
    class ActFFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.nonlin = nn.Linear(16, 24, bias=False), nn.Linear(24, 16, bias=False), nn.GELU()

        def forward(self, x):
            return self.b(self.nonlin(self.a(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = ActFFN()

        def forward(self, x):
            return x + self.mlp(x)

    model = nn.Sequential()
    model.layers = nn.ModuleList([Block(), Block()])
    register_ffn(FFNPattern("act_child", "a", "b", act="nonlin"))
    x = torch.randn(5, 16)
    ref = model.layers[1](model.layers[0](x))
    moebal.swap_ffn(model, 4, 2)
    assert model.layers[0].mlp.experts.activation == "gelu"
    torch.testing.assert_close(model.layers[1](model.layers[0](x)), ref, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="registered; pass replace=True"):
        register_ffn("act_child", w_in="a", w_out="b", act="nonlin")
    register_ffn("act_child", w_in="a", w_out="b", act="nonlin", activation="relu", replace=True)
    fresh = nn.Sequential()
    fresh.layers = nn.ModuleList([Block(), Block()])
    with pytest.raises(ConversionError, match="declares activation='relu', but GELU is 'gelu'"):
        moebal.swap_ffn(fresh, 4, 2)
    unregister_ffn("act_child")
    with pytest.raises(KeyError, match="no registered FFN pattern named 'act_child'"):
        unregister_ffn("act_child")


@pytest.mark.parametrize("fields,message", [
    (dict(w_in="a", w_out="b"), "give act .* or activation"),
    (dict(w_in="a", w_out="b", activation="swiglu"), "activation must be one of .* for a plain FFN"),
    (dict(w_in="a", w_out="b", activation="gelu", gated=True), "for a gated FFN"),
    (dict(w_in=("g", "u", "v"), w_out="b", activation="swiglu"), "one projection or a \\(gate, up\\) pair"),
    (dict(w_in="a", w_out="a", activation="gelu"), "child names must differ"),
    (dict(w_in="a", w_out="b", act="c", fused_order="x"), "fused_order must be one of"),
    (dict(w_in="a", w_out="b", activation="gelu", inline=True), "an inline FFN must be ungated with an act child"),
])
def test_ffn_pattern_validates_itself(fields, message):
    with pytest.raises(ValueError, match=message):
        FFNPattern("bad", **fields)


# --- router_kwargs --------------------------------------------------------------------------------


def test_router_kwargs_configure_a_named_router():
    model = _dense("llama")
    ids = _ids(1)
    ref = _logits(model, ids)
    moebal.swap_ffn(model, 4, 2, router="loss_free", router_kwargs={"rate": 1e-2, "update": "manual"})
    r = model.model.layers[0].mlp.router
    assert r.balancer == LossFree(rate=1e-2, update="manual") and r.renormalize and r.score == "sigmoid"
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)


def test_router_kwargs_errors_leave_the_model_alone():
    model = _dense("llama")
    with pytest.raises(TypeError, match="router_kwargs \\['rate'\\] configure a named router.*Router"):
        moebal.swap_ffn(model, 4, 2, router=Router(64, 4, 2, renormalize=True), router_kwargs={"rate": 1e-2})
    with pytest.raises(TypeError, match="router is a function"):
        moebal.swap_ffn(model, 4, 2, router=lambda: Router(64, 4, 2), router_kwargs={"z_loss": 1e-3})
    with pytest.raises(TypeError, match="unknown option\\(s\\) \\['rates'\\]"):
        moebal.swap_ffn(model, 4, 2, router="loss_free", router_kwargs={"rates": 1e-2})
    with pytest.raises(ConversionError, match="renormalize=False"):  # upcycling still needs renormalised weights
        moebal.swap_ffn(model, 4, 2, router="aux_loss", router_kwargs={"renormalize": False})
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in model.model.layers)
    report = moebal.swap_ffn(model, 4, 2, router="aux_loss", upcycle=False,
                             router_kwargs={"alpha": 0.05, "renormalize": False, "z_loss": 1e-3})
    r = model.get_submodule(report.replaced[1].path).router
    assert r.balancer.alpha == 0.05 and not r.renormalize and r.z_loss == 1e-3


def test_swap_with_null_experts_and_a_named_router():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    moebal.swap_ffn(model, num_experts=4, top_k=2, upcycle=False, num_null_experts=2, null_expert="identity")
    layer = model.model.layers[0].mlp
    assert layer.router.num_null_experts == 2 and layer.null_expert == "identity"
    model(torch.randint(0, 64, (2, 5))).logits.sum().backward()
