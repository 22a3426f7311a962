"""Expert parallelism: the E experts of a ``moebal.MoE`` sharded over the ranks of a group.

Shape legend: T tokens, D model dim, E experts (global), L = E / W local experts, W ranks
in the expert-parallel group, R rows of the global plan's ``xs``, M rows received here.

The router, the dispatch plan, dispatch and combine stay exactly as in the single-process
layer; only ``moe.experts`` is replaced by :class:`ExpertParallel`, which takes the same
``(xs, plan)`` and returns the same ``ys``:

    xs [R, D] (grouped by expert, so by owning rank) ──all_to_all──► rows from every rank
      ──local plan (regroup by local expert)──► grouped GEMM on the L local experts
      ──inverse regroup──► all_to_all back ──► ys [R, D]

Dropless, the per-expert counts are exchanged first (``all_to_all_single`` on int64
counts) and the split sizes read on the host once per layer call (inherent: the receive
buffer's size depends on them). With a capacity every expert owns C rows per source rank,
so the splits are static and nothing is read back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moebal.experts import GroupedExperts
from moebal.plan import DispatchPlan, build_plan
from moebal.parallel.collectives import (
    GroupHandle,
    all_to_all,
    check_same_config,
    digest,
    group_rank,
    group_size,
    require_initialized,
)

__all__ = ["ExpertParallel", "expert_parallel", "sync_gradients"]


class ExpertParallel(GroupedExperts):
    """The L = E/W experts of this rank; a drop-in for ``GroupedExperts`` under a group of W ranks.

    ``forward(xs, plan)`` takes the rows and plan of the *global* E experts (as the MoE
    layer builds them on every rank) and returns their outputs; rows routed to another
    rank's experts travel there and back with ``all_to_all_single``. Gradients flow back
    the same way, so the local expert weights receive the gradient from every rank's
    tokens (the sum over ranks of each rank's loss).

    Build it with :meth:`from_experts` (takes this rank's slice of a full, identically
    initialised ``GroupedExperts``) or directly (initialises only the local shard).
    """

    def __init__(
        self, d_model: int, d_ff: int, num_experts: int, activation: str = "swiglu", group=None, bias: bool = False
    ):
        require_initialized("ExpertParallel")
        world = group_size(group)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if num_experts % world:
            raise ValueError(
                f"num_experts={num_experts} cannot be sharded over an expert-parallel group of {world} ranks: "
                f"it must be a multiple of the group size"
            )
        super().__init__(d_model, d_ff, num_experts // world, activation, **({"bias": True} if bias else {}))
        self._group = GroupHandle(group)
        self.world_size, self.rank = world, group_rank(group)
        self.num_global_experts = num_experts
        self.first_expert = self.rank * self.num_experts

    @classmethod
    def from_experts(cls, experts: GroupedExperts, group=None) -> "ExpertParallel":
        """This rank's shard of ``experts`` (its experts ``[rank*L, (rank+1)*L)``), weights copied."""
        if not isinstance(experts, GroupedExperts) or isinstance(experts, ExpertParallel):
            raise TypeError(f"experts must be an unsharded moebal GroupedExperts, got {type(experts).__name__}")
        has_bias = getattr(experts, "b_in_EH", None) is not None
        shard = cls(experts.d_model, experts.d_ff, experts.num_experts, experts.activation, group, bias=has_bias)
        lo, hi = shard.first_expert, shard.first_expert + shard.num_experts
        shard.to(device=experts.w_in_EDH.device, dtype=experts.w_in_EDH.dtype)
        with torch.no_grad():
            for name, full in experts.named_parameters(recurse=False):
                getattr(shard, name).copy_(full[lo:hi])
        return shard

    @property
    def group(self):
        """The expert-parallel process group (None = default group)."""
        return self._group.group

    def _layout(self, plan: DispatchPlan):
        """(recv_splits, send_splits) as host ints, the local expert of every received row,
        and the local capacity (None when dropless)."""
        W, L, device = self.world_size, self.num_experts, plan.counts_E.device
        if plan.capacity is not None:
            C = plan.capacity
            splits = [L * C] * W
            local_M = torch.arange(L, device=device).repeat_interleave(C).repeat(W)
            return splits, splits, local_M, W * C
        send_E = plan.counts_E.contiguous()
        recv_WL = torch.empty_like(send_E)  # [W*L]: counts from rank 0's rows for my experts, then rank 1's, ...
        dist.all_to_all_single(recv_WL, send_E, group=self.group)
        send_splits, recv_splits = torch.stack([send_E.view(W, L).sum(1), recv_WL.view(W, L).sum(1)]).tolist()
        local_M = torch.arange(L, device=device).repeat(W).repeat_interleave(recv_WL, output_size=sum(recv_splits))
        return recv_splits, send_splits, local_M, None

    def forward(self, xs_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if plan.num_experts != self.num_global_experts:
            raise ValueError(
                f"the plan routes to {plan.num_experts} experts, this layer shards {self.num_global_experts}"
            )
        recv_splits, send_splits, local_M, local_capacity = self._layout(plan)
        # dropless, pairs with no expert (masked tokens, null picks) leave a padding tail
        # after the V routed rows: it is never sent, and comes back as zero rows
        R, V = xs_RD.shape[0], sum(send_splits)
        xr_MD = all_to_all(xs_RD[:V], recv_splits, send_splits, self.group)
        # received rows come grouped by source rank; regroup them by local expert (a
        # permutation: no drops, as every local expert has room for all its rows)
        local = build_plan(local_M.unsqueeze(1), self.num_experts, local_capacity)
        xl_MD = xr_MD.index_select(0, local.pair_of_row_R)
        yl_MD = super().forward(xl_MD, local)
        yr_MD = yl_MD.index_select(0, local.row_of_pair_TK.view(-1))
        ys_VD = all_to_all(yr_MD, send_splits, recv_splits, self.group)
        return ys_VD if V == R else torch.cat([ys_VD, ys_VD.new_zeros(R - V, ys_VD.shape[1])])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, experts {self.first_expert}..{self.first_expert + self.num_experts - 1} "
            f"of {self.num_global_experts} on rank {self.rank}/{self.world_size}"
        )


def _moe_layers(model: nn.Module):
    from moebal.layer import MoE

    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, MoE)]


def _layer_config(name: str, moe) -> dict:
    router = moe.router
    replicated = [p for n, p in moe.named_parameters() if not n.startswith("experts.")]
    replicated += [b for b in (getattr(router, "expert_bias", None),) if b is not None]
    return {
        f"{name}.shape": (moe.d_model, moe.d_ff, moe.num_experts, moe.top_k),
        f"{name}.layer": (moe.capacity_factor, moe.drop_policy, moe.experts.activation, moe.shared is not None),
        f"{name}.router": (type(router).__name__, router.score, repr(router.balancer), router.renormalize,
                           router.scale, router.z_loss),
        f"{name}.dtype": str(moe.experts.w_in_EDH.dtype),
        f"{name}.replicated_weights": digest(replicated),
    }


def expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Shard the experts of every ``moebal.MoE`` in ``model`` over ``group``; returns ``model``.

    Each rank keeps experts ``[rank*E/W, (rank+1)*E/W)`` of every layer (sliced from the
    full, identically initialised model) and the rest of the layer — router, shared
    experts — stays replicated. ``num_experts % W`` must be 0.

    Before anything changes, one ``all_gather_object`` compares every layer's
    configuration and a checksum of its replicated weights (router, loss-free bias, shared
    experts) across the group: a rank built differently gets a ``ValueError`` naming the
    fields, on every rank, instead of a hang or silently diverging replicas.

    Routers whose ``balance_group`` is unset get ``group``: the router is replicated over
    the expert-parallel ranks, so its loss-free counts and global aux-loss counts must be
    summed over them at least (pass a larger data-parallel group with
    :func:`moebal.parallel.set_balance_group` when there is one).

    Gradients: call :func:`sync_gradients` after ``backward`` (not DDP, which would average
    the different expert shards together).
    """
    require_initialized("expert_parallel")
    layers = _moe_layers(model)
    config = {"num_moe_layers": len(layers)}
    for name, moe in layers:
        if isinstance(moe.experts, ExpertParallel):
            raise ValueError(f"MoE layer {name} is already expert-parallel")
        config.update(_layer_config(name, moe))
    check_same_config(config, group, "expert_parallel: the model")
    world = group_size(group)
    bad = [f"{name} (num_experts={moe.num_experts})" for name, moe in layers if moe.num_experts % world]
    if bad:
        raise ValueError(
            f"expert_parallel over {world} ranks needs num_experts to be a multiple of {world}; not so for: "
            + ", ".join(bad)
        )
    for _, moe in layers:
        moe.experts = ExpertParallel.from_experts(moe.experts, group)
        if getattr(moe.router, "balance_group", None) is None:
            moe.router.balance_group = group if group is not None else dist.group.WORLD
    return model


@torch.no_grad()
def sync_gradients(model: nn.Module, group=None) -> None:
    """Data-parallel gradient averaging for a model whose expert-parallel group is ``group``.

    Every rank holds different tokens and a different expert shard; the objective is the
    mean over ranks of each rank's loss. Replicated parameters (router, shared experts,
    everything else) get their gradients all-reduced and divided by W; the local expert
    weights already hold the sum over ranks (their backward gathered every rank's
    contribution), so they are only divided by W. The result equals the gradient of the
    single-process model on the concatenated batch with the per-rank losses averaged.
    Parameters without a gradient count as zero (and receive one).
    """
    require_initialized("sync_gradients")
    world = group_size(group)
    sharded = {}
    for m in model.modules():
        if isinstance(m, ExpertParallel):
            if m.world_size != world:
                raise ValueError(
                    f"sync_gradients over {world} ranks, but an ExpertParallel layer is sharded over {m.world_size}: "
                    "only the case expert-parallel group == data-parallel group is handled"
                )
            sharded.update((id(p), p) for p in m.parameters())
    replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in sharded]
    for p in replicated:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict = {}
    for p in replicated:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for params in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p.grad))
    for p in sharded.values():
        if p.grad is not None:
            p.grad.div_(world)
