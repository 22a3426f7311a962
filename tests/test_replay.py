"""Router replay (record_routing / replay_routing) and token masks in the setups people
train in: checkpointing, compile, deepcopy (issue 13)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moebal
from moebal.router import Router


class Net(torch.nn.Module):
    def __init__(self, router_a="aux_loss", router_b="loss_free"):
        super().__init__()
        self.a = moebal.MoE(16, 24, 4, 2, router=router_a, backend="torch")
        self.b = moebal.MoE(16, 24, 4, 2, router=router_b, backend="torch")

    def forward(self, x, **kw):
        return self.b(self.a(x, **kw) + x, **kw)


def test_replay_on_the_same_input_is_bit_identical_and_keeps_router_gradient():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 5, 16)
    with moebal.record_routing(net) as rec:
        y = net(x)
    assert set(rec.indices) == {"a.router", "b.router"} and rec.indices["a.router"].shape == (15, 2)
    bias = net.b.router.expert_bias.clone()
    with moebal.replay_routing(net, rec.indices):
        y2 = net(x)
        y2.sum().backward()
    assert torch.equal(y, y2)
    assert torch.equal(net.b.router.expert_bias, bias)  # replay moves no state
    assert net.a.router.gate.weight.grad.abs().sum() > 0 and net.b.router.gate.weight.grad.abs().sum() > 0


def test_replayed_experts_win_over_the_router_and_weights_are_its_scores_there():
    torch.manual_seed(1)
    r = Router(8, 6, 2)
    x = torch.randn(10, 8)
    forced = torch.tensor([[5, 4]] * 10)
    with moebal.replay_routing(r, {"": forced}):
        got = r(x)
    assert torch.equal(got.indices, forced)
    p = torch.softmax(x.double() @ r.gate.weight.double().t(), -1)[:, [5, 4]]
    torch.testing.assert_close(got.weights.double(), p / p.sum(-1, keepdim=True), rtol=1e-6, atol=0)


def test_minus_one_means_no_expert_and_the_row_renormalises():
    torch.manual_seed(2)
    moe = moebal.MoE(8, 8, 4, 2, backend="torch").eval()
    x = torch.randn(6, 8)
    forced = torch.tensor([[0, -1], [1, 2], [-1, -1], [3, 0], [2, -1], [1, 0]])
    with moebal.replay_routing(moe, {"router": forced}):
        y = moe(x)
    assert torch.equal(y[2], torch.zeros(8))
    # one real expert left in the row: its weight renormalises to exactly 1
    h = x[0].double() @ moe.experts.w_in_EDH[0].double()
    gate, up = h.chunk(2)
    want = (torch.nn.functional.silu(gate) * up) @ moe.experts.w_out_EFD[0].double()
    torch.testing.assert_close(y[0].double(), want, rtol=1e-5, atol=1e-6)


def test_update_state_true_moves_the_bias():
    torch.manual_seed(3)
    r = Router(8, 4, 2, score="sigmoid", balancer=moebal.LossFree(0.1))
    x = torch.randn(16, 8)
    forced = torch.zeros(16, 2, dtype=torch.int64)
    forced[:, 1] = 1
    with moebal.replay_routing(r, {"": forced}, update_state=True):
        r(x)
    assert r.expert_bias.tolist() == pytest.approx([-0.1, -0.1, 0.1, 0.1])


def test_bad_replay_input_is_refused():
    net = Net()
    with pytest.raises(ValueError, match="does not have"):
        with moebal.replay_routing(net, {"c.router": torch.zeros(2, 2, dtype=torch.int64)}):
            pass
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        with moebal.replay_routing(net, {"a.router": torch.tensor([[0, 4]])}):
            pass
    with pytest.raises(ValueError, match="twice"):
        with moebal.replay_routing(net, {"a.router": torch.tensor([[1, 1]])}):
            pass
    with pytest.raises(ValueError, match="recorded rows"):
        with moebal.replay_routing(net, {"a.router": torch.tensor([[0, 1]])}):
            net(torch.randn(2, 16))
    with pytest.raises(ValueError, match="no moebal.Router"):
        with moebal.record_routing(torch.nn.Linear(2, 2)):
            pass


def test_a_router_called_twice_records_both_calls_in_order():
    torch.manual_seed(4)
    moe = moebal.MoE(8, 8, 4, 2, backend="torch").eval()
    x1, x2 = torch.randn(3, 8), torch.randn(5, 8)
    with moebal.record_routing(moe) as rec:
        y1, y2 = moe(x1), moe(x2)
    assert rec.indices["router"].shape == (8, 2)
    with moebal.replay_routing(moe, rec.indices):
        assert torch.equal(moe(x1), y1) and torch.equal(moe(x2), y2)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_replay_and_masks_match_the_plain_run(reentrant):
    torch.manual_seed(5)
    net = Net(router_b=Router(16, 4, 2, score="sigmoid", balancer=(moebal.LossFree(0.05), moebal.AuxLoss(1e-2, "sequence"))))
    x = torch.randn(2, 6, 16, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with moebal.record_routing(net) as rec:
        net(x, token_mask=mask)
    ref = copy.deepcopy(net)
    with moebal.replay_routing(ref, rec.indices):
        y = ref(x, token_mask=mask)
        (y.sum() + ref.a.aux_loss + ref.b.aux_loss).backward()
    with moebal.replay_routing(net, rec.indices):
        if reentrant:
            def run(inp):
                out = net(inp, token_mask=mask)
                return out, net.a.aux_loss + net.b.aux_loss
            yc, aux = checkpoint(run, x, use_reentrant=True)
        else:
            yc = checkpoint(lambda inp: net(inp, token_mask=mask), x, use_reentrant=False)
            aux = net.a.aux_loss + net.b.aux_loss
        (yc.sum() + aux).backward()
    assert torch.equal(y, yc)
    for (name, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(ref.b.router.expert_bias, net.b.router.expert_bias)


def test_masked_layer_compiles_fullgraph_with_varying_token_counts():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(6)
    moe = moebal.MoE(16, 24, 4, 2, backend="torch", router=Router(16, 4, 2, balancer=moebal.AuxLoss(1e-2, "sequence")))
    compiled = torch.compile(moe, fullgraph=True, dynamic=True, backend="aot_eager")
    for S in (5, 9, 13):
        x = torch.randn(2, S, 16)
        mask = torch.rand(2, S) > 0.3
        want = moe(x, token_mask=mask)
        want_aux = moe.aux_loss
        got = compiled(x, token_mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moe.aux_loss, want_aux, rtol=1e-5, atol=1e-7)


def test_null_experts_and_masks_survive_deepcopy_state_dict_and_bf16():
    torch.manual_seed(7)
    moe = moebal.MoE(8, 8, 4, 2, num_null_experts=2, null_expert="identity",
                     router=Router(8, 4, 2, score="sigmoid", num_null_experts=2, balancer=moebal.LossFree(rule="proportional", rate=0.5)))
    moe(torch.randn(4, 3, 8))
    twin = copy.deepcopy(moe)
    assert torch.equal(twin.router.expert_bias, moe.router.expert_bias) and twin.router.expert_bias.shape == (6,)
    fresh = moebal.MoE(8, 8, 4, 2, num_null_experts=2, null_expert="identity",
                       router=Router(8, 4, 2, score="sigmoid", num_null_experts=2, balancer=moebal.LossFree(rule="proportional", rate=0.5)))
    fresh.load_state_dict(moe.state_dict())
    assert torch.equal(fresh.router.expert_bias, moe.router.expert_bias)
    moe.to(torch.bfloat16)
    assert moe.router.expert_bias.dtype == torch.float32 and moe.router.load_counts.dtype == torch.int64
    y = moe(torch.randn(2, 3, 8, dtype=torch.bfloat16), token_mask=torch.tensor([[True, False, True]] * 2))
    assert y.dtype == torch.bfloat16 and torch.equal(y[:, 1], torch.zeros(2, 8, dtype=torch.bfloat16))
