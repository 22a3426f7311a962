"""moebal.parallel on real process groups: gloo on 127.0.0.1, 2 and 4 CPU processes.

One spawn per world size runs every check (starting processes is the slow part); each
check does its collectives first and its assertions last, so a failing assertion on one
rank never leaves the others waiting. Every collective has a 60 s timeout and the join
a deadline, so a hang fails the test instead of stalling CI.
"""
import copy
import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moebal
from moebal import AuxLoss, LossFree, Router
from moebal.parallel import (
    GlobalBatchBalance,
    TokenShuffle,
    TokenShufflePlan,
    expert_parallel,
    set_balance_group,
    shuffle_permutation,
    sync_gradients,
)

WORLD_SIZES = (2, 4)
TIMEOUT = datetime.timedelta(seconds=60)
JOIN_DEADLINE_S = 150
D, F, E, K = 8, 12, 8, 2  # D, 2F multiples of 4: grouped_mm wants 16-byte strides in fp32
TOL = dict(atol=1e-5, rtol=1e-5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(world: int, tokens, seed: int):
    """The same per-rank inputs on every rank: ``tokens`` is an int or a per-rank list."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [tokens] * world if isinstance(tokens, int) else tokens
    return [torch.randn(t, D, generator=gen) for t in sizes]


# --------------------------------------------------------------------------- checks
# Each check runs on every rank; it returns nothing and raises AssertionError on failure.


def _ep_equals_single_process(rank, world, masked=False, **moe_kwargs):
    """EP forward/backward on rank r's batch == the full layer on every rank's batch."""
    mask = (torch.arange(12) % 3 != 0) if masked else None  # padding: pairs with no expert
    torch.manual_seed(0)
    ref = moebal.MoE(D, F, E, K, **moe_kwargs)
    ep = expert_parallel(copy.deepcopy(ref))
    xs, gs = _batches(world, 12, seed=1), _batches(world, 12, seed=2)

    x = xs[rank].clone().requires_grad_(True)
    y = ep(x, token_mask=mask)
    ((y * gs[rank]).sum() + ep.aux_loss).backward()
    x_grad = x.grad.clone()
    sync_gradients(ep)  # DP mean over ranks; expert shards hold the sum over ranks' tokens / W

    ref_x = [xr.clone().requires_grad_(True) for xr in xs]
    total = 0
    for r in range(world):
        yr = ref(ref_x[r], token_mask=mask)
        total = total + (yr * gs[r]).sum() + ref.aux_loss
        if r == rank:
            y_ref = yr.detach()
    (total / world).backward()

    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x_grad, ref_x[rank].grad * world, **TOL)
    lo, hi = rank * E // world, (rank + 1) * E // world
    for name, p in ref.named_parameters():
        got = dict(ep.named_parameters())[name].grad
        want = p.grad[lo:hi] if name.startswith("experts.") else p.grad
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"grad of {name}: {m}")
    assert ep.experts.num_experts == E // world and ep.experts.first_expert == lo


def check_ep_dropless(rank, world):
    _ep_equals_single_process(rank, world, router="aux_loss", num_shared_experts=1, shared_gate=True)


def check_ep_dropless_masked_with_null_experts(rank, world):
    # masked tokens and null picks leave pairs with no expert: never sent to another rank
    _ep_equals_single_process(rank, world, masked=True, router="aux_loss", num_null_experts=2)


def check_ep_capacity(rank, world):
    # factor 1.0 with top-2 over 8 experts: some experts overflow and drop pairs
    # (and expert biases, sliced with the weights)
    _ep_equals_single_process(rank, world, router="aux_loss", capacity_factor=1.0, ffn_bias=True)


def check_loss_free_biases_bit_identical(rank, world):
    """50 auto-mode steps on different data per rank: the same bias everywhere, bit for bit,
    equal to one process summing every rank's counts; manual mode + update_biases agrees."""
    torch.manual_seed(3)
    auto = Router(D, E, K, score="sigmoid", balancer=LossFree(rate=1e-2))
    manual = Router(D, E, K, score="sigmoid", balancer=LossFree(rate=1e-2, update="manual"))
    manual.load_state_dict(auto.state_dict())
    ref = copy.deepcopy(manual)
    assert set_balance_group(auto) == 1 and set_balance_group(manual) == 1
    for step in range(50):
        xs = _batches(world, 16, seed=100 + step)
        auto(xs[rank])
        manual(xs[rank])
        moebal.update_biases(manual)
        for xr in xs:  # the single-process reference: every rank's batch, counts summed
            ref(xr)
        ref.apply_bias_update()
    biases = [torch.empty(E) for _ in range(world)]
    dist.all_gather(biases, auto.expert_bias)
    for r, b in enumerate(biases):
        assert torch.equal(b, biases[0]), f"rank {r} bias {b.tolist()} != rank 0 {biases[0].tolist()}"
    assert torch.equal(auto.expert_bias, ref.expert_bias)
    assert torch.equal(manual.expert_bias, ref.expert_bias)
    assert auto.expert_bias.abs().sum() > 0


def _reference_counts(x_TD, gate_ED, bias_E):
    """float64 top-K of sigmoid(x W^T) + bias, counted per expert (an independent router)."""
    select_TE = torch.sigmoid(x_TD.double() @ gate_ED.double().t()) + bias_E.double()
    idx = torch.sort(select_TE, dim=-1, descending=True, stable=True).indices[:, :K]
    return torch.bincount(idx.reshape(-1), minlength=E)


def check_ddp_broadcast_buffers_keeps_every_ranks_counts(rank, world):
    """DDP with its default broadcast_buffers=True, 3 micro-batches accumulated without
    no_sync: each rank keeps its own pending loss-free counts (DDP broadcasts rank 0's
    buffers before every forward), and update_biases gives one bit-identical bias."""
    torch.manual_seed(21)
    moe = moebal.MoE(D, F, E, K, router=Router(D, E, K, score="sigmoid", balancer=LossFree(rate=1e-2, update="manual")))
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
    bias0 = moe.router.expert_bias.clone()
    ddp = torch.nn.parallel.DistributedDataParallel(moe)
    expected = torch.zeros(E, dtype=torch.int64)
    for micro in range(3):
        xs = _batches(world, 17 + micro, seed=300 + micro)
        ddp(xs[rank]).square().mean().backward()
        expected += _reference_counts(xs[rank], moe.router.gate.weight.detach(), bias0)
    got = moe.router.load_counts.clone()
    moebal.update_biases(moe)
    biases = [torch.empty(E) for _ in range(world)]
    dist.all_gather(biases, moe.router.expert_bias)
    total = torch.zeros(E, dtype=torch.int64)
    for r in range(world):  # every rank's counts, computed independently on this rank
        for micro in range(3):
            xs = _batches(world, 17 + micro, seed=300 + micro)
            total += _reference_counts(xs[r], moe.router.gate.weight.detach(), bias0)
    assert torch.equal(got, expected), f"rank {rank} counts {got.tolist()} != its own {expected.tolist()}"
    want = bias0 + 1e-2 * torch.sign(total.sum() - E * total).float()
    for r, b in enumerate(biases):
        assert torch.equal(b, biases[0]), f"rank {r} bias {b.tolist()} != rank 0 {biases[0].tolist()}"
    assert torch.equal(moe.router.expert_bias, want), (moe.router.expert_bias.tolist(), want.tolist())


def check_global_batch_aux_loss(rank, world):
    """R ranks x G micro-batches: the step's loss is the concatenated batch's loss; the
    gradient does not depend on R and, when f is the whole step's, is the concat gradient."""
    G = 3
    torch.manual_seed(4)
    router = Router(D, E, K, balancer=AuxLoss(alpha=1.0, variant="global_batch"))
    single = Router(D, E, K, balancer=AuxLoss(alpha=1.0, variant="global_batch"))
    concat = Router(D, E, K, balancer=AuxLoss(alpha=1.0, variant="batch"))
    single.load_state_dict(router.state_dict())
    concat.load_state_dict(router.state_dict())
    set_balance_group(router)
    micro = [_batches(world, 8, seed=200 + g) for g in range(G)]  # micro[g][r]

    def step(batches_g):
        """Run one optimizer step's micro-batches on this rank; returns (window loss, grad)."""
        router.gate.weight.grad = None
        with GlobalBatchBalance(router) as window:
            for batches in batches_g:
                (router(batches[rank]).aux_loss / len(batches_g)).backward()
        sync_gradients(router)  # DP mean over ranks
        return window.loss, router.gate.weight.grad.clone()

    def concat_loss(batches_g):
        concat.gate.weight.grad = None
        loss = concat(torch.cat([x for batches in batches_g for x in batches])).aux_loss
        loss.backward()
        return loss.detach(), concat.gate.weight.grad.clone()

    # (a) G = 1: value and gradient of the concatenated batch, exactly, for any world size
    loss1, grad1 = step(micro[:1])
    ref_loss1, ref_grad1 = concat_loss(micro[:1])
    # (b) G micro-batches: the value is the concat value; the gradient equals one process
    #     running the same micro-batches (each the concat over ranks): no 1/R shrinkage
    lossG, gradG = step(micro)
    ref_lossG, _ = concat_loss(micro)
    single.gate.weight.grad = None
    with GlobalBatchBalance(single) as window:
        for batches in micro:
            (single(torch.cat(batches)).aux_loss / G).backward()
    # (c) micro-batches with the same counts (a repeated batch): fhat(g) = f, so the
    #     accumulated gradient is the concatenated batch's gradient, scale included
    lossR, gradR = step([micro[0]] * G)

    torch.testing.assert_close(loss1, ref_loss1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad1, ref_grad1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lossG, ref_lossG, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(window.loss, ref_lossG, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gradG, single.gate.weight.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lossR, ref_loss1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gradR, ref_grad1, atol=1e-6, rtol=1e-5)
    assert grad1.abs().sum() > 0


def check_shuffle_round_trip(rank, world):
    """Unequal token counts per rank; the shuffle matches the global permutation and the
    round trip (values and gradients) is exact."""
    sizes = [6 + 2 * r for r in range(world)]
    xs = _batches(world, sizes, seed=5)
    plan = TokenShufflePlan.build(sizes[rank], seed=11, step=4)
    x = xs[rank].clone().requires_grad_(True)
    shuffled = plan.shuffle(x)
    back = plan.restore(shuffled)
    g = torch.randn(back.shape, generator=torch.Generator().manual_seed(rank))
    (back * g).sum().backward()

    perm = shuffle_permutation(sum(sizes), seed=11, step=4)
    lo = sum(sizes[:rank])
    assert torch.equal(shuffled, torch.cat(xs)[perm[lo : lo + sizes[rank]]])
    assert torch.equal(back, xs[rank])
    assert torch.equal(x.grad, g)
    assert not torch.equal(perm, torch.arange(sum(sizes)))


def check_base_shuffled_expert_parallel(rank, world):
    """BASE across ranks: shuffle, local balanced assignment, EP experts, unshuffle ==
    the single-process layer applied to each rank's slice of the shuffled batch."""
    T = 8  # T*K % E == 0: BASE balances each rank's 8 tokens exactly
    torch.manual_seed(6)
    ref = moebal.MoE(D, F, E, K, router="base")
    moe = expert_parallel(copy.deepcopy(ref))
    layer = TokenShuffle(moe, seed=7)
    xs, gs = _batches(world, T, seed=8), _batches(world, T, seed=9)
    x = xs[rank].clone().requires_grad_(True)
    y = layer(x)
    (y * gs[rank]).sum().backward()
    load = moe.last_stats.load.clone()
    x_grad = x.grad.clone()
    sync_gradients(layer)

    perm = shuffle_permutation(world * T, seed=7, step=0)
    x_all = torch.cat(xs).requires_grad_(True)
    x_perm = x_all[perm]
    y_perm = torch.cat([ref(x_perm[s * T : (s + 1) * T]) for s in range(world)])
    y_all = torch.empty_like(y_perm).index_copy(0, perm, y_perm)
    ((y_all * torch.cat(gs)).sum() / world).backward()

    torch.testing.assert_close(y, y_all[rank * T : (rank + 1) * T].detach(), **TOL)
    torch.testing.assert_close(x_grad, x_all.grad[rank * T : (rank + 1) * T] * world, **TOL)
    torch.testing.assert_close(moe.router.gate.weight.grad, ref.router.gate.weight.grad, **TOL)
    assert torch.equal(load, torch.full((E,), T * K // E)), load
    assert int(layer.step) == 1


def check_mismatched_config_raises(rank, world):
    """A rank built differently gets a clear error on every rank, not a hang."""
    errors = []
    torch.manual_seed(10)
    num_experts = 2 * world if rank == world - 1 else world  # the last rank disagrees
    try:
        expert_parallel(moebal.MoE(D, F, num_experts, 1))
    except ValueError as exc:
        errors.append(str(exc))
    torch.manual_seed(10)  # the rank-dependent model above drew a different number of values
    try:  # E not a multiple of the group size: refused consistently
        expert_parallel(moebal.MoE(D, F, world + 1, 1))
    except ValueError as exc:
        errors.append(str(exc))
    router = Router(D, E, K, score="sigmoid", balancer=LossFree())
    if rank == 0:
        router.expert_bias.fill_(0.5)  # a bias that only rank 0 loaded
    try:
        set_balance_group(router)
    except ValueError as exc:
        errors.append(str(exc))
    assert len(errors) == 3, errors
    assert "differs across the" in errors[0] and f"rank {world - 1}:" in errors[0], errors[0]
    assert "multiple of" in errors[1] and f"num_experts={world + 1}" in errors[1], errors[1]
    assert "expert_bias" in errors[2], errors[2]


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


# --------------------------------------------------------------------------- harness


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    results = {}
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=TIMEOUT
    )
    try:
        for name, fn in CHECKS.items():
            try:
                fn(rank, world)
                results[name] = None
            except AssertionError:
                results[name] = traceback.format_exc()
            except Exception:  # the ranks may be out of step now: stop here
                results[name] = traceback.format_exc()
                break
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def world_results(request, tmp_path_factory):
    world = request.param
    out_dir = str(tmp_path_factory.mktemp(f"world{world}"))
    ctx = mp.start_processes(
        _worker, args=(world, _free_port(), out_dir), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOIN_DEADLINE_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} gloo processes still running after {JOIN_DEADLINE_S} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = {}
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results[rank] = json.load(f)
    return world, results


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_distributed(world_results, check):
    world, results = world_results
    failures = []
    for rank in range(world):
        if check not in results[rank]:
            failures.append(f"rank {rank}: not run (an earlier check failed with an exception)")
        elif results[rank][check] is not None:
            failures.append(f"rank {rank}:\n{results[rank][check]}")
    assert not failures, f"{check} with {world} ranks:\n" + "\n".join(failures)


# --------------------------------------------------------------------------- one process, no group


def test_parallel_api_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(moebal.MoE(D, F, E, K))
    with pytest.raises(RuntimeError, match="init_process_group"):
        set_balance_group(Router(D, E, K))
    with pytest.raises(RuntimeError, match="init_process_group"):
        TokenShuffle(moebal.MoE(D, F, E, K))


def test_global_batch_aux_loss_without_a_group():
    """No group: outside a window it is the batch loss; a window over G micro-batches
    reports the loss of their concatenation and uses the running fraction."""
    torch.manual_seed(12)
    router = Router(D, E, K, balancer=AuxLoss(alpha=1.0, variant="global_batch"))
    batch = Router(D, E, K, balancer=AuxLoss(alpha=1.0, variant="batch"))
    batch.load_state_dict(router.state_dict())
    micro = _batches(3, 10, seed=13)
    torch.testing.assert_close(router(micro[0]).aux_loss, batch(micro[0]).aux_loss)
    with GlobalBatchBalance(router) as window:
        losses = [router(x).aux_loss for x in micro]
    torch.testing.assert_close(window.loss, batch(torch.cat(micro)).aux_loss.detach())
    torch.testing.assert_close(losses[0], batch(micro[0]).aux_loss)  # fhat(1) = micro-batch 1's f
    assert torch.equal(window.loads[0], moebal.stats.expert_load(router(torch.cat(micro)).indices, E))
    with pytest.raises(ValueError, match="global_batch"):
        GlobalBatchBalance(batch)
