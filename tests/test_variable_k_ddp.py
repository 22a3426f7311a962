"""Expert-Threshold and ReMoE state under DDP with gradient accumulation (2 gloo processes).

Both policies keep state that training forwards move: Expert-Threshold's per-expert EMA
of the batch quantile, ReMoE's lambda. With ``balance_group`` set, every rank must hold
bit-identical state after accumulated steps (micro-batches of different sizes per rank,
``no_sync`` on all but the last), equal to a reference each rank computes by hand from
every rank's batches: the mean of the ranks' quantiles for Expert-Threshold, the summed
zero counts for ReMoE.
"""
from __future__ import annotations

import contextlib
import math
import sys

import pytest
import torch
import torch.distributed as dist

import moebal
from moebal import ExpertThreshold, ReMoE, Router
from _spawn import assert_check_passed, checks_of, spawn_checks

WORLD = 2
D, F, E, K = 8, 12, 8, 2
STEPS, MICRO = 2, 3


def _batch(rank: int, step: int, micro: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(9 + 4 * rank + micro, D, generator=gen)  # ranks see different token counts


def _train(policy, top_k: int):
    """DDP training; yields (rank's batch, every rank's batches, gate weight) before each forward."""
    torch.manual_seed(0)
    router = Router(D, E, top_k, balancer=policy, renormalize=False, balance_group=dist.group.WORLD)
    moe = moebal.MoE(D, F, E, top_k, router=router)
    ddp = torch.nn.parallel.DistributedDataParallel(moe)
    opt = torch.optim.SGD(moe.parameters(), lr=0.5)
    rank = dist.get_rank()
    for step in range(STEPS):
        for micro in range(MICRO):
            xs = [_batch(r, step, micro) for r in range(WORLD)]
            yield xs, moe.router.gate.weight.detach().float().clone()
            sync = contextlib.nullcontext() if micro == MICRO - 1 else ddp.no_sync()
            with sync:
                y = ddp(xs[rank])
                (y.square().mean() + moe.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    yield None, moe


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def check_expert_threshold_state_is_one_across_ranks(rank, world, tmp_dir):
    decay = 0.9
    ema = torch.zeros(E, dtype=torch.float32)
    steps = 0
    for xs, w in _train(ExpertThreshold(1.0, decay=decay), K):
        if xs is None:
            moe = w
            break
        quantiles = []
        for x in xs:  # expert choice's cut: the C-th largest score, C = ceil(T * K / E)
            scores = torch.softmax(x.float() @ w.t(), dim=-1)
            C = math.ceil(x.shape[0] * K / E)
            quantiles.append(scores.t().sort(dim=1, descending=True).values[:, C - 1])
        q = (quantiles[0] + quantiles[1]) / 2
        ema = decay * ema + (1 - decay) * q
        steps += 1
    got_ema, got_steps = moe.router.threshold_ema, moe.router.threshold_steps
    all_ema = _gathered(got_ema)
    all_steps = _gathered(got_steps)
    for r in range(world):
        assert torch.equal(all_ema[r], all_ema[0]), f"rank {r} thresholds differ from rank 0's"
        assert int(all_steps[r]) == STEPS * MICRO
    assert steps == STEPS * MICRO
    torch.testing.assert_close(got_ema, ema, rtol=1e-5, atol=1e-7)
    assert got_ema.dtype == torch.float32


def check_remoe_lambda_is_one_across_ranks(rank, world, tmp_dir):
    k, lam0, alpha = 4.0, 1e-3, 1.2  # target sparsity 0.5: about what a fresh gate gives
    local_disagree = False
    lam = torch.tensor(lam0, dtype=torch.float32)
    moves = []
    for xs, w in _train(ReMoE(k=k, lambda0=lam0, alpha=alpha), E):
        if xs is None:
            moe = w
            break
        zeros_r = [int((x.float() @ w.t() <= 0).sum()) for x in xs]
        outputs_r = [x.shape[0] * E for x in xs]
        local = {_sign((E - k) * o - E * z) for z, o in zip(zeros_r, outputs_r)}
        local_disagree |= len(local) > 1
        zeros, outputs = sum(zeros_r), sum(outputs_r)
        direction = (E - k) * outputs - E * zeros  # sparsity below target (> 0): lambda grows
        sign = _sign(direction)
        moves.append(sign)
        lam = lam * torch.tensor(alpha ** sign, dtype=torch.float32)
    got = moe.router.remoe_lambda
    everyone = _gathered(got.reshape(1))
    for r in range(world):
        assert torch.equal(everyone[r], everyone[0]), f"rank {r} lambda {everyone[r]} != rank 0's {everyone[0]}"
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, lam, rtol=1e-6, atol=0)
    assert any(m != 0 for m in moves)  # lambda did move
    assert local_disagree, f"no micro-batch where the ranks' own counts would step lambda apart: {moves}"


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


CHECKS = checks_of(sys.modules[__name__])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_checks(__name__, WORLD, str(tmp_path_factory.mktemp("variable_k_ddp")))


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_variable_k_ddp(results, check):
    assert_check_passed(results, check)
