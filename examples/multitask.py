"""A multi-task model on a CGC layer, watched for HoME's three failures.

    python examples/multitask.py               # about 20 s on one CPU core
    python examples/multitask.py --mode mmoe   # all gates open to all experts

Three regression tasks share one input: two dense tasks with label correlation
``--correlation`` and a task with labels on only 1 % of the examples (Ma et al.'s
synthetic protocol, ``moebal.multitask_bench.data.make_tasks``). A ``MultiGateMoE``
with shared and task-specific experts feeds one small tower per task; the loss of each
task is averaged over its labelled examples only. Every ``--log-every`` steps the
per-task R^2 on held-out data is printed; at the end, the gate statistics averaged over
the last steps (``MultiTaskMeter``) are printed as a table and checked with
``moebal.testing.assert_multitask``: no shared expert captured by one task (expert
degradation), every task using its own experts (underfitting), no dead experts (collapse).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import moebal
from moebal.multitask_bench.data import TASK_NAMES, make_tasks
from moebal.multitask_stats import stats_table
from moebal.testing import assert_multitask


class Net(nn.Module):
    def __init__(self, moe: moebal.MultiGateMoE, d_out: int):
        super().__init__()
        self.moe = moe
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(d_out, 16), nn.ReLU(), nn.Linear(16, 1))
                                    for _ in range(moe.num_tasks))

    def forward(self, x):
        return torch.cat([tower(h) for tower, h in zip(self.towers, self.moe(x))], dim=1)  # [B, K]


def r2(pred, y):
    return (1 - (pred - y).pow(2).mean(0) / y.var(0, unbiased=False)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="cgc", choices=["mmoe", "cgc", "mmoeex"])
    ap.add_argument("--correlation", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--log-every", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    data = make_tasks(args.correlation, seed=0)
    task_experts = 0 if args.mode == "mmoe" else 2
    moe = moebal.MultiGateMoE(64, 16, num_tasks=3, num_shared=2 if task_experts else 8,
                              num_task_experts=task_experts, d_hidden=48, mode=args.mode,
                              exclusivity=0.5 if args.mode == "mmoeex" else 0.0)
    model = Net(moe, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    meter = moebal.MultiTaskMeter()
    g = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        idx = torch.randint(data.x_train.shape[0], (256,), generator=g)
        x, y, lab = data.x_train[idx], data.y_train[idx], data.labelled_train[idx]
        sq = (model(x) - y).pow(2) * lab
        loss = (sq.sum(0) / lab.sum(0).clamp(min=1)).sum()  # each task over its labelled rows
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step > args.steps - 100:
            meter.update(moe.last_stats)  # the gate statistics of the last 100 steps
        if step % args.log_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                scores = r2(model(data.x_test), data.y_test)
            model.train()
            print(f"step {step:5d}  loss {loss.item():.3f}  test R^2 "
                  + "  ".join(f"{t} {v:.3f}" for t, v in zip(TASK_NAMES, scores)))

    levels = meter.mean()
    print()
    print(stats_table(levels[-1], moe.owner, list(TASK_NAMES)))
    try:
        # the bounds a unit test of your own model could hold it to
        assert_multitask(levels, max_shared_occupancy=0.9, max_dead_ratio=0.5, min_output_rms=1e-3,
                         min_own_use=0.05 if task_experts else None)
        print("\nassert_multitask: no shared expert captured, no dead or vanished expert, every task uses its own")
    except AssertionError as err:
        print(f"\n{err}")


if __name__ == "__main__":
    main()
