"""Padding and token ids reach moebal layers inside transformers models (moebal.hf.tokens).

Tiny random-weight Llamas swapped with ``swap_ffn``, batches padded on the right or the
left: every real token must come out as it does when its sequence runs alone, and the
layers' loads, losses and gradients must count real tokens only, through KV-cache
generation, deepcopy/pickle, both gradient-checkpointing modes and torch.compile.
``test_convert_moe_blocks_attaches_the_source`` needs ``convert_moe_blocks`` to call
``attach_token_source``.
"""
import copy
import io

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the HF integration tests need transformers (moebal[hf])")

import moebal  # noqa: E402
from moebal import MoE  # noqa: E402
from moebal.hf import TokenSource, attach_token_source, convert_moe_blocks, detach_token_source  # noqa: E402

V, PAD = 97, 0
LENGTHS = (12, 5, 9)  # one full row, two padded rows of different lengths


def _llama(seed=0, **moe_kwargs):
    """A tiny Llama, FFNs swapped for fresh (not upcycled) experts, so routing shapes the output."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=64,
                                   pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    moebal.swap_ffn(model, num_experts=4, top_k=2, upcycle=False, **moe_kwargs)
    return model


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def _sequences(seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g) for n in lengths]


def _pad(seqs, side):
    """ids, attention_mask (int64, 1 = real) and position_ids of a padded batch."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), PAD)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(S - len(s), S)
        ids[b, cols], mask[b, cols] = s, 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _real(t_BS, mask, b):
    return t_BS[b][mask[b].bool()]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _hook_counts(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in (model, model.model)]


def test_swap_hooks_both_entry_points_once_and_every_layer_reads_one_source():
    model = _llama()
    source = _layers(model)[0].token_source
    assert isinstance(source, TokenSource) and all(m.token_source is source for m in _layers(model))
    assert _hook_counts(model) == [(1, 1), (1, 1)]  # LlamaForCausalLM and its LlamaModel
    assert attach_token_source(model) is source  # idempotent: no second pair of hooks
    assert attach_token_source(model.model) is source
    assert _hook_counts(model) == [(1, 1), (1, 1)]
    detach_token_source(model)
    assert not model._forward_pre_hooks and not model.model._forward_hooks
    assert all(m.token_source is None for m in _layers(model))


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(side):
    """Logits of real tokens match the unpadded run; each layer's load is the sum of the
    loads of the sequences run alone (padding is not routed), in eval and no_grad."""
    model, seqs = _llama(), _sequences()
    ids, mask, pos = _pad(seqs, side)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos).logits
        loads = [m.last_stats.load.clone() for m in _layers(model)]
        alone_loads = [torch.zeros_like(load) for load in loads]
        for b, s in enumerate(seqs):
            ref = model(s[None]).logits[0]
            torch.testing.assert_close(_real(out, mask, b), ref, rtol=1e-5, atol=1e-5)
            for acc, m in zip(alone_loads, _layers(model)):
                acc += m.last_stats.load
    for load, ref in zip(loads, alone_loads):
        assert torch.equal(load, ref), (load, ref)
        assert int(load.sum()) == sum(LENGTHS) * 2  # T_real * K


def test_aux_loss_counts_real_tokens_only():
    """Layer 0's input for a real token is its input when run alone, so the padded batch's
    balancing loss is the loss of the layer run on the real tokens' rows, concatenated."""
    model, seqs = _llama().train(), _sequences(1)
    moe0 = _layers(model)[0]
    seen = []
    handle = moe0.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for s in seqs:
            model(s[None])
    handle.remove()
    rows = torch.cat([x[0] for x in seen])
    ids, mask, pos = _pad(seqs, "left")
    model(ids, attention_mask=mask, position_ids=pos)
    padded_aux = moe0.aux_loss.detach()
    moe0(rows)  # called outside a model forward: no mask, every row is real
    assert float(padded_aux) > 0
    torch.testing.assert_close(padded_aux, moe0.aux_loss.detach(), rtol=1e-5, atol=1e-7)


def test_generate_left_padded_equals_each_sequence_alone():
    """Greedy generation with a KV cache: each step's layers see the last S columns of the
    [B, past + S] mask; a left-padded batch generates what each prompt generates alone."""
    model, seqs = _llama(2), _sequences(2, (7, 3, 5))
    source = _layers(model)[0].token_source
    seen, tokens = [], source.tokens

    def spy(shape):
        mask, ids = tokens(shape)
        seen.append(tuple(None if t is None else tuple(t.shape) for t in (torch.empty(shape), mask, ids)))
        return mask, ids

    source.tokens = spy  # layers call token_source.tokens(x.shape[:-1])
    ids, mask, _ = _pad(seqs, "left")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
        assert ((3, 1), (3, 1), (3, 1)) in seen  # a decode step: one current token per row
        assert ((3, 7), (3, 7), (3, 7)) in seen  # the prefill
        del source.tokens
        for b, s in enumerate(seqs):
            alone = model.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **kw)
            assert torch.equal(out[b], alone[0, len(s):]), (b, out[b], alone[0, len(s):])


def test_entry_by_position_by_embeddings_and_through_the_base_model():
    model, seqs = _llama(3), _sequences(3)
    ids, mask, pos = _pad(seqs, "right")

    def loads(run):
        with torch.no_grad():
            run()
        return [m.last_stats.load.clone() for m in _layers(model)]

    ref = loads(lambda: model(input_ids=ids, attention_mask=mask))
    embeds = model.model.embed_tokens(ids).detach()
    for got in (loads(lambda: model(ids, mask)),
                loads(lambda: model(inputs_embeds=embeds, attention_mask=mask)),
                loads(lambda: model.model(ids, attention_mask=mask))):
        assert all(map(torch.equal, got, ref))
    unmasked = loads(lambda: model(ids))
    assert not all(map(torch.equal, unmasked, ref))  # without the mask the padding is counted


class _Block(nn.Module):
    """An entry point calling its MoE on flattened [B*S, D] rows, or sequence-first [S, B, D]."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.emb = nn.Embedding(V, 16)
        self.moe = MoE(16, 24, 4, 2)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        if self.layout == "flat":
            return self.moe(h.reshape(-1, h.shape[-1])).view_as(h)
        return self.moe(h.transpose(0, 1)).transpose(0, 1)


def test_ids_reach_the_layer_and_a_flattening_block_gets_flat_tokens():
    """A block that calls its MoE on [B*S, D] rows gets a [B*S] mask and ids."""
    torch.manual_seed(0)
    model = _Block("flat").eval()
    source = attach_token_source(model)
    ids, mask, _ = _pad(_sequences(4), "left")
    got, tokens = [], source.tokens
    source.tokens = lambda shape: got.append(tokens(shape)) or got[-1]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    (m, i), = got
    assert torch.equal(m, mask.bool().reshape(-1)) and torch.equal(i, ids.reshape(-1))
    assert int(model.moe.last_stats.load.sum()) == sum(LENGTHS) * 2
    assert tokens((3, 12)) == (None, None)  # outside any forward


def test_a_layer_input_the_mask_cannot_map_to_raises():
    model = _Block("seq_first").eval()
    attach_token_source(model)
    ids, mask, _ = _pad(_sequences(4), "right")
    with pytest.raises(ValueError, match=r"token shape \(12, 3\).*attention_mask \(3, 12\)"):
        with torch.no_grad():
            model(ids, attention_mask=mask)
    with torch.no_grad():
        model(ids)  # no mask: the ids do not fit either, and only a layer that needs them would raise


@pytest.mark.parametrize("bad", [
    torch.ones(3, 1, 12, 12),  # a 4-D attention mask: cannot be read as padding
    torch.ones(3, 12, dtype=torch.long)[:, None],  # 3-D
    torch.ones(2, 12, dtype=torch.long),  # the wrong batch
    torch.ones(3, 11, dtype=torch.long),  # shorter than the inputs
], ids=["4d", "3d", "batch", "short"])
def test_unmappable_attention_mask_raises_naming_its_shape(bad):
    model = _llama()
    ids = _pad(_sequences(), "right")[0]
    with pytest.raises(ValueError, match=str(tuple(bad.shape)).replace("(", r"\(").replace(")", r"\)")):
        with torch.no_grad():
            model(ids, attention_mask=bad)
    source = _layers(model)[0].token_source
    assert source._stack == []  # nothing left behind for the next forward
    with torch.no_grad():
        model(ids)


def test_deepcopy_and_pickle_read_their_own_source():
    model, seqs = _llama(5), _sequences(5)
    ids, mask, pos = _pad(seqs, "left")
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos)
    ref = [m.last_stats.load.clone() for m in _layers(model)]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [copy.deepcopy(model), torch.load(buf, weights_only=False)]
    for dup in copies:
        source = _layers(dup)[0].token_source
        assert source is not _layers(model)[0].token_source
        assert all(m.token_source is source for m in _layers(dup))
        assert next(iter(dup._forward_pre_hooks.values())).source is source
        assert attach_token_source(dup) is source and len(dup._forward_pre_hooks) == 1
        for m in _layers(model):
            m.last_stats = None
        with torch.no_grad():
            dup(ids, attention_mask=mask, position_ids=pos)
        assert all(m.last_stats is None for m in _layers(model))  # the original's layers did not run
        assert all(map(torch.equal, [m.last_stats.load for m in _layers(dup)], ref))


def _grads(model, batches, with_aux, call=None):
    """Parameter gradients of the summed losses of ``batches`` (run through ``call``, default ``model``)."""
    model.zero_grad()
    loss = 0
    for ids, mask, pos in batches:  # every forward first, one backward: recomputes come after all of them
        labels = ids.masked_fill(mask == 0, -100)
        loss = loss + (model if call is None else call)(ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        if with_aux:
            loss = loss + moebal.aux_loss(model)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_recompute_sees_each_forwards_mask(reentrant):
    """With a capacity, padding would take expert slots from real tokens, so the mask changes
    the gradients; a recompute (after the forward hook ran, and after a second forward with
    another mask) must see its own forward's mask: gradients equal those without checkpointing."""
    model = _llama(6, capacity_factor=1.0).train()
    batches = [_pad(_sequences(6), "left"), _pad(_sequences(7, (4, 12, 8)), "right")]
    # reentrant: the first pass runs under no_grad, so aux_loss read after it carries no gradient
    with_aux = not reentrant
    ckpt = copy.deepcopy(model)
    # activation_checkpointing_enable: transformers 5's name for gradient_checkpointing_enable
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ref = _grads(model, batches, with_aux)
    got = _grads(ckpt, batches, with_aux)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    detach_token_source(model)
    unmasked = _grads(model, batches, with_aux)
    assert any(not torch.allclose(unmasked[n], ref[n], atol=1e-6) for n in ref)  # the mask mattered


def test_torch_compile_sees_each_calls_mask():
    model, seqs = _llama(8), _sequences(8)
    compiled = torch.compile(model, backend="aot_eager")
    for side in ("right", "left"):
        ids, mask, pos = _pad(seqs, side)
        with torch.no_grad():
            ref = model(ids, attention_mask=mask, position_ids=pos).logits
            ref_loads = [m.last_stats.load.clone() for m in _layers(model)]
            got = compiled(ids, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert all(map(torch.equal, [m.last_stats.load for m in _layers(model)], ref_loads))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_torch_compile_with_checkpointing_recompute_sees_each_forwards_mask(reentrant):
    """transformers' checkpointing graph-breaks under torch.compile, so its layers recompute in
    eager code; the hooks then record eagerly and the gradients equal eager's without checkpointing."""
    model = _llama(6, capacity_factor=1.0).train()
    batches = [_pad(_sequences(6), "left"), _pad(_sequences(7, (4, 12, 8)), "right")]
    ckpt = copy.deepcopy(model)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ref = _grads(model, batches, False)
    got = _grads(ckpt, batches, False, call=torch.compile(ckpt, backend="aot_eager"))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_convert_moe_blocks_attaches_the_source():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=V, max_position_embeddings=64)
    model = transformers.MixtralForCausalLM(cfg).eval()
    convert_moe_blocks(model)
    sources = {id(m.token_source) for m in _layers(model)}
    assert len(sources) == 1 and isinstance(_layers(model)[0].token_source, TokenSource)
    ids, mask, pos = _pad(_sequences(9), "right")
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos)
    assert all(int(m.last_stats.load.sum()) == sum(LENGTHS) * 2 for m in _layers(model))
