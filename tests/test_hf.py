"""moebal in transformers models: swap_ffn with sparse upcycling, MoE block conversion both
ways, state_dict round trips. Tiny random-weight configs built locally, no downloads."""
import io

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the HF integration tests need transformers (moebal[hf])")

import moebal  # noqa: E402
from moebal import AuxLoss, LossFree, Router  # noqa: E402
from moebal.hf import (  # noqa: E402
    ConversionError,
    MoEWithDropout,
    convert_moe_blocks,
    from_hf_moe_block,
    restore_moe_blocks,
    to_hf_moe_block,
)

V = 97
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)


def _ids(seed=0, B=2, S=12):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def _dense(family, seed=0, **overrides):
    """A tiny dense causal LM with random weights (eval mode)."""
    torch.manual_seed(seed)
    T = transformers
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0,
                           eos_token_id=0, **overrides)
        return T.GPT2LMHeadModel(cfg).eval()
    if family == "phi":
        cfg = T.PhiConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, **ATTN, **overrides)
        return T.PhiForCausalLM(cfg).eval()
    if family == "llama_bias":  # gated MLP with biases (mlp_bias=True)
        family, overrides = "llama", {"mlp_bias": True, **overrides}
    cls, cfg_cls = {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig),
        "mistral": (T.MistralForCausalLM, T.MistralConfig),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config),
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config),
    }[family]
    extra = {"head_dim": 16} if family == "qwen3" else {}
    cfg = cfg_cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, **ATTN, **extra, **overrides)
    return cls(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- sparse upcycling ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "llama_bias", "mistral", "qwen2", "qwen3", "gpt2", "phi"])
@pytest.mark.parametrize("top_k", [1, 2])  # top-1 needs the forced renormalisation to equal dense
def test_upcycled_model_equals_dense_at_init(family, top_k):
    model = _dense(family).double()
    ids = _ids()
    ref = _logits(model, ids)
    report = moebal.swap_ffn(model, num_experts=4, top_k=top_k)
    assert [r.layer for r in report] == [0, 1] and all(r.upcycled for r in report)
    # float64 model. Top-1: the weight is p/p = 1 exactly, so only the GELU MLPs differ
    # (torch's tanh-GELU kernel vs transformers' Python formula, ~1e-16). Top-2: moebal's
    # router math runs in fp32 by design, so w_1 + w_2 = 1 within fp32 rounding.
    tol = 1e-12 if top_k == 1 else 1e-6
    torch.testing.assert_close(_logits(model, ids), ref, rtol=tol, atol=tol)


def test_upcycled_llama_equals_dense_in_fp32_and_report_names_what_changed():
    model = _dense("llama")
    ids = _ids(1)
    ref = _logits(model, ids)
    report = moebal.swap_ffn(model, 8, 2, router="loss_free")
    torch.testing.assert_close(_logits(model, ids), ref)
    assert [(r.layer, r.path, r.old_class, r.new_class) for r in report] == [
        (0, "model.layers.0.mlp", "LlamaMLP", "MoE"),
        (1, "model.layers.1.mlp", "LlamaMLP", "MoE"),
    ]
    assert "LlamaMLP" in str(report) and not report.skipped
    layer = model.model.layers[0].mlp
    assert isinstance(layer, moebal.MoE) and not layer.training
    assert layer.router.renormalize and layer.router.score == "sigmoid"
    assert layer.experts.w_in_EDH.shape == (8, 64, 2 * 96)
    dense = _dense("llama").model.layers[0].mlp  # same seed: same dense weights
    for e in (0, 7):
        w_in = torch.cat([dense.gate_proj.weight, dense.up_proj.weight]).t()  # gate then up, for x @ W
        torch.testing.assert_close(layer.experts.w_in_EDH[e], w_in, rtol=0, atol=0)
        torch.testing.assert_close(layer.experts.w_out_EFD[e], dense.down_proj.weight.t(), rtol=0, atol=0)
    assert model.model.layers[0].mlp.router is not model.model.layers[1].mlp.router


@pytest.mark.parametrize("router", ["aux_loss", "loss_free", "base"])
def test_upcycled_equality_holds_in_training_mode_for_every_router(router):
    model = _dense("llama").double()
    ids = _ids(2)  # T*K = 24*2 divisible by E = 4, as BASE's balanced assignment needs
    model.train()
    ref = _logits(model, ids)
    moebal.swap_ffn(model, 4, 2, router=router)
    model.train()
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-6, atol=1e-6)  # fp32 router weights


def test_gpt2_keeps_biases_tanh_gelu_and_dropout():
    model = _dense("gpt2")
    ids = _ids(3)
    ref = _logits(model, ids)
    report = moebal.swap_ffn(model, 4, 2)
    layer = model.transformer.h[0].mlp
    assert [r.new_class for r in report] == ["MoEWithDropout"] * 2
    assert isinstance(layer, MoEWithDropout) and layer.dropout.p == model.config.resid_pdrop
    assert layer.experts.activation == "gelu_tanh" and layer.experts.b_in_EH.shape == (4, 256)
    # gelu_new in Python vs torch's tanh-GELU kernel: equal to a few fp32 ulps
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)


def test_gpt2_with_exact_gelu_maps_to_exact_gelu_and_refuses_the_wrong_activation():
    model = _dense("gpt2", activation_function="gelu").double()
    ids = _ids(4)
    ref = _logits(model, ids)
    with pytest.raises(ConversionError, match="activation='gelu_tanh'.*dense: 'gelu'"):
        moebal.swap_ffn(model, 4, 2, activation="gelu_tanh")
    moebal.swap_ffn(model, 4, 1)
    assert model.transformer.h[1].mlp.experts.activation == "gelu"
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-12, atol=1e-12)


def test_swap_ffn_layers_argument_and_skips_are_reported():
    model = _dense("qwen2")
    report = moebal.swap_ffn(model, 4, 2, layers=[1])
    assert [r.layer for r in report] == [1]
    assert report.skipped == [(0, "model.layers.0", "not in layers")]
    again = moebal.swap_ffn(model, 4, 2)  # layer 1 is an MoE now: only layer 0 is swapped
    assert [r.layer for r in again] == [0]
    assert again.skipped == [(1, "model.layers.1.mlp", "already a moebal.MoE (MoE)")]
    with pytest.raises(ConversionError, match="(?s)replaced nothing.*already a moebal.MoE"):
        moebal.swap_ffn(model, 4, 2)
    with pytest.raises(ConversionError, match="layer 0 .* no dense FFN"):
        moebal.swap_ffn(model, 4, 2, layers=[0])
    with pytest.raises(ValueError, match="out of range"):
        moebal.swap_ffn(_dense("qwen2"), 4, 2, layers=[2])


def test_swap_ffn_raises_when_nothing_matches_or_cannot_be_represented():
    with pytest.raises(ConversionError, match="no decoder layer list"):
        moebal.swap_ffn(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 4, 2)
    with pytest.raises(ConversionError, match="SwiGLU"):  # a gated MLP with a GELU gate (GeGLU)
        moebal.swap_ffn(_dense("llama", hidden_act="gelu"), 4, 2)
    model = _dense("llama")
    with pytest.raises(ConversionError, match="d_ff=48 .*dense: 96"):
        moebal.swap_ffn(model, 4, 2, d_ff=48)
    with pytest.raises(ConversionError, match="num_shared_experts"):
        moebal.swap_ffn(model, 4, 2, num_shared_experts=1)
    with pytest.raises(ConversionError, match="renormalize=False"):
        moebal.swap_ffn(model, 4, 1, router=Router(64, 4, 1))  # top-1 default: no renormalisation
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in model.model.layers)  # untouched


def test_fresh_fine_grained_experts_and_router_templates():
    model = _dense("llama")
    template = Router(64, 8, 2, score="sigmoid", balancer=LossFree(update="manual"))
    report = moebal.swap_ffn(model, 8, 2, router=template, upcycle=False, d_ff=24, capacity_factor=1.25)
    assert not any(r.upcycled for r in report)
    a, b = (layer.mlp for layer in model.model.layers)
    assert a.experts.w_in_EDH.shape == (8, 64, 48) and a.capacity_factor == 1.25
    assert a.router is not template and a.router is not b.router
    assert not torch.equal(a.router.gate.weight, b.router.gate.weight)  # each gate freshly initialised
    out = model(_ids(), labels=_ids())
    assert torch.isfinite(out.loss)


def test_upcycling_a_meta_model_raises_up_front_and_says_what_to_do():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, **ATTN)
        )
    with pytest.raises(ValueError) as err:
        moebal.swap_ffn(model, 4, 2)
    text = str(err.value)
    assert "meta" in text and "model.layers.0.mlp" in text and "Cannot copy out of meta tensor" not in text
    assert "upcycle=False" in text and "to_empty" in text  # the two ways out
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in model.model.layers)  # untouched
    # the way out it names: fresh experts on meta, then real storage and a fresh init
    report = moebal.swap_ffn(model, 4, 2, upcycle=False)
    assert [r.layer for r in report] == [0, 1]
    moe = model.model.layers[0].mlp
    assert all(p.is_meta for p in moe.parameters())
    moe.to_empty(device="cpu")
    moe.reset_parameters()
    assert torch.isfinite(moe(torch.randn(3, 64))).all()


def test_bf16_model_keeps_expert_dtype_and_an_fp32_router():
    model = _dense("llama").to(torch.bfloat16)
    ids = _ids(5)
    ref = _logits(model, ids)
    moebal.swap_ffn(model, 4, 2)
    layer = model.model.layers[0].mlp
    assert layer.experts.w_in_EDH.dtype == torch.bfloat16 and layer.router.gate.weight.dtype == torch.float32
    out = _logits(model, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


# --- training and saving a swapped model ----------------------------------------------------


def _loss_free_router():
    return Router(64, 4, 2, score="sigmoid", balancer=LossFree(rate=0.01, update="manual"))


def test_training_glue_on_a_swapped_llama():
    model = _dense("llama")
    moebal.swap_ffn(model, 4, 2, router=_loss_free_router)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    moebal.register_bias_update_hook(opt, model)
    for step in range(2):
        out = model(_ids(step), labels=_ids(step))
        loss = out.loss + moebal.aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    report = moebal.balance_report(model)
    assert {"moe/layer0/max_violation", "moe/layer1/max_violation", "moe/layer1/entropy"} <= set(report)
    bias = model.model.layers[0].mlp.router.expert_bias
    assert bias.abs().sum() > 0 and bias.dtype == torch.float32


def test_state_dict_round_trip_of_a_swapped_model_is_bit_exact():
    model = _dense("llama")
    moebal.swap_ffn(model, 4, 2, router=_loss_free_router)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    moebal.register_bias_update_hook(opt, model)
    for step in range(3):
        model(_ids(step), labels=_ids(step)).loss.backward()
        opt.step()
    model(_ids(9), labels=_ids(9)).loss.backward()  # pending load counts travel too
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)

    fresh = _dense("llama", seed=123)  # different weights until loaded
    moebal.swap_ffn(fresh, 4, 2, router=_loss_free_router, upcycle=False)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf), strict=True)
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    assert any(k.endswith("router.expert_bias") for k in saved) and any(k.endswith("load_counts") for k in saved)
    for key in saved:
        assert saved[key].dtype == loaded[key].dtype and torch.equal(saved[key], loaded[key]), key
    assert saved["model.layers.1.mlp.router.expert_bias"].abs().sum() > 0
    assert torch.equal(_logits(fresh, _ids(7)), _logits(model, _ids(7)))


# --- transformers' own MoE blocks -------------------------------------------------------------


def _moe_model(family, dtype=torch.float64, seed=0, **overrides):
    """A tiny HF MoE model with non-trivial routers (random gates, random DeepSeek bias)."""
    torch.manual_seed(seed)
    T = transformers
    if family == "mixtral":
        cfg = T.MixtralConfig(hidden_size=64, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                              num_hidden_layers=2, **ATTN)
        cls = T.MixtralForCausalLM
    elif family == "qwen2_moe":  # shared expert with a sigmoid gate; no renormalisation
        cfg = T.Qwen2MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                               shared_expert_intermediate_size=56, num_experts=6, num_experts_per_tok=2,
                               norm_topk_prob=False, num_hidden_layers=2, **ATTN)
        cls = T.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=40, num_experts=6,
                               num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, num_hidden_layers=2, **ATTN)
        cls = T.Qwen3MoeForCausalLM
    else:  # DeepSeek-V3: sigmoid + bias, 2 groups both kept, scaling 2.5, a dense first layer
        attn = {**ATTN, "num_key_value_heads": 4}
        cfg = T.DeepseekV3Config(hidden_size=64, intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8,
                                 num_experts_per_tok=2, n_group=2, topk_group=2, n_shared_experts=2,
                                 first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                 qk_nope_head_dim=16, v_head_dim=16, num_hidden_layers=3, **attn)
        cls = T.DeepseekV3ForCausalLM
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg._experts_implementation = "eager"  # transformers' grouped_mm path has no float64
    model = cls(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "top_k") and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2:
                m.weight.normal_(0, 0.3)  # routers: spread-out scores, no near-ties
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    return model.to(dtype)


MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_blocks_convert_to_moebal_and_back_without_loss(family):
    model = _moe_model(family)
    ids = _ids(11)
    ref = _logits(model, ids)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = {r: model.get_submodule(r) for r in ("model.layers.1.mlp",)}
    report = convert_moe_blocks(model)
    assert len(report) == 2 and all(r.new_class == "MoE" for r in report)
    if family == "deepseek_v3":
        assert report.skipped == [(0, "model.layers.0.mlp", "no MoE block (DeepseekV3MLP)")]
    # DeepSeek's router computes its logits in fp32, as moebal's does: float64 agreement.
    # Mixtral/Qwen compute them in the model dtype (here float64) and then softmax in fp32;
    # moebal's fp32 logits make the routing weights differ by fp32 rounding.
    tol = 1e-12 if family == "deepseek_v3" else 1e-6
    torch.testing.assert_close(_logits(model, ids), ref, rtol=tol, atol=tol)

    # the same experts are chosen, token by token
    (path, block), = blocks.items()
    moe = model.get_submodule(path)
    x = torch.randn(40, 64, dtype=torch.float64)
    _, hf_w, hf_idx = block.gate(x)
    r = moe.router(x)
    assert torch.equal(hf_idx.sort(-1).values, r.indices.sort(-1).values)
    torch.testing.assert_close(hf_w.gather(1, hf_idx.argsort(-1)).to(r.weights.dtype),
                               r.weights.gather(1, r.indices.argsort(-1)), rtol=tol, atol=tol)
    torch.testing.assert_close(moe(x), block(x.unsqueeze(0)).squeeze(0), rtol=tol, atol=tol)

    back = restore_moe_blocks(model, report)
    assert [r.new_class for r in back] == [r.old_class for r in report]
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    for key in original:
        assert restored[key].dtype == original[key].dtype and torch.equal(restored[key], original[key]), key
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_converted_block_matches_in_fp32_forward_and_backward(family):
    block = _moe_model(family, dtype=torch.float32).model.layers[1].mlp
    moe = from_hf_moe_block(block)
    x = torch.randn(2, 10, 64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = block(xa), moe(xb)
    torch.testing.assert_close(yb, ya)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moe.experts.w_out_EFD.grad, block.experts.down_proj.grad.transpose(1, 2),
                               rtol=1e-4, atol=1e-5)


def test_deepseek_v3_maps_to_a_loss_free_sigmoid_router():
    block = _moe_model("deepseek_v3").model.layers[2].mlp
    moe = from_hf_moe_block(block)
    r = moe.router
    assert (r.score, r.renormalize, r.scale) == ("sigmoid", True, 2.5)
    assert r.balancer == LossFree(rate=1e-3, update="manual")
    assert torch.equal(r.expert_bias, block.gate.e_score_correction_bias)
    assert moe.shared.w_in.weight.shape == (2 * 48, 64) and moe.shared_gate is None
    with pytest.raises(ConversionError, match="LossFree"):
        from_hf_moe_block(block, balancer=AuxLoss())
    qwen = from_hf_moe_block(_moe_model("qwen2_moe").model.layers[0].mlp)
    assert qwen.shared_gate is not None and not qwen.router.renormalize
    assert qwen.router.balancer == AuxLoss(alpha=0.001)  # the config's router_aux_loss_coef


def test_unrepresentable_routing_raises_and_leaves_the_model_alone():
    # group-limited routing and jitter convert now (tests/test_hf_blocks_v2.py); these variants cannot
    grouped = _moe_model("deepseek_v3", n_group=4, topk_group=1, num_experts_per_tok=3)  # 2 eligible experts < K
    with pytest.raises(ConversionError, match="top_k=3 exceeds the 2 experts of the topk_group=1 kept groups"):
        convert_moe_blocks(grouped)
    assert type(grouped.model.layers[1].mlp).__name__ == "DeepseekV3MoE"
    jitter = _moe_model("mixtral", router_jitter_noise=1.0)
    with pytest.raises(ConversionError, match="router_jitter_noise=1.0 >= 1"):
        convert_moe_blocks(jitter)
    assert type(jitter.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"
    logits = _moe_model("mixtral", output_router_logits=True)
    with pytest.raises(ConversionError, match="output_router_logits"):
        convert_moe_blocks(logits)
    with pytest.raises(ConversionError, match="no transformers MoE block"):
        convert_moe_blocks(_dense("llama"))
    with pytest.raises(ConversionError, match="not an MoE block moebal can convert"):
        from_hf_moe_block(_dense("llama").model.layers[0].mlp)


def test_converter_accounts_for_every_key():
    block = _moe_model("qwen2_moe").model.layers[0].mlp
    block.experts.register_parameter("extra_scale", nn.Parameter(torch.ones(6)))
    with pytest.raises(ConversionError, match="no rule converts: experts.extra_scale"):
        from_hf_moe_block(block)
    block = _moe_model("mixtral").model.layers[0].mlp
    block.experts.gate_up_proj = nn.Parameter(torch.zeros(6, 94, 64, dtype=torch.float64))  # 2F = 96
    with pytest.raises(ConversionError, match="experts.w_in_EDH: got \\(6, 64, 94\\), expected \\(6, 64, 96\\)"):
        from_hf_moe_block(block)


def test_converting_back_refuses_a_layer_that_computes_something_else():
    model = _moe_model("qwen3_moe")
    report = convert_moe_blocks(model)
    rep = report.replaced[0]
    moe = model.get_submodule(rep.path)
    other = transformers.Qwen3MoeConfig(**{**rep.old_config.to_dict(), "norm_topk_prob": False})
    with pytest.raises(ConversionError, match="renormalize: layer True, block False"):
        to_hf_moe_block(moe, rep.old_type, other)
    moe.capacity_factor = 1.0
    with pytest.raises(ConversionError, match="capacity_factor"):
        to_hf_moe_block(moe, rep.old_type, rep.old_config)
    ds = _moe_model("deepseek_v3")
    ds_report = convert_moe_blocks(ds)
    ds_moe = ds.get_submodule(ds_report.replaced[0].path)
    ds_moe.train()
    ds_moe(torch.randn(8, 64, dtype=torch.float64))  # training forward counts loads
    with pytest.raises(ConversionError, match="load_counts"):
        restore_moe_blocks(ds, ds_report)
    moebal.update_biases(ds)
    restore_moe_blocks(ds, ds_report)


# --- the example and the benchmark run (smoke) ------------------------------------------------


def _load(path):
    import importlib.util
    from pathlib import Path

    file = Path(__file__).resolve().parents[1] / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # the scripts pin torch's thread count
    yield
    torch.set_num_threads(threads)


def test_example_finetune_runs(capsys, keep_threads):
    _load("examples/finetune_swapped_llama.py").main(
        ["--dense-steps", "1", "--steps", "2", "--batch", "2", "--seq-len", "16", "--log-every", "1"]
    )
    out = capsys.readouterr().out
    assert "MaxVio L0=" in out and "state_dict round trip bit-exact: True" in out


def test_benchmark_runs_and_writes_json(tmp_path, keep_threads):
    path = tmp_path / "hf.json"
    bench = _load("benchmarks/bench_hf.py")
    out = bench.main(["--d-model", "32", "--d-ff", "64", "--layers", "1", "--seq-len", "16", "--batch", "2",
                      "--iters", "1", "--warmup", "0", "--repeats", "1", "--json", str(path)])
    import json

    saved = json.loads(path.read_text())
    assert saved["schema"] == bench.SCHEMA and set(saved["results"]) == {"dense", "upcycled", "iso_flop"}
    assert saved["results"]["dense"]["fwd_bwd"]["vs_dense"] == 1.0
    assert out["environment"]["transformers"] == transformers.__version__
