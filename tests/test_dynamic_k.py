"""Dynamic-k routing: ``TopP`` (Huang et al. 2024) and ``ReMoE`` (Wang et al. 2025).

References are independent of the code under test: subset enumeration in float64 for
top-p, float64 loops for the losses and the layer output, hand-built gates whose ReLU
sparsity is known for ReMoE's lambda, and un-checkpointed / eager / fp32 copies for the
training setups.

Shape legend: T tokens, D model dim, E experts, K the router's top_k (k_max).
"""
import copy
import io
import itertools
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moebal
from moebal import AuxLoss, ReMoE, Router, TopP

D, F, E = 10, 16, 6

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(T, seed=0, dtype=torch.float32):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _probs64(router, x):
    return torch.softmax(x.double() @ router.gate.weight.detach().double().T, dim=-1)


def _brute_top_p(probs_E, p, k_min, k_max):
    """The chosen expert set by enumeration: the fewest experts whose probabilities reach p
    (largest sum among those), at least k_min, at most k_max experts."""
    subsets = [s for n in range(1, len(probs_E) + 1) for s in itertools.combinations(range(len(probs_E)), n)]
    total = lambda s: sum(probs_E[e] for e in s)  # noqa: E731
    reaching = [s for s in subsets if total(s) >= p]
    n = min(len(s) for s in reaching)
    n = max(k_min, min(k_max, n))
    return set(max((s for s in subsets if len(s) == n), key=total))


def _tie_free(probs_E, p, gap=1e-4):
    """No prefix sum of the sorted probabilities within ``gap`` of p, no two probabilities equal."""
    srt = sorted(probs_E, reverse=True)
    prefix = list(itertools.accumulate(srt))
    return all(abs(s - p) > gap for s in prefix) and all(a - b > 1e-6 for a, b in zip(srt, srt[1:]))


# --- top-p ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p,k_min,k_max", [(0.4, 1, E), (0.7, 1, 3), (0.9, 2, 4), (0.25, 2, 2)])
def test_top_p_selects_what_brute_force_selects(p, k_min, k_max):
    torch.manual_seed(0)
    router = Router(D, E, k_max, balancer=TopP(p, k_min=k_min), renormalize=False)
    with torch.no_grad():
        router.gate.weight.mul_(4)  # spread the probabilities: every count from 1 to E occurs
    x = _x(120, seed=1)
    routing = router(x)
    probs = _probs64(router, x)
    checked, sizes = 0, set()
    for t in range(x.shape[0]):
        pr = probs[t].tolist()
        if not _tie_free(pr, p):
            continue
        want = _brute_top_p(pr, p, k_min, k_max)
        idx = routing.indices[t].tolist()
        got = {e for e in idx if e >= 0}
        assert got == want, f"token {t}: {got} != {want}"
        n = len(want)
        assert idx[n:] == [-1] * (k_max - n)  # the chosen come first, by decreasing probability
        assert [pr[e] for e in idx[:n]] == sorted((pr[e] for e in idx[:n]), reverse=True)
        for slot, e in enumerate(idx):
            w = float(routing.weights[t, slot].detach())
            assert (w == 0.0) if e < 0 else math.isclose(w, pr[e], rel_tol=1e-5)
        checked += 1
        sizes.add(n)
    assert checked >= 100 and len(sizes) >= min(2, k_max - k_min + 1)


def test_top_p_limits_are_every_expert_and_top_1():
    torch.manual_seed(1)
    x = _x(64, seed=2)
    everything = Router(D, E, E, balancer=TopP(1.0), renormalize=False)
    assert torch.equal(everything(x).indices.sort(dim=-1).values, torch.arange(E).expand(64, E))
    top1 = Router(D, E, 3, balancer=TopP(1e-9), renormalize=False)
    idx = top1(x).indices
    assert torch.equal(idx[:, 0], _probs64(top1, x).argmax(-1)) and (idx[:, 1:] == -1).all()


def test_top_p_renormalised_weights_sum_to_one():
    torch.manual_seed(2)
    routing = Router(D, E, 4, balancer=TopP(0.5))(_x(50))  # renormalize defaults to True for top_k > 1
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(50))


def test_top_p_losses_are_the_entropy_and_the_aux_loss_over_routed_pairs():
    torch.manual_seed(3)
    router = Router(D, E, 4, balancer=(TopP(0.6, entropy=0.1), AuxLoss(0.01)), renormalize=False).train()
    x = _x(40, seed=4)
    mask = torch.ones(40, dtype=torch.bool)
    mask[::5] = False
    routing = router(x, token_mask=mask)
    probs = _probs64(router, x)
    kept = [t for t in range(40) if mask[t]]
    entropy = sum(-sum(q * math.log(q) for q in probs[t].tolist()) for t in kept) / len(kept)
    counts = [0] * E
    for t in kept:
        for e in routing.indices[t].tolist():
            if e >= 0:
                counts[e] += 1
    assert all(e == -1 for t in range(40) if not mask[t] for e in routing.indices[t].tolist())
    pairs = sum(counts)
    P = [sum(float(probs[t, e]) for t in kept) / len(kept) for e in range(E)]
    # the aux loss's f: each expert's share of the routed pairs, divided per sequence by the
    # pairs routed (here one sequence: the layer saw [T, D])
    aux = E * sum(counts[e] / pairs * P[e] for e in range(E))
    assert math.isclose(float(routing.aux_loss), 0.1 * entropy + 0.01 * aux, rel_tol=1e-5)


def test_top_p_layer_equals_a_float64_loop():
    torch.manual_seed(4)
    moe = moebal.MoE(D, F, E, 3, router=Router(D, E, 3, balancer=TopP(0.5), renormalize=False)).double()
    x = _x(30, seed=5, dtype=torch.float64)
    y = moe(x)
    probs = _probs64(moe.router, x)
    w_in, w_out = moe.experts.w_in_EDH.detach(), moe.experts.w_out_EFD.detach()
    for t in range(30):
        pr = probs[t].tolist()
        if not _tie_free(pr, 0.5):
            continue
        want = torch.zeros(D, dtype=torch.float64)
        for e in _brute_top_p(pr, 0.5, 1, 3):
            h = x[t] @ w_in[e]
            want += pr[e] * (torch.nn.functional.silu(h[:F]) * h[F:]) @ w_out[e]
        torch.testing.assert_close(y[t], want, rtol=1e-6, atol=1e-8)  # the router's weights are fp32
    assert int(moe.last_stats.load.sum()) == int((moe.router(x).indices >= 0).sum())


def test_top_p_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\], got 0"):
        TopP(0)
    with pytest.raises(ValueError, match="p must be in"):
        TopP(1.5)
    with pytest.raises(ValueError, match="k_min must be >= 1, got 0"):
        TopP(0.5, k_min=0)
    with pytest.raises(ValueError, match="k_min=3 exceeds the router's top_k=2"):
        Router(D, E, 2, balancer=TopP(0.5, k_min=3))
    with pytest.raises(ValueError, match="entropy must be a finite number >= 0"):
        TopP(0.5, entropy=-1.0)


# --- ReMoE ------------------------------------------------------------------------------------


def _remoe_router(K=E, k=2.0, seed=0, **kw):
    torch.manual_seed(seed)
    return Router(D, E, K, balancer=ReMoE(k=k, **kw), renormalize=False)


def test_remoe_routes_to_every_positive_relu_output():
    router = _remoe_router().train()
    x = _x(50, seed=6)
    routing = router(x)
    logits = x.double() @ router.gate.weight.detach().double().T
    for t in range(50):
        active = {e for e in range(E) if logits[t, e] > 0}
        got = {e for e in routing.indices[t].tolist() if e >= 0}
        assert got == active
        for slot, e in enumerate(routing.indices[t].tolist()):
            w = float(routing.weights[t, slot].detach())
            assert (w == 0.0) if e < 0 else math.isclose(w, float(logits[t, e]), rel_tol=1e-5, abs_tol=1e-6)
    assert int(router.remoe_overflow) == 0


def test_remoe_token_without_a_positive_output_goes_nowhere():
    torch.manual_seed(6)
    moe = moebal.MoE(D, F, E, E, router=_remoe_router(), num_shared_experts=0).eval()
    _gate_with_sparsity(moe.router, range(E))  # every output negative for these tokens
    x = _positive_first_feature(5)
    assert (moe.router(x).indices == -1).all()
    assert torch.equal(moe(x), torch.zeros(5, D)) and int(moe.last_stats.load.sum()) == 0


def test_remoe_keeps_the_k_max_largest_and_counts_the_overflow():
    router = _remoe_router(K=2).train()
    x = _x(50, seed=7)
    routing = router(x)
    logits = (x.double() @ router.gate.weight.detach().double().T).tolist()
    overflow = 0
    for t in range(50):
        active = sorted((e for e in range(E) if logits[t][e] > 0), key=lambda e: -logits[t][e])
        overflow += max(0, len(active) - 2)
        assert {e for e in routing.indices[t].tolist() if e >= 0} == set(active[:2])
    assert overflow > 0 and int(router.remoe_overflow) == overflow


def test_remoe_loss_is_lambda_times_the_switch_formula_on_relu_outputs():
    router = _remoe_router(k=2.0, lambda0=0.3).train()
    x = _x(40, seed=8)
    mask = torch.ones(40, dtype=torch.bool)
    mask[3::7] = False
    loss = router(x, token_mask=mask).aux_loss
    relu = (x.double() @ router.gate.weight.detach().double().T).clamp(min=0)
    kept = [t for t in range(40) if mask[t]]
    n = len(kept)
    want = 0.0
    for e in range(E):
        c_e = sum(1 for t in kept if relu[t, e] > 0)
        P_e = sum(float(relu[t, e]) for t in kept) / n
        want += E * (c_e / (n * 2.0)) * P_e
    assert math.isclose(float(loss), 0.3 * want, rel_tol=1e-5)


def _gate_with_sparsity(router, negative_columns):
    """Logits > 0 for every token on the experts not listed, < 0 on those listed: for inputs
    whose first feature is 1, the ReLU sparsity is exactly ``len(negative_columns) / E``."""
    with torch.no_grad():
        w = torch.zeros(E, D)
        w[:, 0] = 1.0
        w[list(negative_columns), 0] = -1.0
        router.gate.weight.copy_(w)


def _positive_first_feature(T, seed=0):
    x = _x(T, seed).abs() * 0.1
    x[:, 0] = 1.0
    return x


@pytest.mark.parametrize("negative,direction", [((0,), 1), ((0, 1, 2, 3, 4), -1), ((0, 1, 2, 3), 0)])
def test_remoe_lambda_rises_below_the_target_sparsity_and_falls_above(negative, direction):
    # k = 2 of E = 6: the target sparsity is 4/6; one negative column gives 1/6 (too dense: rise),
    # five give 5/6 (too sparse: fall), four give exactly the target (stay)
    router = _remoe_router(k=2.0, lambda0=1e-3, alpha=1.5).train()
    _gate_with_sparsity(router, negative)
    x = _positive_first_feature(16)
    lam = 1e-3
    for step in range(3):
        router(x).aux_loss.backward()
        lam *= 1.5 ** direction
        assert math.isclose(float(router.remoe_lambda), lam, rel_tol=1e-6), f"step {step}"
    assert router.remoe_lambda.dtype == torch.float32
    # no committing forward: eval, no_grad
    before = router.remoe_lambda.clone()
    with torch.no_grad():
        router(x)
    router.eval()(x)
    assert torch.equal(router.remoe_lambda, before)


def test_remoe_sparsity_counts_only_real_tokens():
    router = _remoe_router(k=2.0, lambda0=1.0, alpha=2.0).train()
    _gate_with_sparsity(router, (0, 1, 2, 3, 4))  # real tokens: sparsity 5/6, above the target
    x = _positive_first_feature(12)
    mask = torch.ones(12, dtype=torch.bool)
    mask[6:] = False
    x[6:, 0] = -1.0  # padding whose outputs would all be positive but one: would read as too dense
    routing = router(x, token_mask=mask)
    assert (routing.indices[6:] == -1).all()
    assert float(router.remoe_lambda) == 0.5
    # a forward of padding only moves nothing and its loss is 0
    router(x, token_mask=torch.zeros(12, dtype=torch.bool)).aux_loss.backward()
    assert float(router.remoe_lambda) == 0.5


def test_remoe_zero_tokens():
    router = _remoe_router(lambda0=0.1).train()
    routing = router(torch.zeros(0, D, requires_grad=True))
    assert routing.indices.shape == (0, E) and float(routing.aux_loss) == 0.0
    assert float(router.remoe_lambda) == pytest.approx(0.1)
    moe = moebal.MoE(D, F, E, E, router=_remoe_router()).train()
    y = moe(torch.zeros(0, D, requires_grad=True))
    y.sum().backward()
    assert y.shape == (0, D)


def test_remoe_lambda_steers_the_sparsity_to_the_target_in_a_toy():
    """The research note's toy: per-expert biases (the gate's column on a constant feature)
    pushed up by a constant drift (standing in for the task) and down by lambda times the L1
    term; lambda adapts until the sparsity sits at 1 - k/E."""
    router = _remoe_router(k=2.0, lambda0=1e-3, alpha=1.2, seed=5).train()
    x = _x(256, seed=9)
    x[:, 0] = 1.0  # the bias feature
    opt = torch.optim.SGD(router.parameters(), lr=0.05)
    sparsities = []
    for _ in range(400):
        loss = router(x).aux_loss - 0.05 * router.gate.weight[:, 0].sum()
        opt.zero_grad()
        loss.backward()
        router.gate.weight.grad[:, 1:] = 0  # only the biases move
        opt.step()
        with torch.no_grad():
            sparsities.append(float((x @ router.gate.weight.T <= 0).double().mean()))
    late = sparsities[-150:]
    assert abs(sum(late) / len(late) - 4 / 6) < 0.05, late[-10:]
    assert sparsities[0] < 0.6  # it started far below the target


# --- training setups: both policies -------------------------------------------------------------

POLICIES = {
    "top_p": lambda: Router(D, E, 4, balancer=(TopP(0.5, entropy=0.05), AuxLoss(0.1)), renormalize=False),
    "remoe": lambda: Router(D, E, 4, balancer=ReMoE(k=2.0, lambda0=0.05, alpha=1.5), renormalize=False),
}


def _moe(name, seed=0):
    torch.manual_seed(seed)
    return moebal.MoE(D, F, E, 4, router=POLICIES[name]()).train()


def _step(moe, x, mode):
    x = x.clone().requires_grad_()
    if mode == "plain":
        y, aux = moe(x), moe.aux_loss
    elif mode == "non_reentrant":
        y = checkpoint(moe, x, use_reentrant=False)
        aux = moe.aux_loss
    else:
        y, aux = checkpoint(lambda t: (moe(t), moe.aux_loss), x, use_reentrant=True)
    (y.square().mean() + aux).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    moe.zero_grad(set_to_none=True)
    return y.detach(), x.grad, aux.detach(), grads


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_checkpointed_steps_equal_plain_and_lambda_moves_once(name, mode):
    ref = _moe(name)
    ck = copy.deepcopy(ref)
    for step in range(3):
        x = _x(24, seed=step).view(2, 12, D)
        want, got = _step(ref, x, "plain"), _step(ck, x, mode)
        for a, b, what in zip(want[:3], got[:3], ("y", "x.grad", "aux_loss")):
            assert torch.equal(a, b), f"step {step}: {what}"
        assert want[3].keys() == got[3].keys()
        for n in want[3]:
            assert torch.equal(want[3][n], got[3][n]), f"step {step}: grad of {n}"
        assert torch.equal(ref.last_stats.load, ck.last_stats.load)
        if name == "remoe":  # one multiplicative step per training step: lambda0 * 1.5**j, |j| <= step + 1
            assert torch.equal(ref.router.remoe_lambda, ck.router.remoe_lambda)
            j = math.log(float(ck.router.remoe_lambda) / 0.05) / math.log(1.5)
            assert abs(j - round(j)) < 1e-4 and abs(round(j)) <= step + 1 and abs(round(j)) % 2 == (step + 1) % 2


def test_remoe_state_stays_fp32_through_bf16_and_round_trips():
    moe = _moe("remoe")
    moe(_x(16)).sum().backward()
    lam = moe.router.remoe_lambda.clone()
    moe.to(torch.bfloat16)
    assert moe.router.remoe_lambda.dtype == torch.float32 and torch.equal(moe.router.remoe_lambda, lam)
    moe(_x(16).bfloat16()).float().sum().backward()  # a bf16 step still moves lambda in fp32
    assert moe.router.remoe_lambda.dtype == torch.float32 and not torch.equal(moe.router.remoe_lambda, lam)
    sd = moe.state_dict()
    assert sd["router.remoe_lambda"].dtype == torch.float32
    fresh = _moe("remoe", seed=3)
    fresh.load_state_dict({k: v.float() if v.is_floating_point() and k != "router.remoe_lambda" else v
                           for k, v in sd.items()})
    assert torch.equal(fresh.router.remoe_lambda, moe.router.remoe_lambda)
    clone = copy.deepcopy(moe)
    assert torch.equal(clone.router.remoe_lambda, moe.router.remoe_lambda)
    clone.router.remoe_lambda.mul_(2)
    assert not torch.equal(clone.router.remoe_lambda, moe.router.remoe_lambda)  # a copy, not shared
    buf = io.BytesIO()
    torch.save(moe, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False).router.remoe_lambda, moe.router.remoe_lambda)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_autocast_bf16_routes_as_fp32(name):
    moe = _moe(name)
    x = _x(20, seed=11)
    want = moe(x)
    idx = moe.router(x).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        assert torch.equal(moe.router(x).indices, idx)  # the router runs in fp32 under autocast
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_padding_tokens_go_nowhere_and_do_not_change_real_outputs(name):
    moe = _moe(name).eval()
    x = _x(18, seed=12)
    mask = torch.ones(18, dtype=torch.bool)
    mask[[2, 9, 17]] = False
    y = moe(x, token_mask=mask)
    assert torch.equal(y[~mask], torch.zeros(3, D))
    torch.testing.assert_close(y[mask], moe(x[mask]), rtol=1e-6, atol=1e-7)
    assert int(moe.last_stats.load.sum()) == int((moe.router(x[mask]).indices >= 0).sum())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_compile_fullgraph_dynamic_varying_token_counts(name):
    from torch._dynamo.utils import counters  # here, not at collection (it imports triton)

    eager = _moe(name)
    moe = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (17, 32, 45, 64):
        x = _x(T, seed=T)
        want, got = _step(eager, x, "plain"), _compiled_step(moe, compiled, x)
        for a, b, what in zip(want[:3], got[:3], ("y", "x.grad", "aux_loss")):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{what} at T={T}")
        assert torch.equal(moe.last_stats.load, eager.last_stats.load)
        if name == "remoe":
            assert torch.equal(moe.router.remoe_lambda, eager.router.remoe_lambda), f"T={T}"
    assert counters["stats"]["unique_graphs"] <= 2


def _compiled_step(moe, fn, x):
    x = x.clone().requires_grad_()
    y = fn(x)
    aux = moe.aux_loss
    (y.square().mean() + aux).backward()
    moe.zero_grad(set_to_none=True)
    return y.detach(), x.grad, aux.detach()


def test_remoe_rejects_bad_settings():
    with pytest.raises(ValueError, match="alpha must be > 1, got 1.0"):
        ReMoE(alpha=1.0)
    with pytest.raises(ValueError, match="lambda0 must be > 0"):
        ReMoE(lambda0=0.0)
    with pytest.raises(ValueError, match="k must be > 0"):
        ReMoE(k=0)
    with pytest.raises(ValueError, match=r"ReMoE k=7.0 exceeds the router's 6 experts"):
        Router(D, E, 2, balancer=ReMoE(k=7.0))


def test_compare_names():
    from moebal.compare.policies import parse_policy

    top_p, remoe = parse_policy("top-p"), parse_policy("remoe")
    r = top_p.make_router(D, 16, 2)
    assert r.top_k == 4 and isinstance(r.policies[0], TopP) and r.policies[0].p == 0.4 and not r.renormalize
    r = remoe.make_router(D, 16, 2)
    assert r.top_k == 16 and r.policies[0].k == 2.0
    assert parse_policy("top-p-0.6").coefficient == 0.6
    with pytest.raises(ValueError, match="p must be in"):
        parse_policy("top-p-1.5")
