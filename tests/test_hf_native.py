"""moebal.hf.to_native (a moebal model as transformers' own MoE architecture) and
moebal.hf.save_pretrained / from_pretrained (a swapped model saved and rebuilt).

Exported checkpoints are loaded in a fresh Python that never imports moebal. Tiny random
configs built locally, no downloads."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the HF integration tests need transformers (moebal[hf])")

import moebal  # noqa: E402
from moebal import AuxLoss, LossFree, Router  # noqa: E402
from moebal.hf import ConversionError, convert_moe_blocks  # noqa: E402
from moebal.hf.native import from_pretrained, save_pretrained, to_native  # noqa: E402
from moebal.policies import EntropyLoss, HashRouting  # noqa: E402

T = transformers
V, D = 97, 64
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(family, seed=0, layers=2, **overrides):
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=D, n_layer=layers, n_head=4, vocab_size=V, n_positions=64, **overrides)
        return T.GPT2LMHeadModel(cfg).eval()
    cls, cfg_cls = {"llama": (T.LlamaForCausalLM, T.LlamaConfig), "mistral": (T.MistralForCausalLM, T.MistralConfig),
                    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config), "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config)}[family]
    extra = {"head_dim": 16} if family == "qwen3" else {}
    cfg = cfg_cls(hidden_size=D, intermediate_size=96, num_hidden_layers=layers, **ATTN, **{**extra, **overrides})
    return cls(cfg).eval()


def _spread(model, seed=1):
    """Experts that differ from one another and routers with spread-out scores (no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, moebal.MoE):
                for p in m.experts.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
                m.router.gate.weight.normal_(0, 0.3, generator=g)
    return model


def _moe_model(family, seed=0, layers=2, **cfg):
    torch.manual_seed(seed)
    if family == "mixtral":
        config = T.MixtralConfig(hidden_size=D, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                                 num_hidden_layers=layers, **ATTN, **cfg)
        cls = T.MixtralForCausalLM
    else:  # DeepSeek-V3 with group-limited routing: 4 groups of 2 experts, the best 2 groups kept
        config = T.DeepseekV3Config(
            hidden_size=D, intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
            n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
            kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            num_hidden_layers=layers, **{**ATTN, "num_key_value_heads": 4}, **cfg)
        cls = T.DeepseekV3ForCausalLM
    model = cls(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "top_k") and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2:
                m.weight.normal_(0, 0.3)
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    return model


def _inputs(seed=0):
    """Three rows of 12 ids, two of them left-padded."""
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


_LOADER = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
ckpt, inputs, out = sys.argv[1:4]
model, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
with torch.no_grad():
    torch.save(model(**torch.load(inputs)).logits, out + ".pt")
report = {k: sorted(map(str, v)) for k, v in info.items()}
report.update(cls=type(model).__name__, config_moebal=getattr(model.config, "moebal", None) is not None,
              plain=all(not type(m).__module__.startswith("moebal") for m in model.modules()),
              moebal_imported=[m for m in sys.modules if m == "moebal" or m.startswith("moebal.")])
assert not report["moebal_imported"], report["moebal_imported"]
json.dump(report, open(out + ".json", "w"))
"""


def _load_without_moebal(ckpt, inputs, tmp_path):
    """transformers' AutoModelForCausalLM.from_pretrained(ckpt) in a fresh Python that never imports moebal."""
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", _LOADER, str(ckpt), str(tmp_path / "inputs.pt"), str(tmp_path / "out")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "out.json").read_text())
    return torch.load(tmp_path / "out.pt"), report


def _layer_states(model):
    return {name: m.state_dict() for name, m in model.named_modules() if isinstance(m, moebal.MoE)}


def _check_export(model, tmp_path, cls_name):
    """to_native(model): a plain transformers model of class ``cls_name`` with model's logits, which
    transformers loads without moebal (no key missing or unexpected), and which converts back into
    moebal layers bit-exact; model itself is left alone."""
    inputs = _inputs()
    real = inputs["attention_mask"].bool()
    ref = _logits(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    native = to_native(model)
    assert type(native).__name__ == cls_name
    assert all(not type(m).__module__.startswith("moebal") for m in native.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in native.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(_logits(native, inputs)[real], ref[real], rtol=1e-5, atol=1e-5)

    ckpt = tmp_path / "native"
    native.save_pretrained(ckpt)
    logits, report = _load_without_moebal(ckpt, inputs, tmp_path)
    assert report["cls"] == cls_name and report["plain"] and not report["config_moebal"]
    assert report["missing_keys"] == report["unexpected_keys"] == report["mismatched_keys"] == []
    assert report["error_msgs"] == []
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-5, atol=1e-5)

    original = _layer_states(model)
    convert_moe_blocks(native, balancer=[m.router.balancer for m in model.modules() if isinstance(m, moebal.MoE)][0])
    back = _layer_states(native)
    assert back.keys() == original.keys()
    for name, state in original.items():
        assert back[name].keys() == state.keys(), name
        for key, value in state.items():
            assert back[name][key].dtype == value.dtype and torch.equal(back[name][key], value), (name, key)
    return native


# --- to_native ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_swapped_llama_and_mistral_export_to_mixtral(family, tmp_path):
    # Llama: head_dim != hidden/heads, scaled rope, tied embeddings; Mistral: a window shorter than the input
    over = ({"head_dim": 32, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
             "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}
            if family == "llama" else {"sliding_window": 5})
    model = _dense(family, **over)
    moebal.swap_ffn(model, 4, 2, router=lambda: Router(D, 4, 2, balancer=AuxLoss(alpha=0.02)))  # upcycled
    native = _check_export(_spread(model), tmp_path, "MixtralForCausalLM")
    cfg = native.config
    for key, value in over.items():
        assert getattr(cfg, key) == value, key
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (4, 2, 96)
    assert cfg.router_aux_loss_coef == 0.02 and cfg.router_jitter_noise == 0.0


def test_swapped_qwen2_with_a_gated_shared_expert_exports_to_qwen2_moe(tmp_path):
    model = _dense("qwen2")
    router = Router(D, 4, 2, renormalize=False, balancer=AuxLoss())  # Qwen2-MoE's norm_topk_prob=False
    moebal.swap_ffn(model, 4, 2, router=router, upcycle=False, d_ff=40, num_shared_experts=1, shared_d_ff=56,
                    shared_gate=True)
    native = _check_export(_spread(model), tmp_path, "Qwen2MoeForCausalLM")
    cfg = native.config
    assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (4, 40, 56)
    assert cfg.norm_topk_prob is False and cfg.mlp_only_layers == [] and cfg.qkv_bias
    assert native.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases carried


def test_partially_swapped_qwen3_exports_with_its_dense_layers_as_mlp_only_layers(tmp_path):
    # a window shorter than the input on every layer: Qwen3-MoE's use_sliding_window
    model = _dense("qwen3", layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=0)
    assert set(model.config.layer_types) == {"sliding_attention"}
    moebal.swap_ffn(model, 4, 2, layers=[1, 2])  # renormalised (upcycling forces it)
    native = _check_export(_spread(model), tmp_path, "Qwen3MoeForCausalLM")
    assert native.config.mlp_only_layers == [0] and native.config.norm_topk_prob is True
    assert native.config.use_sliding_window and native.config.sliding_window == 5
    assert native.config.head_dim == 16 and type(native.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    assert native.model.layers[1].self_attn.q_norm is not None


def test_converted_mixtral_exports_back_to_mixtral(tmp_path):
    model = _moe_model("mixtral")
    convert_moe_blocks(model)
    _check_export(model, tmp_path, "MixtralForCausalLM")


def test_converted_deepseek_v3_with_group_limited_routing_exports_back(tmp_path):
    model = _moe_model("deepseek_v3", layers=3)
    convert_moe_blocks(model)
    assert model.model.layers[1].mlp.router.top_groups == 2
    _check_export(model, tmp_path, "DeepseekV3ForCausalLM")


def test_partly_converted_model_keeps_its_unconverted_blocks():
    model = _moe_model("deepseek_v3", layers=3)
    inputs = _inputs(1)
    ref = _logits(model, inputs)
    convert_moe_blocks(model, layers=[2])
    native = to_native(model)
    assert native.config.first_k_dense_replace == 1
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(_logits(native, inputs)[real], ref[real], rtol=1e-5, atol=1e-5)


def _swapped(family, *args, **kwargs):
    def build():
        model = _dense(family, **kwargs.pop("config", {}))
        moebal.swap_ffn(model, *args, **kwargs)
        return model
    return build


def _pending_counts():
    model = _moe_model("deepseek_v3", layers=2)
    convert_moe_blocks(model)  # LossFree(update="manual")
    model.train()
    model(**_inputs(), labels=_inputs()["input_ids"]).loss.backward()
    return model


REFUSALS = {
    "capacity": (_swapped("llama", 4, 2, capacity_factor=1.25), r"layers 0, 1: capacity_factor=1.25"),
    "null_experts": (_swapped("llama", 4, 2, upcycle=False, router=lambda: Router(D, 4, 2, num_null_experts=2)),
                     r"num_null_experts=2"),
    "hash": (_swapped("llama", 4, 2, upcycle=False,
                      router=lambda: Router(D, 4, 2, balancer=HashRouting(table="round_robin", num_buckets=V))),
             r"hash routing"),
    "gpt2_gelu": (_swapped("gpt2", 4, 2), r"activation='gelu_tanh'.*model_type='gpt2' has no native MoE"),
    "top1_unnormalised": (_swapped("llama", 4, 1, upcycle=False), r"top_k=1 without renormalisation"),
    "partial_mixtral": (_swapped("llama", 4, 2, layers=[0]), r"layers \[1\] are dense"),
    "attention_bias": (_swapped("llama", 4, 2, config={"attention_bias": True}), r"attention_bias=True"),
    "mlp_bias": (_swapped("llama", 4, 2, config={"mlp_bias": True}), r"expert biases.*mlp_bias=True"),
    "loss_free_on_llama": (_swapped("llama", 4, 2, router="loss_free"), r"score='sigmoid' with a loss-free bias"),
    "qwen3_shared": (_swapped("qwen3", 4, 2, upcycle=False, num_shared_experts=1), r"shared experts \(Qwen3-MoE"),
    "qwen2_no_shared": (_swapped("qwen2", 4, 2), r"no gated shared expert"),
    "qwen2_sliding": (_swapped("qwen2", 4, 2, upcycle=False, num_shared_experts=1, shared_gate=True,
                               config={"use_sliding_window": True, "max_window_layers": 1}), r"sliding-window"),
    "pending_counts": (_pending_counts, r"layer 1: loss-free counts not yet applied"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_to_native_refuses_what_the_native_architecture_cannot_compute(case):
    build, match = REFUSALS[case]
    with pytest.raises(ConversionError, match=match):
        to_native(build())


def test_to_native_refuses_layers_that_one_config_cannot_describe_and_bad_input():
    model = _dense("llama")
    moebal.swap_ffn(model, 4, 2, layers=[0])
    moebal.swap_ffn(model, 8, 2, layers=[1])
    with pytest.raises(ConversionError, match=r"layer 1 differs from layer 0 in num_experts \(8 vs 4\)"):
        to_native(model)
    with pytest.raises(ConversionError, match="holds no moebal.MoE"):
        to_native(_dense("llama"))
    with pytest.raises(TypeError, match="PreTrainedModel, got Sequential"):
        to_native(nn.Sequential())


# --- save_pretrained / from_pretrained -----------------------------------------------------------


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_round_trip_is_bit_exact_and_keeps_pending_loss_free_counts(tmp_path):
    model = _dense("llama")
    moebal.swap_ffn(model, 4, 2, router=lambda: Router(D, 4, 2, score="sigmoid",
                                                       balancer=LossFree(rate=0.01, update="manual")))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(3):
        model(**_inputs(step), labels=_inputs(step)["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        moebal.update_biases(model)
    model(**_inputs(9), labels=_inputs(9)["input_ids"]).loss.backward()  # counted, not yet applied
    model.eval()
    counts = model.model.layers[1].mlp.router.load_counts
    assert counts.sum() > 0 and model.model.layers[1].mlp.router.expert_bias.abs().sum() > 0

    record = save_pretrained(model, tmp_path / "ckpt")
    assert not hasattr(model.config, "moebal")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["moebal"]
    assert saved == json.loads(json.dumps(record)) and saved["version"] == moebal.__version__
    layer = saved["layers"][1]
    assert layer["path"] == "model.layers.1.mlp" and layer["capacity_factor"] is None
    assert layer["router"]["balancer"] == {"type": "LossFree", "rate": 0.01, "update": "manual", "rule": "sign",
                                           "center": False, "real_per_token": None}

    loaded = from_pretrained(tmp_path / "ckpt")
    assert not hasattr(loaded.config, "moebal") and not loaded.training
    _assert_same_state(model, loaded)
    inputs = _inputs(5)
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    moebal.update_biases(model)
    moebal.update_biases(loaded)  # the pending counts came back: the same update follows
    _assert_same_state(model, loaded)


def test_round_trip_keeps_per_layer_settings_dropout_and_hash_tables(tmp_path):
    model = _dense("gpt2", resid_pdrop=0.1)
    counts = torch.rand(V, generator=torch.Generator().manual_seed(0)) + 0.5
    moebal.swap_ffn(model, 4, 2, layers=[0], upcycle=False,
                    router=lambda: Router(D, 4, 2, balancer=HashRouting(table="balanced", counts=counts)))
    moebal.swap_ffn(model, 6, 2, layers=[1], upcycle=False, capacity_factor=1.5, drop_policy="weight",
                    num_shared_experts=1, backend="torch",
                    router=lambda: Router(D, 6, 2, z_loss=1e-3, balancer=(AuxLoss(0.02, "sequence"), EntropyLoss(0.1))))
    model.transformer.h[1].mlp.dropout.p = 0.25  # not the dense FFN's: recorded and set back
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    for i in (0, 1):
        a, b = model.transformer.h[i].mlp, loaded.transformer.h[i].mlp
        assert type(b).__name__ == "MoEWithDropout" and repr(a) == repr(b)
        assert (b.capacity_factor, b.dropout.p) == (a.capacity_factor, a.dropout.p)
    assert loaded.transformer.h[0].mlp.router.policies[0].counts.equal(counts.double())
    _assert_same_state(model, loaded)
    inputs = _inputs(2)
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))


@pytest.mark.parametrize("family", ["opt", "bloom"])
def test_round_trip_of_an_ffn_on_the_decoder_layer_and_of_a_residual_mlp(family, tmp_path):
    # OPT: the MoE sits at fc1, fc2 and the activation became nn.Identity; Bloom: MoEWithResidual
    torch.manual_seed(0)
    cls, cfg = {"opt": (T.OPTForCausalLM, T.OPTConfig(ffn_dim=96, num_attention_heads=4, hidden_size=D,
                                                     num_hidden_layers=2, vocab_size=V, max_position_embeddings=64,
                                                     word_embed_proj_dim=D)),
                "bloom": (T.BloomForCausalLM, T.BloomConfig(hidden_size=D, n_layer=2, n_head=4, vocab_size=V))}[family]
    model = cls(cfg).eval()
    moebal.swap_ffn(model, 4, 2)
    save_pretrained(_spread(model), tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    _assert_same_state(model, loaded)
    assert [type(m).__name__ for m in loaded.modules() if isinstance(m, moebal.MoE)] == \
        [type(m).__name__ for m in model.modules() if isinstance(m, moebal.MoE)]
    inputs = _inputs(3)
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))


def test_from_pretrained_refuses_a_checkpoint_without_the_record_and_bad_input(tmp_path):
    plain = _dense("llama")
    moebal.swap_ffn(plain, 4, 2)
    plain.save_pretrained(tmp_path / "plain")  # transformers' own save: no record
    with pytest.raises(ValueError, match=r"config.json has no 'moebal' record.*moebal.hf.save_pretrained"):
        from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="is not a directory"):
        from_pretrained(tmp_path / "missing")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        from_pretrained(3)
    with pytest.raises(TypeError, match="takes no config"):
        from_pretrained(tmp_path / "plain", config=plain.config)


def test_save_pretrained_refuses_converted_models_and_models_without_moe(tmp_path):
    converted = _moe_model("mixtral")
    convert_moe_blocks(converted)
    with pytest.raises(ConversionError, match=r"MixtralSparseMoeBlock there.*to_native"):
        save_pretrained(converted, tmp_path / "a")
    with pytest.raises(ConversionError, match="holds no moebal.MoE"):
        save_pretrained(_dense("llama"), tmp_path / "b")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_pretrained(nn.Linear(2, 2), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_plain_transformers_loads_a_moebal_checkpoint_as_the_dense_model_and_says_so(tmp_path):
    model = _dense("llama")
    moebal.swap_ffn(model, 4, 2)
    save_pretrained(model, tmp_path / "ckpt")
    _, report = _load_without_moebal(tmp_path / "ckpt", _inputs(), tmp_path)
    assert report["cls"] == "LlamaForCausalLM" and report["config_moebal"]  # the record is there to detect
    assert report["unexpected_keys"] and all(".mlp.router." in k or ".mlp.experts." in k
                                             for k in report["unexpected_keys"])
    assert report["missing_keys"] == sorted(f"model.layers.{i}.mlp.{p}_proj.weight"
                                            for i in (0, 1) for p in ("down", "gate", "up"))
