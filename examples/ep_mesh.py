"""Expert parallelism on a 2 x 2 (dp, ep) mesh, a resharding checkpoint, evaluation in one process.

    torchrun --nproc-per-node 4 examples/ep_mesh.py                 # gloo on CPU
    torchrun --nproc-per-node 4 examples/ep_mesh.py --ep 4 --dp 1   # experts over all 4 ranks

A two-block residual model learns a fixed random teacher. Its experts are sharded over
the ``ep`` dim of the mesh and replicated over ``dp``; FSDP2 shards every other parameter
over all ranks. The routers balance with loss-free biases whose counts are summed over
every rank. After ``--steps`` steps the model is saved with ``torch.distributed.checkpoint``
(expert rows once, at their global positions), the process group is torn down, and rank 0
loads the checkpoint into the plain single-process model (``no_dist=True``) and checks
that it evaluates to the same loss and holds the same biases as the sharded model did.
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

import moebal
from moebal.parallel import expert_parallel, expert_parameters, fsdp_mesh, init_expert_mesh, sync_gradients
from moebal.stats import max_violation


class Block(nn.Module):
    def __init__(self, d_model: int, ffn: nn.Module):
        super().__init__()
        self.norm, self.ffn = nn.LayerNorm(d_model), ffn

    def forward(self, x):
        return x + self.ffn(self.norm(x))


def build_model(args) -> nn.Module:
    d, E, K = args.d_model, args.experts, args.top_k
    torch.manual_seed(0)  # every rank builds the same full model, then keeps its shard
    return nn.Sequential(*[Block(d, moebal.MoE(d, 2 * d, E, K, router="loss_free")) for _ in range(2)],
                         nn.Linear(d, d))


def biases(model) -> torch.Tensor:
    return torch.cat([m.router.expert_bias for m in model.modules() if isinstance(m, moebal.MoE)])


@torch.no_grad()
def evaluate(model, teacher, args) -> float:
    model.eval()
    x = torch.randn(256, args.d_model, generator=torch.Generator().manual_seed(99))
    return float(nn.functional.mse_loss(model(x), teacher(x)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank per step")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--checkpoint", help="checkpoint folder (default: a temporary one)")
    args = p.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # torchrun sets rank/world/address
    rank = dist.get_rank()
    torch.set_num_threads(1)
    mesh = init_expert_mesh(ep=args.ep, dp=args.dp)  # checked on every rank first
    model = expert_parallel(build_model(args), mesh)  # checks the mesh and the replicas, then shards
    fully_shard(model, mesh=fsdp_mesh(mesh), ignored_params=set(expert_parameters(model)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(args.d_model, 64), nn.Tanh(), nn.Linear(64, args.d_model)).requires_grad_(False)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank reads different data
    if rank == 0:
        print(f"mesh {mesh}: {args.experts // args.ep} of {args.experts} experts per rank, "
              f"{args.tokens} tokens per rank per step")

    for step in range(1, args.steps + 1):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        x = torch.randn(args.tokens, args.d_model, generator=data)
        loss = nn.functional.mse_loss(model(x), teacher(x))
        loss.backward()
        sync_gradients(model)  # experts over dp; FSDP already averaged the rest
        optimizer.step()
        loss = loss.detach()
        dist.all_reduce(loss)
        load = model[1].ffn.last_stats.load.clone()
        dist.all_reduce(load)
        if rank == 0 and (step == 1 or step % 10 == 0):
            print(f"step {step:3d}  task {float(loss) / dist.get_world_size():.4f}  "
                  f"MaxVio layer 2 (all ranks) {float(max_violation(load)):.3f}")

    sharded_loss, sharded_biases = evaluate(model, teacher, args), biases(model).clone()
    folder = args.checkpoint or (tempfile.mkdtemp(prefix="moebal-ep-mesh-") if rank == 0 else None)
    box = [folder]
    dist.broadcast_object_list(box)
    dcp.save(model.state_dict(), checkpoint_id=box[0])
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return

    # one process, no process group: the plain model, as a user evaluates it on one machine
    plain = build_model(args)
    state = plain.state_dict()
    with warnings.catch_warnings():  # no_dist=True warns that it loads in one process: that is the point
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=box[0], no_dist=True)
    plain.load_state_dict(state)
    size = sum(os.path.getsize(os.path.join(box[0], f)) for f in os.listdir(box[0]))
    plain_loss = evaluate(plain, teacher, args)
    same_bias = torch.equal(biases(plain), sharded_biases)
    print(f"checkpoint {box[0]} ({size / 1024:.0f} KiB)")
    print(f"eval loss: sharded {sharded_loss:.6f}, one process {plain_loss:.6f}; "
          f"loss-free biases identical: {same_bias}")
    if not same_bias or abs(plain_loss - sharded_loss) > 1e-5 * max(1.0, abs(sharded_loss)):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
