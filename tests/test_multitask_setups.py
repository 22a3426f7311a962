"""MultiGateMoE where users put it: activation checkpointing, autocast, compile, meta init."""
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moebal.multitask import MultiGateMoE


def _home(**kw):
    return MultiGateMoE(6, 4, num_tasks=3, num_shared=2, num_task_experts=1, mode="home",
                        task_groups=[[0, 1], [2]], num_group_experts=1, levels=2, d_expert=5,
                        expert_norm=True, feature_gates=True, self_gates=True, track_stats=True, **kw)


def _loss(outs):
    return sum((o * (i + 1)).square().mean() for i, o in enumerate(outs))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_same_gradients_and_running_stats_counted_once(reentrant):
    torch.manual_seed(0)
    ref = _home()
    with torch.no_grad():  # non-zero feature gates so their gradient path is exercised
        for blk in ref.blocks:
            blk.fg_a.normal_(std=0.3)
    ck = copy.deepcopy(ref)
    x = torch.randn(7, 6)
    x_ck = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    _loss(ref(x_ref)).backward()
    _loss(checkpoint(ck, x_ck, use_reentrant=reentrant)).backward()
    torch.testing.assert_close(x_ck.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(ref.named_parameters(), ck.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
    # the un-checkpointed run moved the running estimates once; the checkpointed step too
    for a, b in zip(ref.buffers(), ck.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for sa, sb in zip(ref.last_stats, ck.last_stats):
        torch.testing.assert_close(sb.gate_mass_KE, sa.gate_mass_KE, rtol=0, atol=0)


def test_autocast_bf16_close_to_fp32_and_masks_hold():
    torch.manual_seed(1)
    m = MultiGateMoE(8, 4, num_tasks=2, num_shared=2, num_task_experts=2, mode="cgc", track_stats=True)
    x = torch.randn(16, 8)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = m(x)
    for a, b in zip(ref, outs):
        torch.testing.assert_close(b.float(), a, rtol=3e-2, atol=3e-2)
    W = m.last_stats[0].gate_mass_KE
    assert W.dtype == torch.float32
    assert (W[~m.blocks[0].mask_GE] == 0).all()  # closed connections stay exactly 0 under autocast


def test_compile_fullgraph_dynamic_varying_batch():
    torch.manual_seed(2)
    m = MultiGateMoE(6, 3, num_tasks=2, num_shared=2, num_task_experts=1, mode="ple", levels=2, d_expert=4,
                     top_k=2, track_stats=False).eval()
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="eager")
    for B in (5, 9, 1, 13):
        x = torch.randn(B, 6)
        for a, b in zip(m(x), compiled(x)):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_meta_device_init_then_materialise():
    with torch.device("meta"):
        m = _home()
    assert all(p.is_meta for p in m.parameters())
    ref = _home()
    # the masks and expert wiring are real values, not meta placeholders after to_empty
    m.to_empty(device="cpu")
    m.reset_parameters()
    for blk_m, blk_r in zip(m.blocks, ref.blocks):
        torch.testing.assert_close(blk_m.mask_GE, blk_r.mask_GE)
    # non-persistent buffers are lost by to_empty; they are rebuilt from the layer's wiring
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6)
    m.eval(), ref.eval()
    for a, b in zip(ref(x), m(x)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
