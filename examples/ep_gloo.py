"""Expert-parallel MoE training on CPU with gloo: ``torchrun --nproc-per-node 2 examples/ep_gloo.py``.

A two-block residual model learns a fixed random teacher. Block 1's MoE balances with the
global-batch aux loss (counts summed over all ranks and both micro-batches of a step),
block 2's with loss-free biases (counts summed over all ranks before every update), or
with BASE on tokens shuffled across ranks (``--block2 base``). The experts of both
layers are sharded over the ranks; every rank reads its own data.

Prints, on rank 0, the task loss averaged over ranks, the step's global-batch aux loss
and the global MaxVio of each layer; at the end it checks that every rank holds the same
loss-free bias, bit for bit, and the same router weights.
"""
from __future__ import annotations

import argparse
import datetime

import torch
import torch.distributed as dist
from torch import nn

import moebal
from moebal import AuxLoss, Router
from moebal.parallel import GlobalBatchBalance, TokenShuffle, expert_parallel, sync_gradients
from moebal.stats import max_violation


class Block(nn.Module):
    def __init__(self, d_model: int, ffn: nn.Module):
        super().__init__()
        self.norm, self.ffn = nn.LayerNorm(d_model), ffn

    def forward(self, x):
        return x + self.ffn(self.norm(x))


def build_model(args) -> nn.Module:
    d, E, K = args.d_model, args.experts, args.top_k
    torch.manual_seed(0)  # identical replicas: every rank builds the same full model
    moe1 = moebal.MoE(d, 2 * d, E, K, router=Router(d, E, K, balancer=AuxLoss(1e-2, variant="global_batch")))
    moe2 = moebal.MoE(d, 2 * d, E, K, router="base" if args.block2 == "base" else "loss_free")
    model = nn.Sequential(Block(d, moe1), Block(d, moe2), nn.Linear(d, d))
    expert_parallel(model)  # shard the experts of both layers over all ranks (checks configs first)
    if args.block2 == "base":
        model[1].ffn = TokenShuffle(moe2, seed=1)  # balanced assignment on tokens shuffled across ranks
    return model


def global_max_violation(load_E: torch.Tensor) -> float:
    load_E = load_E.clone()
    dist.all_reduce(load_E)
    return float(max_violation(load_E))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank per micro-batch")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--block2", choices=("loss_free", "base"), default="loss_free")
    args = p.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # torchrun sets rank/world/address
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = build_model(args)
    moe1, moe2 = model[0].ffn, [m for m in model[1].modules() if isinstance(m, moebal.MoE)][0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    window = GlobalBatchBalance(model)

    torch.manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(args.d_model, 64), nn.Tanh(), nn.Linear(64, args.d_model)).requires_grad_(False)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank reads different data
    if rank == 0:
        print(f"{world} ranks, {args.experts} experts per layer ({args.experts // world} on each rank), "
              f"{args.micro_batches} micro-batches x {args.tokens} tokens per rank per step")

    for step in range(1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        task = torch.zeros(())
        with window:  # one optimizer step: global-batch counts accumulate over the micro-batches
            for _ in range(args.micro_batches):
                x = torch.randn(args.tokens, args.d_model, generator=data)
                loss = nn.functional.mse_loss(model(x), teacher(x))
                (loss + moebal.aux_loss(model)).div(args.micro_batches).backward()
                task += loss.detach() / args.micro_batches
        sync_gradients(model)  # DP mean of replicated grads; expert shards / world
        optimizer.step()
        dist.all_reduce(task)
        if step % 10 == 0 or step == 1:
            vio1 = float(max_violation(window.loads[0]))
            vio2 = global_max_violation(moe2.last_stats.load)
            if rank == 0:
                print(f"step {step:3d}  task {float(task) / world:.4f}  global-batch aux {float(window.loss):.5f}  "
                      f"MaxVio layer1 {vio1:.3f}  layer2 (last micro-batch) {vio2:.3f}")

    # every replica is identical: loss-free bias bit for bit, router weights after the synced updates
    state = torch.cat([moe1.router.gate.weight.flatten(), moe2.router.gate.weight.flatten()]
                      + ([moe2.router.expert_bias] if moe2.router.expert_bias is not None else []))
    states = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    same = all(torch.equal(s, states[0]) for s in states)
    if rank == 0:
        print(f"replicated router state identical on all {world} ranks: {same}")
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
