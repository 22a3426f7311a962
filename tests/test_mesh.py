"""Expert parallelism on a 2 x 2 DeviceMesh (dp, ep): 4 gloo processes on 127.0.0.1.

The references are the single-process model run on every rank's batch (fp32, the losses
averaged over ranks) — no expert-parallel code in them. Rank r sits at mesh coordinate
(dp, ep) = (r // 2, r % 2), so it holds experts [ep*E/2, (ep+1)*E/2).
"""
import copy
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import checkpoint

import moebal
from moebal import LossFree, Router
from moebal.parallel import (
    expert_parallel,
    expert_parameters,
    fsdp_mesh,
    init_expert_mesh,
    sync_gradients,
)

from _spawn import assert_check_passed, checks_of, spawn_checks

WORLD = 4
D, F, E, K = 8, 12, 8, 2  # D, 2F multiples of 4: grouped_mm wants 16-byte strides in fp32
TOL = dict(atol=1e-5, rtol=1e-5)


class Block(nn.Module):
    def __init__(self, moe: nn.Module, recompute: bool = False):
        super().__init__()
        self.norm, self.ffn, self.recompute = nn.LayerNorm(D), moe, recompute

    def forward(self, x, mask=None):
        if self.recompute:  # activation checkpointing: the EP all-to-alls run again in backward
            return x + checkpoint(self.ffn, self.norm(x), mask, use_reentrant=False)
        return x + self.ffn(self.norm(x), token_mask=mask)


class Net(nn.Module):
    def __init__(self, router="aux_loss", recompute=False, **moe_kwargs):
        super().__init__()
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, D)
        self.block = Block(moebal.MoE(D, F, E, K, router=router, **moe_kwargs), recompute)

    def forward(self, x, mask=None):
        return self.out(self.block(self.inp(x), mask))


def _batches(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t, D, generator=gen) for t in sizes]


def _coords(rank):
    return rank // 2, rank % 2  # (dp, ep) on init_expert_mesh(ep=2, dp=2)


def _mesh_equals_single_process(rank, fsdp=False, recompute=False):
    """2 x 2 forward/backward + sync_gradients == the single-process model on all batches."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_expert_mesh(ep=2, dp=2)
    torch.manual_seed(0)
    ref = Net(num_shared_experts=1, recompute=recompute)
    model = expert_parallel(copy.deepcopy(ref), mesh)
    if fsdp:  # FSDP2 shards every non-expert parameter over all 4 ranks
        fully_shard(model, mesh=fsdp_mesh(mesh), ignored_params=set(expert_parameters(model)))
    sizes = [12, 0, 7, 12]  # rank 1 has no tokens at all
    masks = [None, None, torch.arange(7) % 3 != 0, None]  # rank 2 pads a third of its tokens
    xs, gs = _batches(sizes, seed=1), _batches(sizes, seed=2)

    x = xs[rank].clone().requires_grad_(True)
    y = model(x, masks[rank])
    ((y * gs[rank]).sum() + moebal.aux_loss(model)).backward()
    sync_gradients(model)
    grads = {}
    for name, p in model.named_parameters():  # FSDP's gradients are shards: gather them (a collective)
        grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad

    ref_x = [xr.clone().requires_grad_(True) for xr in xs]
    total = 0
    for r in range(WORLD):
        yr = ref(ref_x[r], masks[r])
        total = total + (yr * gs[r]).sum() + moebal.aux_loss(ref)
        if r == rank:
            y_ref = yr.detach()
    (total / WORLD).backward()

    torch.testing.assert_close(y.detach(), y_ref, **TOL)
    torch.testing.assert_close(x.grad, ref_x[rank].grad * WORLD, **TOL)
    lo = _coords(rank)[1] * E // 2
    assert set(grads) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        want = p.grad[lo:lo + E // 2] if ".experts." in name else p.grad
        torch.testing.assert_close(grads[name], want, **TOL, msg=lambda m: f"grad of {name}: {m}")


def check_mesh_2x2_equals_single_process(rank, world, tmp):
    _mesh_equals_single_process(rank)


def check_mesh_2x2_with_fsdp2_on_the_non_expert_parameters(rank, world, tmp):
    _mesh_equals_single_process(rank, fsdp=True)


def check_mesh_2x2_under_activation_checkpointing(rank, world, tmp):
    _mesh_equals_single_process(rank, recompute=True)


def check_loss_free_biases_bit_identical_after_20_steps(rank, world, tmp):
    """20 AdamW steps on a 2 x 2 mesh, different data per rank, loss-free biases updated on
    every forward (counts summed over all 4 ranks): the bias is bit-identical on every rank
    and to one process training on the concatenated batches; the weights agree within 1e-5."""
    mesh = init_expert_mesh(ep=2, dp=2)
    torch.manual_seed(3)
    ref = Net(router=Router(D, E, K, score="sigmoid", balancer=LossFree(rate=1e-2)))
    model = expert_parallel(copy.deepcopy(ref), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(20):
        xs, ts = _batches([16] * WORLD, seed=100 + step), _batches([16] * WORLD, seed=200 + step)
        opt.zero_grad()
        nn.functional.mse_loss(model(xs[rank]), ts[rank]).backward()
        sync_gradients(model)
        opt.step()
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ts)).backward()
        ref_opt.step()
    bias = model.block.ffn.router.expert_bias
    gate = model.block.ffn.router.gate.weight.detach()
    biases, gates = [torch.empty_like(bias) for _ in range(world)], [torch.empty_like(gate) for _ in range(world)]
    dist.all_gather(biases, bias)
    dist.all_gather(gates, gate)

    for r in range(world):
        assert torch.equal(biases[r], biases[0]), f"rank {r} bias {biases[r].tolist()} != rank 0 {biases[0].tolist()}"
        assert torch.equal(gates[r], gates[0]), f"rank {r}'s router weights differ from rank 0's"
    assert torch.equal(bias, ref.block.ffn.router.expert_bias), (bias.tolist(), ref.block.ffn.router.expert_bias)
    assert bias.abs().sum() > 0
    assert bias.dtype == torch.float32
    lo = _coords(rank)[1] * E // 2
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        want = p[lo:lo + E // 2] if ".experts." in name else p
        torch.testing.assert_close(got[name], want, **TOL, msg=lambda m: f"{name} after 20 steps: {m}")


def check_mismatched_mesh_raises_on_every_rank(rank, world, tmp):
    """A rank with another mesh gets a clear ValueError, and so does every other rank."""
    errors = {}
    try:  # rank 3 asks for a 1-D mesh of 4: caught before init_device_mesh creates a group
        init_expert_mesh(ep=4, dp=1) if rank == 3 else init_expert_mesh(ep=2, dp=2)
    except ValueError as exc:
        errors["shape"] = str(exc)
    mesh = init_expert_mesh(ep=2, dp=2)
    torch.manual_seed(10)
    model = Net()
    try:  # the same mesh, but rank 3 reads its dims the other way round
        dims = dict(ep_dim="dp", dp_dim="ep") if rank == 3 else {}
        expert_parallel(copy.deepcopy(model), mesh, **dims)
    except ValueError as exc:
        errors["dims"] = str(exc)
    try:  # rank 3 passes a 1-D mesh over the same 4 ranks
        mine = DeviceMesh.from_group(dist.group.WORLD, "cpu", mesh_dim_names=("ep",)) if rank == 3 else mesh
        expert_parallel(copy.deepcopy(model), mine)
    except ValueError as exc:
        errors["1d"] = str(exc)
    try:
        init_expert_mesh(ep=3, dp=1)
    except ValueError as exc:
        errors["size"] = str(exc)
    try:
        expert_parallel(copy.deepcopy(model), mesh, ep_dim="tp")
    except ValueError as exc:
        errors["name"] = str(exc)

    assert set(errors) == {"shape", "dims", "1d", "size", "name"}, errors
    assert "requested mesh differs across the 4 ranks" in errors["shape"], errors["shape"]
    assert "rank 3: dp=1, ep=4" in errors["shape"], errors["shape"]
    assert "mesh.ep_dim" in errors["dims"] and "rank 3:" in errors["dims"], errors["dims"]
    assert "mesh.ranks" in errors["1d"] and "mesh.dim_names" in errors["1d"], errors["1d"]
    assert "ep * dp must equal the world size 4" in errors["size"], errors["size"]
    assert "ep_dim='tp'" in errors["name"] and "('dp', 'ep')" in errors["name"], errors["name"]


CHECKS = checks_of(sys.modules[__name__])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_checks(__name__, WORLD, str(tmp_path_factory.mktemp("mesh")))


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_mesh(results, check):
    assert_check_passed(results, check)
