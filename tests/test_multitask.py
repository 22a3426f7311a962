"""MultiGateMoE: hand-computed references, mask guarantees, PLE gradients, HoME options, stats."""
import copy
import subprocess
import sys

import pytest
import torch

from moebal.multitask import ExpertNorm, MultiGateMoE, MultiTaskMeter


def _hand_mmoe(model, x):
    """float64 loop over gates and experts with the model's level-0 weights (no masks)."""
    blk = model.blocks[0]
    p = {n: t.detach().double() for n, t in blk.named_parameters()}
    x = x.double()
    outs = []
    for k in range(model.num_tasks):
        logits = x @ p["gate_w"][k] + p["gate_b"][k]
        w = torch.softmax(logits, -1)
        acc = torch.zeros(x.shape[0], p["w2"].shape[-1], dtype=torch.float64)
        for e in range(model.num_experts):
            h = torch.relu(x @ p["w1"][e] + p["b1"][e])
            acc += w[:, e : e + 1] * (h @ p["w2"][e] + p["b2"][e])
        outs.append(acc)
    return outs


def test_mmoe_equals_hand_loop():
    torch.manual_seed(0)
    m = MultiGateMoE(6, 5, num_tasks=3, num_shared=4, d_hidden=7)
    x = torch.randn(11, 6)
    ref = _hand_mmoe(m, x)
    for out, r in zip(m(x), ref):
        torch.testing.assert_close(out.double(), r, rtol=1e-5, atol=1e-5)
    for out, r in zip(m.double()(x.double()), ref):
        torch.testing.assert_close(out, r, rtol=1e-12, atol=1e-12)


def _hand_ple(model, x):
    """float64 loop for any levels/masks (relu experts, dense gates), from the docstring's wiring."""
    K = model.num_tasks
    inputs = [x.double()] * (K + 1)  # tasks 0..K-1, then shared
    for blk in model.blocks:
        p = {n: t.detach().double() for n, t in blk.named_parameters()}
        mask = blk.mask_GE
        ys = []
        for e, o in enumerate(model.owner):
            xin = inputs[o] if o >= 0 else inputs[K]
            ys.append(torch.relu(xin @ p["w1"][e] + p["b1"][e]) @ p["w2"][e] + p["b2"][e])
        outs = []
        for g in range(mask.shape[0]):
            logits = inputs[g] @ p["gate_w"][g] + p["gate_b"][g]
            logits[:, ~mask[g]] = float("-inf")
            w = torch.softmax(logits, -1)
            outs.append(sum(w[:, e : e + 1] * ys[e] for e in range(len(ys))))
        inputs = outs
    return inputs


@pytest.mark.parametrize("kw", [
    {"mode": "ple", "levels": 2, "num_task_experts": [1, 2, 1]},  # uneven task experts
    {"mode": "home", "levels": 3, "num_task_experts": 1, "task_groups": [[0, 2], [1]], "num_group_experts": 1},
])
def test_multilevel_equals_hand_loop(kw):
    torch.manual_seed(9)
    m = MultiGateMoE(6, 4, num_tasks=3, num_shared=2, d_hidden=5, d_expert=7, **kw).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    ref = _hand_ple(m, x)
    assert len(ref) == 3
    for out, r in zip(m(x), ref):
        torch.testing.assert_close(out, r, rtol=1e-12, atol=1e-12)


def test_cgc_without_task_experts_equals_mmoe():
    torch.manual_seed(1)
    a = MultiGateMoE(6, 5, num_tasks=2, num_shared=3, mode="mmoe")
    b = MultiGateMoE(6, 5, num_tasks=2, num_shared=3, num_task_experts=0, mode="cgc")
    b.load_state_dict(a.state_dict())
    x = torch.randn(9, 6)
    for oa, ob in zip(a(x), b(x)):
        torch.testing.assert_close(oa, ob, rtol=0, atol=0)


@pytest.mark.parametrize("mode,kw", [
    ("cgc", {}),  # own + shared
    ("home", {"task_groups": [[0, 1], [2]], "num_group_experts": 2}),  # hierarchy
    ("mmoeex", {"exclusivity": 0.5}),  # exclusive pool experts
])
def test_closed_connections_stay_zero_after_adamw(mode, kw):
    torch.manual_seed(2)
    m = MultiGateMoE(6, 4, num_tasks=3, num_shared=4, num_task_experts=2 if mode != "mmoeex" else 0,
                     mode=mode, **kw)
    mask = m.blocks[0].mask_GE
    assert not mask.all()  # something is closed
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(4):
        x = torch.randn(16, 6)
        loss = sum((o - 1).pow(2).mean() for o in m(x))
        opt.zero_grad()
        loss.backward()
        g = m.blocks[0].gate_w.grad  # [G, D, E]
        assert torch.equal(g.permute(0, 2, 1)[~mask], torch.zeros_like(g.permute(0, 2, 1)[~mask]))
        assert (m.blocks[0].gate_b.grad[~mask] == 0).all()
        opt.step()
        W = m.last_stats[0].gate_mass_KE
        assert (W[~mask] == 0).all() and (W[mask] > 0).all()
    # per example too
    blk = m.blocks[0]
    x = torch.randn(5, 6)
    w = m._gate(torch.baddbmm(blk.gate_b[:, None], x.expand(3, 5, 6), blk.gate_w), blk.mask_GE)
    assert (w.permute(0, 2, 1)[~mask] == 0).all()


def test_mode_masks():
    m = MultiGateMoE(4, 4, num_tasks=3, num_shared=2, num_task_experts=1, num_group_experts=1,
                     task_groups=[[0, 1], [2]], mode="home")
    # layout: shared 0,1 | group0: 2 | group1: 3 | task0: 4 | task1: 5 | task2: 6
    expect = torch.tensor([[1, 1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 1, 0], [1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m.blocks[0].mask_GE, expect)
    ex = MultiGateMoE(4, 4, num_tasks=2, num_shared=4, mode="mmoeex", exclusivity=0.5)
    # experts 0, 1 exclusive to tasks 0, 1; 2, 3 shared
    assert torch.equal(ex.blocks[0].mask_GE, torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool))
    ple = MultiGateMoE(4, 4, num_tasks=2, num_shared=1, num_task_experts=1, mode="ple", levels=2)
    assert ple.blocks[0].mask_GE.shape == (3, 3) and ple.blocks[0].mask_GE[2].all()
    assert ple.blocks[1].mask_GE.shape == (2, 3)


def test_ple_gradients_reach_lower_level():
    torch.manual_seed(3)
    m = MultiGateMoE(6, 3, num_tasks=2, num_shared=2, num_task_experts=1, mode="ple", levels=2, d_expert=5)
    outs = m(torch.randn(8, 6))
    assert [o.shape for o in outs] == [(8, 3), (8, 3)]
    outs[1].sum().backward()
    low = m.blocks[0]
    for name in ("w1", "w2", "gate_w"):
        assert getattr(low, name).grad.abs().sum() > 0, name
    # task 1's output depends on level-0 shared gate (row 2) and its own gate (row 1), not task 0's
    assert low.gate_w.grad[1].abs().sum() > 0 and low.gate_w.grad[2].abs().sum() > 0
    assert (low.gate_w.grad[0] == 0).all()


def test_feature_gate_zero_init_is_identity():
    torch.manual_seed(4)
    a = MultiGateMoE(6, 4, num_tasks=2, num_shared=3)
    b = MultiGateMoE(6, 4, num_tasks=2, num_shared=3, feature_gates=True, feature_gate_rank=2)
    b.load_state_dict(a.state_dict(), strict=False)
    x = torch.randn(7, 6)
    for oa, ob in zip(a(x), b(x)):
        torch.testing.assert_close(oa, ob, rtol=0, atol=0)
    with torch.no_grad():
        b.blocks[0].fg_a.normal_()
    assert not torch.equal(a(x)[0], b(x)[0])


def test_expert_norm_zero_mean_unit_variance():
    torch.manual_seed(5)
    norm = ExpertNorm(3, 4)
    y = torch.randn(3, 64, 4) * 5 + 2
    z = norm(y)
    torch.testing.assert_close(z.mean(1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(1, unbiased=False), torch.ones(3, 4), atol=1e-3, rtol=0)
    assert (norm.running_mean != 0).all()
    # through the model: experts' outputs are Swish(normalised)
    m = MultiGateMoE(6, 4, num_tasks=2, num_shared=3, expert_norm=True)
    seen = {}
    m.blocks[0].norm.register_forward_hook(lambda mod, inp, out: seen.update(z=out))
    m(torch.randn(32, 6))
    torch.testing.assert_close(seen["z"].mean(1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    # var / (var + eps): small expert outputs stay just under 1
    torch.testing.assert_close(seen["z"].var(1, unbiased=False), torch.ones(3, 4), atol=1e-2, rtol=0)
    m.eval()
    m(torch.randn(4, 6))  # eval uses running estimates


def _set_gates(m, bias_KE):
    with torch.no_grad():
        m.blocks[0].gate_w.zero_()
        m.blocks[0].gate_b.copy_(bias_KE)


def test_occupancy_even_and_captured():
    m = MultiGateMoE(4, 4, num_tasks=3, num_shared=2)
    _set_gates(m, torch.zeros(3, 2))  # identical gates
    m(torch.randn(10, 4))
    s = m.last_stats[0]
    torch.testing.assert_close(s.occupancy_E, torch.full((2,), 1 / 3))
    torch.testing.assert_close(s.gate_mass_KE, torch.full((3, 2), 0.5))
    torch.testing.assert_close(s.entropy_K, torch.full((3,), float(torch.log(torch.tensor(2.0)))))
    # expert 1 captured by task 0: the other tasks put exactly 0 on it (closed by mask)
    mask = torch.tensor([[1, 1], [1, 0], [1, 0]], dtype=torch.bool)
    c = MultiGateMoE(4, 4, num_tasks=3, num_shared=2, masks=[mask])
    _set_gates(c, torch.zeros(3, 2))
    c(torch.randn(10, 4))
    s = c.last_stats[0]
    assert s.occupancy_E[1].item() == 1.0
    torch.testing.assert_close(s.occupancy_E[0], torch.tensor(1 / 2.5))  # W[:,0] = .5, 1, 1


def test_own_use_dead_units_rms():
    m = MultiGateMoE(4, 3, num_tasks=2, num_shared=1, num_task_experts=1, mode="cgc", d_hidden=5)
    _set_gates(m, torch.tensor([[0.0, 100.0, 0.0], [0.0, 0.0, 100.0]]))  # each task: its own expert
    with torch.no_grad():
        m.blocks[0].b1[0, :2] = -1e3  # two dead units in expert 0
    x = torch.randn(20, 4)
    m(x)
    s = m.last_stats[0]
    torch.testing.assert_close(s.own_use_K, torch.ones(2), atol=1e-6, rtol=0)
    assert s.dead_ratio_E[0].item() >= 0.4
    assert s.shared_E.tolist() == [True, False, False]
    blk = m.blocks[0]
    y = torch.relu(x @ blk.w1[1] + blk.b1[1]) @ blk.w2[1] + blk.b2[1]
    torch.testing.assert_close(s.output_rms_E[1], y.pow(2).mean().sqrt().detach())
    meter = MultiTaskMeter()
    meter.update(m.last_stats)
    m(x)
    meter.update(m.last_stats)
    torch.testing.assert_close(meter.mean()[0].own_use_K, s.own_use_K)
    assert meter.steps == 2


def test_top_k_sparse():
    torch.manual_seed(6)
    m = MultiGateMoE(4, 3, num_tasks=2, num_shared=5, top_k=2)
    x = torch.randn(12, 4)
    blk = m.blocks[0]
    w = m._gate(torch.baddbmm(blk.gate_b[:, None], x.expand(2, 12, 4), blk.gate_w), blk.mask_GE)
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 12))
    m(x)


def test_self_gates_and_swish_run_and_backprop():
    torch.manual_seed(7)
    m = MultiGateMoE(5, 3, num_tasks=2, num_shared=2, num_task_experts=2, mode="cgc", self_gates=True,
                     expert_norm=True, feature_gates=True, activation="swish", levels=2, d_expert=4)
    sum(o.sum() for o in m(torch.randn(6, 5))).backward()
    assert m.blocks[0].self_w.grad.abs().sum() > 0


def test_deepcopy_state_dict_bf16_and_empty_batch():
    torch.manual_seed(8)
    m = MultiGateMoE(6, 4, num_tasks=2, num_shared=2, num_task_experts=1, mode="ple", levels=2,
                     expert_norm=True, feature_gates=True)
    x = torch.randn(5, 6)
    m.eval()
    ref = m(x)
    c = copy.deepcopy(m)
    for a, b in zip(ref, c(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    n = MultiGateMoE(6, 4, num_tasks=2, num_shared=2, num_task_experts=1, mode="ple", levels=2,
                     expert_norm=True, feature_gates=True).eval()
    n.load_state_dict(m.state_dict())
    for a, b in zip(ref, n(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bf = copy.deepcopy(m).to(torch.bfloat16)
    outs = bf(x.bfloat16())
    assert all(o.dtype == torch.bfloat16 for o in outs)
    for a, b in zip(ref, outs):
        torch.testing.assert_close(b.float(), a, rtol=5e-2, atol=5e-2)
    m.train()
    empty = m(torch.randn(0, 6))
    assert [o.shape for o in empty] == [(0, 4), (0, 4)]
    assert torch.isfinite(m.blocks[0].norm.running_mean).all()
    assert (m.last_stats[0].gate_mass_KE == 0).all()


@pytest.mark.parametrize("kw,exc,word", [
    ({"num_tasks": 0}, ValueError, "num_tasks"),
    ({"num_tasks": 2.0}, TypeError, "num_tasks"),
    ({"mode": "moe"}, ValueError, "mode"),
    ({"mode": "ple"}, ValueError, "levels"),
    ({"mode": "home"}, ValueError, "task_groups"),
    ({"mode": "mmoe", "num_task_experts": 1}, ValueError, "num_task_experts"),
    ({"num_task_experts": [1]}, ValueError, "num_task_experts"),
    ({"task_groups": [[0]], "num_group_experts": 1, "mode": "home"}, ValueError, "task_groups"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"activation": "tanh"}, ValueError, "activation"),
    ({"exclusivity": 0.5}, ValueError, "exclusivity"),
    ({"masks": [torch.zeros(2, 2, dtype=torch.bool)]}, ValueError, "no open expert"),
    ({"masks": [torch.ones(3, 2, dtype=torch.bool)]}, ValueError, "shape"),
    ({"masks": [torch.ones(2, 2)]}, TypeError, "bool"),
    ({"num_shared": 0}, ValueError, "no experts"),
    ({"self_gates": True}, ValueError, "self_gates"),
])
def test_bad_arguments(kw, exc, word):
    args = {"d_in": 4, "d_out": 3, "num_tasks": 2, "num_shared": 2, **kw}
    with pytest.raises(exc, match=word):
        MultiGateMoE(**args)


def test_bad_input():
    m = MultiGateMoE(4, 3, num_tasks=2, num_shared=2)
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(3, 5))
    with pytest.raises(TypeError, match="tensor"):
        m([[1.0] * 4])


def test_import_pulls_no_triton_or_transformers():
    code = ("import sys, moebal.multitask; "
            "assert 'triton' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
