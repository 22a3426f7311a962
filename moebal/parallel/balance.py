"""Balancing statistics over a data-parallel group and over the micro-batches of a step.

Shape legend: E experts.

- :func:`set_balance_group` points every router of a model at the data-parallel group:
  loss-free counts (``update="auto"`` and ``"manual"``) and global-batch aux-loss counts
  are then summed over it (int64, exact), so every rank holds a bit-identical bias.
- :class:`GlobalBatchBalance` is one optimizer step's window for routers with
  ``AuxLoss(variant="global_batch")``: their counts accumulate over the step's
  micro-batches, and on exit it reports the step's exact loss value.

What the global-batch loss is (Qiu et al. 2025; Megatron-LM's ``global_aux_loss``). On
rank r, micro-batch g (1-based) of a step with G micro-batches over W ranks, the router's
loss is ``alpha * E * sum_i fhat_i(g) * P_i(r, g)`` where ``P_i(r, g)`` is the mean
probability of expert i over that micro-batch's local tokens (carries the gradient) and
``fhat_i(g)`` the fraction of all routed pairs of micro-batches 1..g, summed over the W
ranks, that went to expert i (a constant). With the usual data-parallel gradient mean over
W and ``loss / G`` accumulation, the step's gradient is
``alpha * E * sum_i mean_{r,g} fhat_i(g) * grad P_i(r, g)``:

- G = 1: exactly the gradient of the aux loss of the concatenated global batch, for any W
  (the scale does not shrink with W; a loss built from an all-reduced P would be 1/W of it);
- G > 1: micro-batch g uses the running fraction of micro-batches 1..g (the last one uses
  the whole step's), since a micro-batch's backward runs before later micro-batches exist.

``GlobalBatchBalance.loss`` is the value ``alpha * E * sum_i f_i * Pbar_i`` with f and P
over the whole step (all ranks, all micro-batches) — exactly the concatenated batch's
loss — for logging. Micro-batches are assumed equal in size, as data parallelism assumes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moebal.router import AuxLoss, LossFree, Router
from moebal.parallel.collectives import check_same_config, digest, require_initialized

__all__ = ["set_balance_group", "GlobalBatchBalance"]


def set_balance_group(model: nn.Module, group=None) -> int:
    """Sum the balancing counts of every router in ``model`` over ``group`` (None = world).

    Checks first, with one ``all_gather_object``, that every rank has the same routers
    and the same loss-free biases (a rank that differs gets a ``ValueError``, on every
    rank). Returns the number of routers.
    """
    require_initialized("set_balance_group")
    group = group if group is not None else dist.group.WORLD
    routers = [(name, m) for name, m in model.named_modules() if isinstance(m, Router)]
    config = {"num_routers": len(routers)}
    for name, r in routers:
        config[f"{name or '<root>'}"] = (r.num_experts, r.top_k, r.score, repr(r.balancer))
        if r.policy(LossFree) is not None:
            config[f"{name or '<root>'}.expert_bias"] = digest([r.expert_bias])
    check_same_config(config, group, "set_balance_group: the routers")
    for _, r in routers:
        r.balance_group = group
    return len(routers)


def _global_routers(model: nn.Module) -> list[Router]:
    return [
        m for m in model.modules()
        if isinstance(m, Router) and getattr(m.policy(AuxLoss), "variant", None) == "global_batch"
    ]


class GlobalBatchBalance:
    """One optimizer step of global-batch aux loss over micro-batches (a context manager).

    ::

        window = GlobalBatchBalance(model)
        for batch in loader:
            with window:                                  # one optimizer step
                for micro in batch.chunk(G):
                    loss = task_loss(model(micro)) + moebal_aux_loss(model)
                    (loss / G).backward()
            sync_gradients(model)                         # or DDP's averaging
            optimizer.step()
            log(window.loss)                              # the concatenated batch's aux loss

    On entry the counts of every ``AuxLoss(variant="global_batch")`` router are zeroed and
    accumulate from then on; on a clean exit (all ranks must exit: one all-reduce per
    balance group) ``loss`` holds the step's exact aux-loss value summed over layers and
    ``loads`` each layer's int64 ``[E]`` expert load over the whole step and group.
    Outside a window each forward is its own step (counts summed over the group only).
    """

    def __init__(self, model: nn.Module):
        self.routers = _global_routers(model)
        if not self.routers:
            raise ValueError("GlobalBatchBalance: the model has no router with AuxLoss(variant='global_batch')")
        self.loss: torch.Tensor | None = None
        self.loads: list[torch.Tensor] = []

    def __enter__(self) -> "GlobalBatchBalance":
        for r in self.routers:
            r.window_counts.zero_()
            r.window_probs.zero_()
            r.window_open = True
        return self

    @torch.no_grad()
    def __exit__(self, exc_type, exc, tb) -> None:
        for r in self.routers:
            r.window_open = False
        if exc_type is not None:
            return
        by_group: dict[int, list[Router]] = {}
        for r in self.routers:
            by_group.setdefault(id(r.balance_group), []).append(r)
        total = torch.zeros((), dtype=torch.float64)
        for routers in by_group.values():
            probs = torch.cat([r.window_probs for r in routers])  # local sums of P and tokens
            group = routers[0].balance_group
            if group is not None and dist.is_available() and dist.is_initialized():
                dist.all_reduce(probs, op=dist.ReduceOp.SUM, group=group)
            for r, p in zip(routers, probs.split([r.num_experts + 1 for r in routers])):
                E = r.num_experts
                f_E = r.window_counts[:E].double() / r.window_counts[E].clamp(min=1).double()
                P_E = p[:E] / p[E].clamp(min=1)
                total += r.policy(AuxLoss).alpha * E * torch.dot(f_E, P_E).cpu()
        self.loss = total.float()
        self.loads = [r.window_counts[: r.num_experts].clone() for r in self.routers]
