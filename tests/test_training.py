"""Training glue (aux_loss, balance_report, the bias-update hook), the MoE options the HF
integration needs (expert biases, tanh GELU, gated shared expert), and torch.compile of
the layer. None of this needs transformers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moebal
from moebal import AuxLoss, LossFree, Router
from moebal.routing import loss_free_update, switch_aux_loss


class _Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.mlp = moe


class _Stack(nn.Module):
    """``layers.i.mlp`` like a transformers decoder, MoE layers only."""

    def __init__(self, moes):
        super().__init__()
        self.layers = nn.ModuleList(_Block(m) for m in moes)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer.mlp(x)
        return x


def _stack(n=3, router="aux_loss", E=4, K=2, D=16, seed=0, **kw):
    """``router``: a policy name or a zero-argument factory (each layer its own Router)."""
    torch.manual_seed(seed)
    return _Stack([moebal.MoE(D, 24, E, K, router=router if isinstance(router, str) else router(), **kw)
                   for _ in range(n)])


# --- aux_loss ---------------------------------------------------------------------------


def test_aux_loss_is_the_sum_of_each_layers_own_loss():
    model = _stack(E=4, K=2, router=lambda: Router(16, 4, 2, balancer=AuxLoss(alpha=0.5)))
    inputs = {}
    for i, layer in enumerate(model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
    model(torch.randn(32, 16))
    total = moebal.aux_loss(model)
    expected = []
    for i, layer in enumerate(model.layers):  # each layer's Switch loss over its own routing
        r = layer.mlp.router(inputs[i])
        expected.append(0.5 * switch_aux_loss(r.scores, r.indices, 4))
    torch.testing.assert_close(total, sum(expected))
    torch.testing.assert_close(total, sum(layer.mlp.aux_loss for layer in model.layers))
    total.backward()
    assert all(layer.mlp.router.gate.weight.grad.abs().sum() > 0 for layer in model.layers)


def test_aux_loss_is_zero_in_eval_and_raises_without_moe_layers():
    model = _stack()
    model.eval()
    model(torch.randn(8, 16))
    assert float(moebal.aux_loss(model)) == 0.0
    with pytest.raises(ValueError, match="no moebal.MoE"):
        moebal.aux_loss(nn.Linear(3, 3))


# --- balance_report ---------------------------------------------------------------------


def test_balance_report_is_a_flat_dict_of_floats_per_layer():
    model = _stack(n=3, capacity_factor=1.0)
    model(torch.randn(40, 16))
    rep = moebal.balance_report(model)
    assert all(type(v) is float for v in rep.values())
    for i, layer in enumerate(model.layers):
        stats = layer.mlp.last_stats
        assert rep[f"moe/layer{i}/max_violation"] == pytest.approx(float(stats.max_violation))
        assert rep[f"moe/layer{i}/cv"] == pytest.approx(float(stats.cv))
        assert rep[f"moe/layer{i}/entropy"] == pytest.approx(float(stats.entropy))
        assert rep[f"moe/layer{i}/dropped_fraction"] == pytest.approx(float(stats.dropped_fraction))
        assert rep[f"moe/layer{i}/aux_loss"] == pytest.approx(float(layer.mlp.aux_loss.detach()))
        assert rep[f"moe/layer{i}/nonfinite_tokens"] == 0.0
    vios = [rep[f"moe/layer{i}/max_violation"] for i in range(3)]
    assert rep["moe/max_violation_max"] == max(vios)
    assert rep["moe/max_violation_mean"] == pytest.approx(sum(vios) / 3)
    assert len(rep) == 3 * 6 + 2


def test_balance_report_names_and_errors():
    model = _stack(n=2)
    with pytest.raises(ValueError, match="forward"):
        moebal.balance_report(model)
    model.layers[1].mlp(torch.randn(8, 16))  # only layer 1 has run
    assert set(moebal.balance_report(model, prefix="train/moe")) >= {"train/moe/layer1/max_violation"}
    assert not any("layer0" in k for k in moebal.balance_report(model))
    bare = moebal.MoE(16, 24, 4, 2)
    bare(torch.randn(8, 16))
    assert "moe/root/cv" in moebal.balance_report(bare)


# --- bias update hook -------------------------------------------------------------------


def _lossfree_stack(update="manual", rate=0.1):
    return _stack(n=2, router=lambda: Router(16, 4, 2, score="sigmoid", balancer=LossFree(rate=rate, update=update)))


def test_bias_update_hook_moves_biases_once_per_optimizer_step():
    model = _lossfree_stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = moebal.register_bias_update_hook(opt, model)
    routers = [layer.mlp.router for layer in model.layers]
    for _ in range(2):  # two micro-batches accumulate into one step
        model(torch.randn(24, 16)).sum().backward()
    counts = [r.load_counts.clone() for r in routers]
    assert all(int(c.sum()) == 2 * 24 * 2 for c in counts)
    assert all(float(r.expert_bias.abs().sum()) == 0 for r in routers)  # nothing before step()
    opt.step()
    for r, c in zip(routers, counts):
        torch.testing.assert_close(r.expert_bias, loss_free_update(torch.zeros(4), c, 0.1), rtol=0, atol=0)
        assert int(r.load_counts.sum()) == 0
    handle.remove()
    model(torch.randn(24, 16)).sum().backward()
    before = [r.expert_bias.clone() for r in routers]
    opt.step()
    assert all(torch.equal(b, r.expert_bias) for b, r in zip(before, routers))


def test_bias_update_hook_runs_after_step_so_a_failed_step_moves_nothing():
    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("step failed")

    model = _lossfree_stack()
    opt = Failing(model.parameters(), lr=0.1)
    moebal.register_bias_update_hook(opt, model)
    model(torch.randn(24, 16)).sum().backward()
    with pytest.raises(RuntimeError, match="step failed"):
        opt.step()
    r = model.layers[0].mlp.router
    assert float(r.expert_bias.abs().sum()) == 0 and int(r.load_counts.sum()) == 48  # kept for the next step


def test_bias_update_hook_refuses_auto_or_missing_loss_free_routers():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="manual"):
        moebal.register_bias_update_hook(opt, _lossfree_stack(update="auto"))
    with pytest.raises(ValueError, match="0 loss-free"):
        moebal.register_bias_update_hook(opt, _stack())


# --- MoE options used by the HF integration ----------------------------------------------


def _loop_reference(moe, x_TD):
    """float64 loop over tokens and their kept (token, slot) pairs, differentiable in every weight."""
    from moebal.plan import build_plan

    r = moe.router(x_TD)
    plan = build_plan(r.indices, moe.num_experts, moe.capacity(x_TD.shape[0]))
    ex = moe.experts
    rows = []
    for t in range(x_TD.shape[0]):
        y_t = torch.zeros_like(x_TD[t])
        for j in range(moe.top_k):
            if plan.row_of_pair_TK[t, j] < 0:  # dropped by the capacity: contributes nothing
                continue
            e = int(r.indices[t, j])
            h = x_TD[t] @ ex.w_in_EDH[e] + (ex.b_in_EH[e] if ex.b_in_EH is not None else 0)
            a = moebal.experts.activate(h, ex.activation)
            y_t = y_t + r.weights[t, j] * (a @ ex.w_out_EFD[e] + (ex.b_out_ED[e] if ex.b_out_ED is not None else 0))
        rows.append(y_t)
    y = torch.stack(rows)
    if moe.shared is not None:
        s = moe.shared(x_TD)
        if moe.shared_gate is not None:
            s = torch.sigmoid(x_TD @ moe.shared_gate.weight.t()) * s
        y = y + s
    return y


def _grads(moe, y, g):
    moe.zero_grad()
    y.backward(g)
    return {n: p.grad.clone() for n, p in moe.named_parameters()}


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])  # 0.75 drops pairs: their bias must not leak in
def test_expert_biases_match_a_float64_loop(activation, capacity_factor):
    torch.manual_seed(3)
    moe = moebal.MoE(12, 20, 5, 2, activation=activation, ffn_bias=True, capacity_factor=capacity_factor).double()
    assert moe.experts.b_in_EH.shape == (5, 40 if activation == "swiglu" else 20)
    assert moe.experts.b_out_ED.shape == (5, 12)
    x = torch.randn(30, 12, dtype=torch.float64)
    y, ref = moe(x), _loop_reference(moe, x)
    if capacity_factor is not None:
        assert int(moe.last_stats.kept.sum()) < int(moe.last_stats.load.sum())  # something was dropped
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got, want = _grads(moe, y, g), _grads(moe, ref, g)
    for name in ("experts.b_in_EH", "experts.b_out_ED", "experts.w_in_EDH", "experts.w_out_EFD"):
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_gelu_tanh_is_torchs_tanh_approximation():
    h = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(moebal.experts.activate(h, "gelu_tanh"), F.gelu(h, approximate="tanh"))
    python = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # GPT-2's gelu_new
    torch.testing.assert_close(moebal.experts.activate(h, "gelu_tanh"), python, rtol=1e-12, atol=1e-14)
    assert (moebal.experts.activate(h, "gelu") - python).abs().max() > 1e-4  # exact GELU is a different function


def test_gated_shared_expert_matches_the_formula():
    torch.manual_seed(4)
    moe = moebal.MoE(10, 8, 4, 2, num_shared_experts=1, shared_d_ff=14, shared_gate=True).double()
    assert moe.shared.w_in.weight.shape == (28, 10) and moe.shared_gate.weight.shape == (1, 10)
    x = torch.randn(16, 10, dtype=torch.float64)
    torch.testing.assert_close(moe(x), _loop_reference(moe, x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shared_d_ff=8), "shared_d_ff"),  # no shared experts to size
        (dict(num_shared_experts=1, shared_d_ff=0), "shared_d_ff"),
        (dict(shared_gate=True), "shared_gate"),
        (dict(activation="gelu_new"), "activation"),
    ],
)
def test_moe_option_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moebal.MoE(8, 8, 4, 2, **kwargs)


# --- torch.compile of the layer -----------------------------------------------------------


def _eager_and_compiled(moe, x, compiler):
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, backend=compiler)
    results = []
    for fn in (moe, compiled):
        moe.zero_grad()
        xl = x.clone().requires_grad_(True)
        y = fn(xl)
        y.backward(torch.cos(y.detach()))
        results.append((y.detach(), xl.grad, [p.grad.clone() for p in moe.parameters()], moe.aux_loss.detach()))
    return results


@pytest.mark.parametrize(
    "compiler, kwargs",
    [
        ("aot_eager", dict()),  # dropless: grouped_mm with device-side group ends
        ("aot_eager", dict(capacity_factor=1.0, router="loss_free")),  # drops; loss-free counters in forward
        ("aot_eager", dict(activation="gelu_tanh", ffn_bias=True, num_shared_experts=1, shared_gate=True)),
        ("inductor", dict()),  # one real compile (about 20 s cold)
    ],
)
def test_moe_compiles_fullgraph_forward_and_backward(compiler, kwargs):
    torch.manual_seed(5)
    moe = moebal.MoE(32, 48, 4, 2, backend="torch", **kwargs)
    if isinstance(moe.router.balancer, LossFree):
        moe.router.balancer = LossFree(update="manual")  # keep the bias fixed between the two runs
    x = torch.randn(2, 16, 32)
    (y0, gx0, gp0, aux0), (y1, gx1, gp1, aux1) = _eager_and_compiled(moe, x, compiler)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux1, aux0)


def test_import_moebal_needs_no_transformers():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"  # makes any import of it fail
        "import moebal, torch\n"
        "assert callable(moebal.swap_ffn) and callable(moebal.aux_loss)\n"
        "try:\n"
        "    moebal.swap_ffn(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2, 1)\n"
        "except moebal.hf.ConversionError as e:\n"
        "    print('raised', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised no decoder layer list" in out.stdout
