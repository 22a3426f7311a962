"""torch.distributed.checkpoint of an expert-parallel model, resharded: 4 gloo processes.

A model trained 3 steps on a 2 x 2 (dp, ep) mesh (FSDP2 on its non-expert parameters,
loss-free biases moving) is saved with ``dcp.save`` and loaded, into freshly initialised
models, at EP = 4 (1-D mesh of 4), at EP = 2 (ranks 0 and 1 only) and into the plain
single-process model in this pytest process (``no_dist=True``). The reference is the
trained model's own eval output and bias, saved by rank 0 before anything is loaded, and
the AdamW moments of an expert weight gathered from every rank with a plain all_gather
(saved and loaded through ``optimizer_state_dict`` / ``load_optimizer_state_dict``).
"""
import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

import moebal
from moebal import LossFree, Router
from moebal.parallel import (
    expert_parallel,
    expert_parameters,
    fsdp_mesh,
    init_expert_mesh,
    load_optimizer_state_dict,
    optimizer_state_dict,
    sync_gradients,
)

from _spawn import assert_check_passed, checks_of, spawn_checks

WORLD = 4
D, F, E, K = 8, 12, 8, 2
TOL = dict(atol=1e-5, rtol=1e-5)


class Net(nn.Module):
    """inp -> x + MoE(norm(x)) -> out, a loss-free sigmoid router and one shared expert."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.norm, self.out = nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, D)
        router = Router(D, E, K, score="sigmoid", balancer=LossFree(rate=1e-2))
        self.moe = moebal.MoE(D, F, E, K, router=router, num_shared_experts=1, ffn_bias=True)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(self.norm(h)))


def _eval_batch():
    return torch.randn(10, D, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _evaluate(model):
    model.eval()
    return model(_eval_batch()), model.moe.router.expert_bias.clone()


def check_dcp_save_2x2_load_at_ep4_and_ep2(rank, world, tmp):
    from torch.distributed.fsdp import fully_shard

    ckpt = os.path.join(tmp, "ckpt")
    mesh = init_expert_mesh(ep=2, dp=2)
    model = expert_parallel(Net(seed=0), mesh)
    fully_shard(model, mesh=fsdp_mesh(mesh), ignored_params=set(expert_parameters(model)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        x, t = torch.randn(16, D, generator=gen), torch.randn(16, D, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        sync_gradients(model)
        opt.step()
    y_saved, bias_saved = _evaluate(model)
    model.reshard()  # FSDP2 leaves the root's parameters unsharded after a forward
    # the reference moments: every rank's local Adam state, gathered with a plain all_gather
    moments = [torch.empty_like(opt.state[model.moe.experts.w_in_EDH]["exp_avg"]) for _ in range(world)]
    dist.all_gather(moments, opt.state[model.moe.experts.w_in_EDH]["exp_avg"])
    full_moment = torch.cat(moments[:2])  # ranks 0 and 1 are (dp 0, ep 0) and (dp 0, ep 1)
    inp_moment = optimizer_state_dict(model, opt)["state"]["inp.weight"]["exp_avg"].full_tensor()
    dcp.save({"model": model.state_dict(), "optim": optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    if rank == 0:
        torch.save({"y": y_saved, "bias": bias_saved, "exp_avg": full_moment, "inp_exp_avg": inp_moment},
                   os.path.join(tmp, "reference.pt"))

    # EP = 4: a 1-D mesh over the 4 ranks, weights initialised differently before the load
    model4 = expert_parallel(Net(seed=1), init_expert_mesh(ep=4))
    opt4 = torch.optim.AdamW(model4.parameters(), lr=1e-2)
    state = {"model": model4.state_dict(), "optim": optimizer_state_dict(model4, opt4)}
    dcp.load(state, checkpoint_id=ckpt)
    model4.load_state_dict(state["model"])
    load_optimizer_state_dict(model4, opt4, state["optim"])
    y4, bias4 = _evaluate(model4)
    moment4 = opt4.state[model4.moe.experts.w_in_EDH]["exp_avg"]
    steps4 = opt4.state[model4.moe.experts.w_in_EDH]["step"]

    # EP = 2 on ranks 0 and 1 (a 1-D mesh over a sub-group); ranks 2 and 3 wait
    pair = dist.new_group([0, 1])
    if rank < 2:
        model2 = expert_parallel(Net(seed=2), DeviceMesh.from_group(pair, "cpu", mesh_dim_names=("ep",)))
        state = {"model": model2.state_dict()}
        dcp.load(state, checkpoint_id=ckpt, process_group=pair)
        model2.load_state_dict(state["model"])
        y2, bias2 = _evaluate(model2)
        assert model2.moe.experts.num_experts == E // 2
        torch.testing.assert_close(y2, y_saved, **TOL)
        assert torch.equal(bias2, bias_saved), (bias2.tolist(), bias_saved.tolist())

    assert model4.moe.experts.num_experts == E // 4
    assert torch.equal(moment4, full_moment[rank * E // 4:(rank + 1) * E // 4])
    assert int(steps4) == 3
    torch.testing.assert_close(y4, y_saved, **TOL)
    assert torch.equal(bias4, bias_saved), (bias4.tolist(), bias_saved.tolist())
    assert bias_saved.abs().sum() > 0  # the biases moved during training


def check_state_dict_of_an_ep_model(rank, world, tmp):
    """Global DTensors in state_dict (no copy); load_state_dict takes the full tensors of the
    plain model (sliced) and its own state back; deepcopy and .to(bf16) keep working."""
    from torch.distributed.tensor import DTensor, Shard

    plain = Net(seed=3)
    model = expert_parallel(copy.deepcopy(plain), init_expert_mesh(ep=4))
    state = model.state_dict()
    w = state["moe.experts.w_in_EDH"]
    other = Net(seed=4)
    ep_other = expert_parallel(copy.deepcopy(other), init_expert_mesh(ep=4))
    ep_other.load_state_dict(plain.state_dict())  # full [E, ...] tensors, sliced on load
    twin = copy.deepcopy(model)  # the process group is shared, not copied
    x = _eval_batch()
    y, y_twin, y_other = model(x), twin(x), ep_other(x)
    full_w = w.full_tensor()  # a collective: before the assertions
    shares_storage = w.to_local().data_ptr() == model.moe.experts.w_in_EDH.data_ptr()
    model.to(torch.bfloat16)
    bf16_state = model.state_dict()

    assert isinstance(w, DTensor) and tuple(w.placements) == (Shard(0),) and w.shape == (E, D, 2 * F)
    assert shares_storage
    torch.testing.assert_close(full_w, plain.moe.experts.w_in_EDH, rtol=0, atol=0)
    for name in ("w_in_EDH", "w_out_EFD", "b_in_EH", "b_out_ED"):
        lo = rank * E // 4
        want = getattr(plain.moe.experts, name)[lo:lo + E // 4]
        assert torch.equal(getattr(ep_other.moe.experts, name), want), name
    torch.testing.assert_close(y_other, y, rtol=0, atol=0)
    torch.testing.assert_close(y_twin, y, rtol=0, atol=0)
    assert bf16_state["moe.experts.w_in_EDH"].dtype == torch.bfloat16
    assert bf16_state["moe.router.expert_bias"].dtype == torch.float32
    with pytest.raises(ValueError, match="moe.experts.w_in_EDH"):
        ep_other.load_state_dict({**plain.state_dict(), "moe.experts.w_in_EDH": torch.zeros(3, D, 2 * F)})


CHECKS = checks_of(sys.modules[__name__])


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dcp"))
    return spawn_checks(__name__, WORLD, tmp), tmp


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_dcp(spawned, check):
    assert_check_passed(spawned[0], check)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # no_dist=True says so
def test_dcp_2x2_checkpoint_loads_into_one_plain_process(spawned):
    """The plain (never expert-parallel) model in this process, no process group."""
    results, tmp = spawned
    if not os.path.exists(os.path.join(tmp, "reference.pt")):
        pytest.fail(f"the 4-process run wrote no checkpoint: {results[0]}")
    ckpt = os.path.join(tmp, "ckpt")
    meta = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    assert tuple(meta["model.moe.experts.w_in_EDH"].size) == (E, D, 2 * F)  # stored at the global shape
    assert tuple(meta["optim.state.moe.experts.w_in_EDH.exp_avg"].size) == (E, D, 2 * F)
    assert tuple(meta["model.inp.weight"].size) == (D, D)  # FSDP's shards, stored at the global shape

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = Net(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    y, bias = _evaluate(model)
    reference = torch.load(os.path.join(tmp, "reference.pt"))
    torch.testing.assert_close(y, reference["y"], **TOL)
    assert torch.equal(bias, reference["bias"]), (bias.tolist(), reference["bias"].tolist())
    assert torch.equal(opt.state[model.moe.experts.w_in_EDH]["exp_avg"], reference["exp_avg"])
    assert torch.equal(opt.state[model.inp.weight]["exp_avg"], reference["inp_exp_avg"])
