"""moebal.MoE in the setups people train in: activation checkpointing (both modes, HF's
gradient checkpointing), dtype casts, autocast, copies and EMA, meta-device init.

Every check compares with an independent reference: the un-checkpointed step on an
identical copy, an fp32 copy, an ``nn.Linear`` FFN under the same autocast, hand-made
counts. (DDP with ``broadcast_buffers=True`` is in test_distributed.py.)
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moebal
from moebal import AuxLoss, LossFree, Router
from moebal.layer import DenseFFN
from moebal.parallel import GlobalBatchBalance

D, F, E, K = 16, 24, 8, 2


def _x(T=64, seed=0, dtype=torch.float32):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _run(moe, x, mode):
    """One training forward + backward of ``moe`` on ``x``: plain, or under a checkpoint."""
    x = x.clone().requires_grad_()
    if mode == "plain":
        y, aux = moe(x), moe.aux_loss
    elif mode == "non_reentrant":
        y = checkpoint(moe, x, use_reentrant=False)
        aux = moe.aux_loss  # read after the forward, as a user would
    else:  # reentrant: the first pass runs under no_grad; the documented recipe returns the loss
        y, aux = checkpoint(lambda t: (moe(t), moe.aux_loss), x, use_reentrant=True)
    loss = y.square().mean() + aux
    loss.backward()
    return y.detach(), x.grad, aux.detach()


ROUTERS = {
    # the default loss-free router at a rate large enough that one update changes routing
    "loss_free_auto": lambda: Router(D, E, K, score="sigmoid", balancer=LossFree(rate=0.05)),
    "loss_free_manual": lambda: Router(D, E, K, score="sigmoid", balancer=LossFree(rate=0.05, update="manual")),
    "aux_batch": lambda: Router(D, E, K, balancer=AuxLoss(alpha=0.1), z_loss=1e-3),
    "aux_sequence": lambda: Router(D, E, K, balancer=AuxLoss(alpha=0.1, variant="sequence")),
    "base": lambda: Router(D, E, K, balancer=moebal.LinearAssignment()),
}


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_checkpointed_steps_equal_plain_steps(router, mode):
    """Three optimizer steps: outputs, every gradient, the aux loss, the bias and the counts
    equal those of an identical un-checkpointed copy, bit for bit."""
    torch.manual_seed(0)
    ref = moebal.MoE(D, F, E, K, router=ROUTERS[router]())
    if isinstance(ref.router.balancer, LossFree):
        with torch.no_grad():  # biases that already steer the selection
            ref.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, E))
    ck = copy.deepcopy(ref)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ck)]
    for step in range(3):
        x = _x(T=48, seed=step).view(3, 16, D)  # [B, S, D]: the sequence loss needs S
        want = _run(ref, x, "plain")
        got = _run(ck, x, mode)
        for a, b, what in zip(want, got, ("output", "x.grad", "aux_loss")):
            assert torch.equal(a, b), f"step {step}: {what} differs"
        gw, gg = _grads(ref), _grads(ck)
        assert gw.keys() == gg.keys()
        for name in gw:
            assert torch.equal(gw[name], gg[name]), f"step {step}: grad of {name} differs by {(gw[name] - gg[name]).abs().max()}"
        assert torch.equal(ref.last_stats.load, ck.last_stats.load)
        assert int(ck.last_stats.load.sum()) == 48 * K
        if isinstance(ref.router.balancer, LossFree):
            assert torch.equal(ref.router.load_counts, ck.router.load_counts)
            assert torch.equal(ref.router.expert_bias, ck.router.expert_bias)
            if ref.router.balancer.update == "manual":
                assert int(ck.router.load_counts.sum()) == (step + 1) * 48 * K  # counted once per forward
        for opt in opts:
            opt.step()
            opt.zero_grad()
    if isinstance(ref.router.balancer, LossFree) and ref.router.balancer.update == "auto":
        # the bias moved exactly once per step: each element by -rate, 0 or +rate three times
        steps = (ck.router.expert_bias - torch.linspace(-0.1, 0.1, E)) / 0.05
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 3


def test_auto_loss_free_bias_moves_once_per_checkpointed_step():
    """With the bias already moved by the first pass, the recompute must route as the first
    pass did; counting the recompute too would give 2*T*K pairs."""
    torch.manual_seed(1)
    moe = moebal.MoE(D, F, E, K, router=Router(D, E, K, score="sigmoid", balancer=LossFree(rate=0.05, update="manual")))
    x = _x(T=40).requires_grad_()
    checkpoint(moe, x, use_reentrant=False).sum().backward()
    assert int(moe.router.load_counts.sum()) == 40 * K


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_global_batch_window_counts_checkpointed_micro_batches_once(mode):
    torch.manual_seed(2)
    ref = moebal.MoE(D, F, E, K, router=Router(D, E, K, balancer=AuxLoss(alpha=0.1, variant="global_batch")))
    ck = copy.deepcopy(ref)
    results = []
    for moe, m in ((ref, "plain"), (ck, mode)):
        with GlobalBatchBalance(moe) as window:
            outs = [_run(moe, _x(T=32, seed=10 + g), m) for g in range(3)]
        results.append((outs, window.loss, window.loads[0], _grads(moe)))
    (o1, l1, n1, g1), (o2, l2, n2, g2) = results
    assert torch.equal(n1, n2) and int(n2.sum()) == 3 * 32 * K
    assert torch.equal(l1, l2)
    for a, b in zip(o1, o2):
        for t1, t2 in zip(a, b):
            assert torch.equal(t1, t2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_non_reentrant_aux_loss_read_after_forward_carries_gradient():
    torch.manual_seed(3)
    moe = moebal.MoE(D, F, E, K, router="aux_loss")
    y = checkpoint(moe, _x(T=32).requires_grad_(), use_reentrant=False)
    assert moe.aux_loss.requires_grad
    moe.aux_loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_recompute_in_backward_does_not_overwrite_logged_values():
    torch.manual_seed(4)
    moe = moebal.MoE(D, F, E, K, router="aux_loss")
    y = checkpoint(moe, _x(T=32).requires_grad_(), use_reentrant=False)
    aux, stats = moe.aux_loss, moe.last_stats
    y.sum().backward()
    assert moe.aux_loss is aux and moe.last_stats is stats


def test_hf_gradient_checkpointing_equals_plain_training():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=61, max_position_embeddings=32)
    torch.manual_seed(5)
    ref = transformers.LlamaForCausalLM(cfg)
    moebal.swap_ffn(ref, 4, 2, router=lambda: Router(32, 4, 2, score="sigmoid", balancer=LossFree(rate=0.05)),
                    upcycle=False, d_ff=24)
    ck = copy.deepcopy(ref)
    for kwargs in ({"use_reentrant": False}, None):
        ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for m in (ref, ck):
            m.train()
            m.zero_grad()
        ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(6))
        for m in (ref, ck):
            m(ids, labels=ids).loss.backward()
        assert ck.is_gradient_checkpointing
        for (name, p), q in zip(ref.named_parameters(), ck.parameters()):
            assert torch.equal(p.grad, q.grad), f"{kwargs}: {name}"
        for a, b in zip(ref.modules(), ck.modules()):
            if isinstance(a, Router):
                assert torch.equal(a.expert_bias, b.expert_bias)


# --- dtype casts --------------------------------------------------------------------------


@pytest.mark.parametrize("cast", ["to_bf16", "half", "bfloat16", "double", "to_cpu_bf16"])
def test_casts_keep_balancing_state_fp32_and_int64(cast):
    moe = moebal.MoE(D, F, E, K, router=Router(D, E, K, score="sigmoid", balancer=LossFree(update="manual")))
    with torch.no_grad():
        moe.router.expert_bias.fill_(1.0 + 2**-20)  # not representable in bf16/fp16
    moe.router(_x(T=5))  # some pending counts
    before = moe.router.load_counts.clone()
    {"to_bf16": lambda: moe.to(torch.bfloat16), "half": moe.half, "bfloat16": moe.bfloat16,
     "double": moe.double, "to_cpu_bf16": lambda: moe.to("cpu", torch.bfloat16)}[cast]()
    assert moe.router.expert_bias.dtype == torch.float32
    assert moe.router.expert_bias[0].item() == 1.0 + 2**-20
    assert moe.router.load_counts.dtype == torch.int64 and torch.equal(moe.router.load_counts, before)
    assert moe.router.gate.weight.dtype != torch.float32  # the parameters were cast


def test_bias_keeps_moving_after_casting_the_model_to_bf16():
    moe = moebal.MoE(D, F, E, K, router="loss_free").to(torch.bfloat16)
    with torch.no_grad():
        moe.router.expert_bias.fill_(1.0)
    for step in range(20):
        moe(_x(T=32, seed=step, dtype=torch.bfloat16))
    moved = (moe.router.expert_bias - 1.0).abs()
    assert moved.max() > 0
    # each update adds +-1e-3 or 0 in fp32: the total is a multiple of the rate
    assert torch.allclose(moved / 1e-3, (moved / 1e-3).round(), atol=1e-3)


def test_state_dict_from_a_cast_model_restores_fp32():
    src = moebal.MoE(D, F, E, K, router="loss_free")
    with torch.no_grad():
        src.router.expert_bias.copy_(torch.linspace(-1, 1, E))
    sd = src.to(torch.bfloat16).state_dict()
    assert sd["router.expert_bias"].dtype == torch.float32 and sd["router.load_counts"].dtype == torch.int64
    legacy = dict(sd, **{"router.expert_bias": sd["router.expert_bias"].bfloat16()})  # a bf16 bias from elsewhere
    for state in (sd, legacy):
        dst = moebal.MoE(D, F, E, K, router="loss_free")
        dst.load_state_dict(state)
        assert dst.router.expert_bias.dtype == torch.float32
        assert torch.equal(dst.router.expert_bias, state["router.expert_bias"].float())


def test_load_counts_round_trip_through_state_dict():
    a = moebal.MoE(D, F, E, K, router=Router(D, E, K, score="sigmoid", balancer=LossFree(update="manual")))
    a(_x(T=21))
    b = moebal.MoE(D, F, E, K, router=Router(D, E, K, score="sigmoid", balancer=LossFree(update="manual")))
    result = b.load_state_dict(a.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(b.router.load_counts, a.router.load_counts) and int(a.router.load_counts.sum()) == 21 * K
    sd = a.state_dict()
    del sd["router.load_counts"]
    with pytest.raises(RuntimeError, match="router.load_counts"):
        b.load_state_dict(sd)


# --- autocast -----------------------------------------------------------------------------


def test_autocast_runs_the_experts_like_nn_linear():
    """One expert, top-1, no renormalisation needed: the layer is the dense FFN times 1, so
    under autocast(bf16) it must equal an nn.Linear FFN under the same autocast."""
    torch.manual_seed(7)
    moe = moebal.MoE(D, F, 1, 1, router="aux_loss", activation="gelu")
    dense = DenseFFN(D, F, "gelu")
    with torch.no_grad():
        dense.w_in.weight.copy_(moe.experts.w_in_EDH[0].t())
        dense.w_out.weight.copy_(moe.experts.w_out_EFD[0].t())
    x = _x(T=33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_moe, y_dense = moe(x), dense(x)
        logits = moe.router.gate(x)  # autocast would run this bf16; the router must not
    assert y_moe.dtype == y_dense.dtype == torch.bfloat16
    assert torch.equal(y_moe, y_dense)
    assert not torch.equal(y_moe.float(), moe(x))  # it did not run fp32
    assert logits.dtype == torch.bfloat16
    assert moe.last_stats is not None
    g = torch.randn(33, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    y_moe.backward(g)
    y_dense.backward(g)
    for mine, ref in ((moe.experts.w_in_EDH.grad[0], dense.w_in.weight.grad.t()),
                      (moe.experts.w_out_EFD.grad[0], dense.w_out.weight.grad.t())):
        assert mine.dtype == ref.dtype == torch.float32
        # both are bf16 GEMMs rounded once to bf16 and widened: equal up to GEMM summation order
        torch.testing.assert_close(mine, ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-2)


def test_autocast_router_stays_fp32_and_grads_are_fp32():
    torch.manual_seed(8)
    moe = moebal.MoE(D, F, E, K, router="aux_loss", num_shared_experts=1)
    x = _x(T=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        routing = moe.router(x)
    assert y.dtype == torch.bfloat16
    assert routing.weights.dtype == torch.float32 and routing.scores.dtype == torch.float32
    (y.float().square().mean() + moe.aux_loss).backward()
    assert all(p.grad.dtype == torch.float32 for p in moe.parameters())
    # the routing under autocast equals the fp32 routing (the router ignores autocast)
    assert torch.equal(routing.indices, moe.router(x).indices)


# --- copies -------------------------------------------------------------------------------


def test_copies_after_a_training_forward():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(D, D), moebal.MoE(D, F, E, K, router="aux_loss"))
    y = model(_x(T=20))
    (y.sum() + model[1].aux_loss).backward()
    twin = copy.deepcopy(model)
    assert model[1].aux_loss.requires_grad  # the original keeps its live loss
    assert not twin[1].aux_loss.requires_grad and torch.equal(twin[1].aux_loss, model[1].aux_loss.detach())
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    ema.update_parameters(model)
    restored = pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = _x(T=11, seed=1)
    model.eval()
    for other in (twin, ema.module, restored, loaded):
        other.eval()
        assert torch.equal(other(x), model(x))


def test_deepcopy_of_a_loss_free_router_keeps_state():
    moe = moebal.MoE(D, F, E, K, router=Router(D, E, K, score="sigmoid", balancer=LossFree(update="manual")))
    moe(_x(T=13))
    twin = copy.deepcopy(moe)
    assert torch.equal(twin.router.load_counts, moe.router.load_counts)
    assert twin.router.load_counts.data_ptr() != moe.router.load_counts.data_ptr()


# --- factory kwargs, meta init ------------------------------------------------------------


def test_factory_kwargs():
    moe = moebal.MoE(D, F, E, K, router="loss_free", num_shared_experts=1, shared_gate=True, dtype=torch.bfloat16)
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert moe.router.expert_bias.dtype == torch.float32
    assert moe(_x(T=7, dtype=torch.bfloat16)).dtype == torch.bfloat16
    r = Router(D, E, K, device="meta", dtype=torch.float64)
    assert r.gate.weight.is_meta and r.gate.weight.dtype == torch.float64


@pytest.mark.parametrize("router", ["aux_loss", "loss_free", "base"])
def test_meta_init_to_empty_reset_parameters(router):
    moe = moebal.MoE(D, F, E, K, router=router, num_shared_experts=1, ffn_bias=True, device="meta")
    assert all(p.is_meta for p in moe.parameters())
    moe.to_empty(device="cpu")
    moe.reset_parameters()
    if router == "loss_free":
        assert torch.equal(moe.router.expert_bias, torch.zeros(E))
        assert torch.equal(moe.router.load_counts, torch.zeros(E, dtype=torch.int64))
    for p in moe.parameters():  # nn.Linear's init bounds: finite and within 1/sqrt(fan_in)
        assert torch.isfinite(p).all() and p.abs().max() <= 1 / min(D, F) ** 0.5 + 1e-6
    y = moe(_x(T=16))
    assert torch.isfinite(y).all()


# --- degenerate input and hyper-parameters at the router/layer level ---------------------


@pytest.mark.parametrize("make", [
    lambda v: LossFree(rate=v), lambda v: AuxLoss(alpha=v), lambda v: Router(D, E, K, z_loss=v),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-3])
def test_non_finite_or_negative_coefficients_raise(make, value):
    with pytest.raises(ValueError, match=r"(rate|alpha|z_loss).*" + ("nan" if value != value else "")):
        make(value)


def test_non_finite_tokens_never_move_the_bias():
    """Only the finite tokens are counted: the update equals one computed by hand from them."""
    torch.manual_seed(13)
    router = Router(D, E, K, score="sigmoid", balancer=LossFree(rate=0.01, update="manual"))
    x = _x(T=30)
    x[[3, 17]] = float("nan")
    x[5, 0] = float("inf")
    routing = router(x)
    assert int(routing.nonfinite_tokens) == 3
    finite = torch.ones(30, dtype=torch.bool)
    finite[[3, 5, 17]] = False
    want = torch.bincount(routing.indices[finite].reshape(-1), minlength=E)
    assert torch.equal(router.load_counts, want) and int(want.sum()) == 27 * K
    nan_only = Router(D, E, K, score="sigmoid", balancer=LossFree(rate=0.01))
    nan_only(torch.full((4, D), float("nan")))
    assert torch.equal(nan_only.expert_bias, torch.zeros(E))  # sign(0) everywhere: no movement


@pytest.mark.parametrize("router", ["aux_batch", "aux_sequence", "aux_global_batch", "loss_free", "base"])
def test_zero_tokens_give_zero_losses_and_an_empty_output(router):
    if router.startswith("aux_"):
        router = Router(D, E, K, balancer=AuxLoss(alpha=0.1, variant=router[4:]), z_loss=1e-3)
    moe = moebal.MoE(D, F, E, K, router=router, capacity_factor=1.0)
    x = torch.zeros(2, 0, D, requires_grad=True)
    y = moe(x)
    assert y.shape == (2, 0, D)
    assert moe.aux_loss.item() == 0.0 and torch.isfinite(moe.aux_loss)
    (y.sum() + moe.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters() if p.grad is not None)
    assert int(moe.last_stats.load.sum()) == 0


def test_capacity_is_capped_at_the_token_count():
    moe = moebal.MoE(D, F, E, K, capacity_factor=1e9)
    assert moe.capacity(16) == 16 and moe.capacity(1) == 1
    y = moe(_x(T=16))
    assert y.shape == (16, D) and int(moe.last_stats.dropped_fraction) == 0
    assert moebal.MoE(D, F, E, K, capacity_factor=1.0).capacity(16) == 4  # ceil(1.0 * 16 * 2 / 8)


def test_top_k_1_with_renormalisation_warns_once_per_router():
    with pytest.warns(UserWarning, match="top_k=1, renormalize=True"):
        Router(D, E, 1, renormalize=True)
    r = Router(D, E, 1, score="sigmoid", balancer=LossFree())
    assert r.renormalize is False  # the default keeps the router trainable
    with pytest.warns(UserWarning, match="no gradient from the task loss"):
        r.renormalize = True  # what swap_ffn(upcycle=True) does


def test_base_with_a_non_finite_token_in_a_batch_that_needs_it_to_balance():
    """BASE in training: a non-finite token is routed to valid experts with NaN weights and
    counted as non-finite; it takes the seats the finite tokens leave, so a batch that
    balances (T*K a multiple of E) still balances exactly."""
    torch.manual_seed(15)
    router = Router(D, E, K, balancer=moebal.LinearAssignment())
    x = _x(T=32)
    x[3] = float("inf")
    routing = router(x)
    assert int(routing.nonfinite_tokens) == 1 and routing.weights[3].isnan().all()
    assert torch.equal(torch.bincount(routing.indices.reshape(-1), minlength=E), torch.full((E,), 32 * K // E))


def test_sigmoid_aux_loss_is_finite_when_every_sigmoid_underflows():
    router = Router(D, E, K, score="sigmoid", balancer=AuxLoss(alpha=0.1))
    with torch.no_grad():
        router.gate.weight.fill_(-1e3)
    x = torch.ones(6, D)
    x[:, 0] = 2.0  # logits about -1.7e4: every sigmoid is 0 in fp32
    routing = router(x)
    assert torch.isfinite(routing.aux_loss) and torch.isfinite(routing.weights).all()
    # every token's normalised probabilities are uniform (equal logits): the loss is exactly alpha
    torch.testing.assert_close(routing.aux_loss, torch.tensor(0.1))


def test_checkpoint_with_a_frozen_router_on_input_without_grad():
    """The routing weights carry no graph, so nothing can own the selection: it is kept
    (a bounded few) and the recompute still replays it."""
    torch.manual_seed(16)
    ref = moebal.MoE(D, F, E, K, router=Router(D, E, K, score="sigmoid", balancer=LossFree(rate=0.05)))
    ref.router.gate.weight.requires_grad_(False)
    ck = copy.deepcopy(ref)
    x = _x(T=24)
    ref(x).square().mean().backward()
    checkpoint(ck, x, use_reentrant=False).square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), ck.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    assert torch.equal(ref.router.expert_bias, ck.router.expert_bias)


def test_pooled_cast_equals_to_and_never_reuses_a_live_gradient():
    from moebal.workspace import pooled_cast

    w = torch.randn(64, 2048, requires_grad=True)  # 512 KiB: large enough to be pooled
    g1 = torch.randn(64, 2048).bfloat16()
    out = pooled_cast(w, torch.bfloat16)
    assert torch.equal(out, w.detach().bfloat16())
    out.backward(g1)
    first = w.grad
    assert first.dtype == torch.float32 and torch.equal(first, g1.float())
    w2 = torch.randn(64, 2048, requires_grad=True)
    pooled_cast(w2, torch.bfloat16).backward(torch.ones(64, 2048, dtype=torch.bfloat16))
    assert torch.equal(w.grad, g1.float()) and w.grad.data_ptr() != w2.grad.data_ptr()  # still w's own
