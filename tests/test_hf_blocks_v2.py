"""transformers MoE blocks that moebal can now represent: DeepSeek-V3 group-limited routing
(``n_group`` / ``topk_group``) and Mixtral's router jitter. Each converted block is checked
against the HF block it came from (outputs, chosen experts) and converted back bit for bit.
Tiny random-weight configs built locally, no downloads."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the HF integration tests need transformers (moebal[hf])")

from moebal.hf import (  # noqa: E402
    ConversionError,
    convert_moe_blocks,
    from_hf_moe_block,
    restore_moe_blocks,
    to_hf_moe_block,
)

V = 97
D = 32


def _deepseek_config(E=8, G=4, M=2, K=2, norm=True, layers=2, **extra):
    cfg = transformers.DeepseekV3Config(
        hidden_size=D, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=E, num_experts_per_tok=K,
        n_group=G, topk_group=M, norm_topk_prob=norm, routed_scaling_factor=2.5, n_shared_experts=1,
        first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, vocab_size=V,
        max_position_embeddings=64, **extra,
    )
    cfg._experts_implementation = "eager"
    return cfg


def _mixtral_config(jitter=0.1, layers=2):
    cfg = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, router_jitter_noise=jitter,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
        max_position_embeddings=64,
    )
    cfg._experts_implementation = "eager"
    return cfg


def _randomise(module, bias_std=0.1):
    """Spread-out router scores (no near-ties) and a nonzero selection bias."""
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "top_k") and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2:
                m.weight.normal_(0, 0.3)
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, bias_std)
    return module


def _init(block):
    """A bare block's weights are torch.empty (HF initialises them in the model's post_init)."""
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    return block


def _deepseek_block(seed=0, bias_std=0.1, **cfg):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(seed)
    return _randomise(_init(DeepseekV3MoE(_deepseek_config(**cfg))), bias_std).eval()


def _mixtral_block(seed=0, jitter=0.1):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    return _randomise(_init(MixtralSparseMoeBlock(_mixtral_config(jitter)))).eval()


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --- DeepSeek-V3 group-limited routing ------------------------------------------------------


@pytest.mark.parametrize(
    "E, G, M, K, norm, bias_std",
    [
        (8, 4, 2, 2, True, 0.1),  # the brief's n_group=4, topk_group=2: groups of two experts
        (16, 8, 3, 4, True, 0.1),  # odd topk_group, K > experts per group: the pick spans kept groups
        (16, 4, 1, 4, False, 0.1),  # one kept group and K = its size: every kept expert chosen, no renorm
        # odd experts' biased scores all negative: each token's third pick is a kept expert scoring below
        # zero, where transformers 4.x's 0.0 mask would have picked an excluded expert instead
        (8, 4, 2, 3, True, "negative"),
    ],
)
def test_group_limited_block_equals_hf_block(E, G, M, K, norm, bias_std):
    block = _deepseek_block(E=E, G=G, M=M, K=K, norm=norm, bias_std=0.1)
    if bias_std == "negative":
        with torch.no_grad():
            block.gate.e_score_correction_bias[1::2] -= 1.5
    moe = from_hf_moe_block(block)
    assert (moe.router.num_groups, moe.router.top_groups) == (G, M)
    assert torch.equal(moe.router.expert_bias, block.gate.e_score_correction_bias)
    x_TD = torch.randn(64, D, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        _, hf_w_TK, hf_idx_TK = block.gate(x_TD)
        r = moe.router(x_TD)
    # the same experts, token by token (HF's top-k is unsorted: compare sorted indices)
    assert torch.equal(hf_idx_TK.sort(-1).values, r.indices.sort(-1).values)
    # the same weights: fp32 both sides; renormalised sums add in another order (and HF adds 1e-20)
    torch.testing.assert_close(r.weights.gather(1, r.indices.argsort(-1)), hf_w_TK.gather(1, hf_idx_TK.argsort(-1)),
                               rtol=1e-6, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(moe(x_TD), block(x_TD.unsqueeze(0)).squeeze(0), rtol=1e-6, atol=1e-6)

    # the group limit changed the choice for some tokens, so this test can see it
    select_TE = torch.sigmoid(x_TD @ block.gate.weight.t()) + block.gate.e_score_correction_bias
    free_TK = select_TE.topk(K, dim=-1).indices.sort(-1).values
    assert (free_TK != r.indices.sort(-1).values).any(dim=-1).sum() >= 4
    if bias_std == "negative":
        assert (select_TE.gather(1, r.indices) < 0).any(dim=-1).all()


def test_group_limited_model_converts_and_restores_bit_exact():
    torch.manual_seed(0)
    model = _randomise(transformers.DeepseekV3ForCausalLM(_deepseek_config(E=8, G=4, M=2, K=2))).eval()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = convert_moe_blocks(model)
    assert [r.path for r in report] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    router = model.model.layers[1].mlp.router
    assert (router.num_groups, router.top_groups, router.score, router.scale) == (4, 2, "sigmoid", 2.5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)  # fp32 model, two layers

    restore_moe_blocks(model, report)
    gate = model.model.layers[1].mlp.gate
    assert type(gate).__name__ == "DeepseekV3TopkRouter" and (gate.num_group, gate.topk_group) == (4, 2)
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    for key in original:
        assert restored[key].dtype == original[key].dtype and torch.equal(restored[key], original[key]), key
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_restoring_refuses_a_config_with_other_groups():
    block = _deepseek_block(E=8, G=4, M=2, K=2)
    moe = from_hf_moe_block(block)
    _assert_same_state(to_hf_moe_block(moe, type(block), block.config), block)
    with pytest.raises(ConversionError, match=r"groups: layer \(4, 2\), block \(4, 3\)"):
        to_hf_moe_block(moe, type(block), _deepseek_config(E=8, G=4, M=3, K=2))
    with pytest.raises(ConversionError, match=r"groups: layer \(4, 2\), block \(1, None\)"):
        to_hf_moe_block(moe, type(block), _deepseek_config(E=8, G=4, M=4, K=2))  # every group kept
    plain = from_hf_moe_block(_deepseek_block(E=8, G=4, M=4, K=2))  # topk_group == n_group: plain top-k
    assert plain.router.top_groups is None
    with pytest.raises(ConversionError, match=r"groups: layer \(1, None\), block \(4, 2\)"):
        to_hf_moe_block(plain, type(block), block.config)


@pytest.mark.parametrize(
    "E, G, M, K, match",
    [
        (8, 3, 1, 2, "does not divide"),  # transformers' view(-1, 3, 8 // 3) fails
        (8, 8, 4, 2, "groups of one expert"),  # transformers' topk(2) over a group of one fails
        (8, 4, 1, 3, "top_k=3 exceeds the 2 experts"),  # transformers would pick masked (-inf) experts
    ],
)
def test_group_limited_routing_hf_cannot_run_is_refused(E, G, M, K, match):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    block = DeepseekV3MoE(_deepseek_config(E=E, G=G, M=M, K=K))
    with pytest.raises(ConversionError, match=match):
        from_hf_moe_block(block)


# --- Mixtral router jitter --------------------------------------------------------------------


def test_jittered_mixtral_block_equals_hf_block_in_training_and_eval():
    block = _mixtral_block(jitter=0.1)
    moe = from_hf_moe_block(block)
    assert moe.jitter_noise == 0.1
    x = torch.randn(2, 10, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), block(x.clone()), rtol=1e-6, atol=1e-6)  # eval: no noise

    block.train()
    moe.train()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(7)
    ya = block(xa * 1.0)  # Mixtral multiplies its input in place: hand it a non-leaf copy
    torch.manual_seed(7)
    x_seen = xb.detach().clone()
    yb = moe(xb)
    assert torch.equal(xb.detach(), x_seen)  # moebal leaves its input alone
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(moe.eval()(x), yb, rtol=1e-3, atol=1e-3)  # the jitter did change the output
    moe.train()
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moe.router.gate.weight.grad, block.gate.weight.grad, rtol=1e-4, atol=1e-5)


def test_jittered_mixtral_model_trains_alike_and_restores_bit_exact():
    torch.manual_seed(0)
    model = _randomise(transformers.MixtralForCausalLM(_mixtral_config(jitter=0.05))).train()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(9)
    ref = model(ids).logits.detach()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = convert_moe_blocks(model)
    assert all(model.get_submodule(r.path).jitter_noise == 0.05 for r in report)
    torch.manual_seed(9)  # the two layers draw their noise in the same order as the HF blocks did
    torch.testing.assert_close(model(ids).logits.detach(), ref, rtol=1e-5, atol=1e-5)

    back = restore_moe_blocks(model, report)
    assert [r.new_class for r in back] == ["MixtralSparseMoeBlock"] * 2
    assert model.model.layers[0].mlp.jitter_noise == 0.05 and model.model.layers[0].mlp.training
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    for key in original:
        assert torch.equal(restored[key], original[key]), key
    torch.manual_seed(9)
    assert torch.equal(model(ids).logits.detach(), ref)


def test_jitter_mismatch_and_unrepresentable_jitter_are_refused():
    block = _mixtral_block(jitter=0.1)
    moe = from_hf_moe_block(block)
    _assert_same_state(to_hf_moe_block(moe, type(block), block.experts.config), block)
    moe.jitter_noise = 0.2
    with pytest.raises(ConversionError, match="jitter: layer 0.2, block 0.1"):
        to_hf_moe_block(moe, type(block), block.experts.config)
    with pytest.raises(ConversionError, match=r"router_jitter_noise=1.0 >= 1"):
        from_hf_moe_block(_mixtral_block(jitter=1.0))
    assert from_hf_moe_block(_mixtral_block(jitter=-0.1)).jitter_noise == 0.0  # HF applies it only when > 0


def test_qwen_blocks_have_no_jitter_and_one_that_does_is_refused():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    small = dict(hidden_size=D, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    blocks = [_init(Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(shared_expert_intermediate_size=24, **small))),
              _init(Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(**small)))]
    for block in blocks:
        assert not hasattr(block, "jitter_noise")  # transformers 5.x: no jitter in these families
        assert from_hf_moe_block(block).jitter_noise == 0.0
        block.jitter_noise = 0.1  # a future or patched block with jitter: not silently dropped
        with pytest.raises(ConversionError, match="has no jitter moebal knows of"):
            from_hf_moe_block(block)
