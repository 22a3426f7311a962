"""Expert parallelism: the E experts of a ``moebal.MoE`` sharded over the ``ep`` ranks of a mesh.

Shape legend: T tokens, D model dim, E experts (global), L = E / W local experts, W ranks
in the expert-parallel (``ep``) group, R rows of the global plan's ``xs``, M rows received here.

The mesh is a process group or 1-D DeviceMesh (expert parallelism alone) or a 2-D
DeviceMesh ``(dp, ep)``: experts sharded over ``ep``, replicated over ``dp`` (which groups
reduce what: :mod:`moebal.parallel.mesh`; checkpoints: :mod:`moebal.parallel.checkpoint`).

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
from moebal.parallel.checkpoint import from_global_state, to_global_state
from moebal.parallel.collectives import GroupHandle, all_to_all, check_same_config, digest, require_initialized
from moebal.parallel.mesh import ExpertMesh, resolve_expert_mesh

__all__ = ["ExpertParallel", "expert_parallel", "sync_gradients", "expert_parameters"]


def _state_dict_post_hook(module, state_dict, prefix, local_metadata):
    to_global_state(module, state_dict, prefix)


def _load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    from_global_state(module, state_dict, prefix)


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
        emesh = group if isinstance(group, ExpertMesh) else resolve_expert_mesh(group)
        world = emesh.ep_size
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if num_experts % world:
            raise ValueError(
                f"num_experts={num_experts} cannot be sharded over an expert-parallel group of {world} ranks: "
                f"it must be a multiple of the group size"
            )
        super().__init__(d_model, d_ff, num_experts // world, activation, **({"bias": True} if bias else {}))
        self._group = GroupHandle(emesh)
        self.world_size, self.rank = world, emesh.ep_rank
        self.num_global_experts = num_experts
        self.first_expert = self.rank * self.num_experts
        # state_dict() shows the experts as global DTensors (Shard(0) over ep), which
        # torch.distributed.checkpoint reshards; load_state_dict takes them back
        self.register_state_dict_post_hook(_state_dict_post_hook)
        self.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)

    @classmethod
    def from_experts(cls, experts: GroupedExperts, group=None) -> "ExpertParallel":
        """This rank's shard of ``experts`` (its experts ``[rank*L, (rank+1)*L)``), weights copied.

        ``group``: a process group, a DeviceMesh (1-D, or 2-D with ``dp``/``ep`` dims) or an
        :class:`~moebal.parallel.mesh.ExpertMesh`; None = the default group."""
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
    def expert_mesh(self) -> ExpertMesh:
        """The mesh and groups this layer's experts are sharded and reduced over."""
        return self._group.group

    def sharded_parameter_names(self) -> list[str]:
        """Names of the ``[L, ...]`` expert tensors (global ``[E, ...]`` in ``state_dict``)."""
        return [name for name, _ in self.named_parameters(recurse=False)]

    @property
    def group(self):
        """The expert-parallel process group (the ``ep`` dim's group of the mesh)."""
        return self._group.group.ep_group

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


def expert_parallel(model: nn.Module, mesh_or_group=None, *, ep_dim: str = "ep", dp_dim: str = "dp") -> nn.Module:
    """Shard the experts of every ``moebal.MoE`` in ``model`` over an expert-parallel group; returns ``model``.

    ``mesh_or_group``: a process group (expert parallelism alone, as before), a 1-D
    ``DeviceMesh`` (the same), a 2-D ``DeviceMesh`` with dims named ``dp_dim`` and ``ep_dim``
    (experts sharded over ``ep``, replicated over ``dp``), or None (the default group).

    Each rank keeps experts ``[p*E/P, (p+1)*E/P)`` of every layer, p its coordinate on the
    ``ep`` dim (sliced from the full, identically initialised model); the rest of the
    layer — router, shared experts — stays replicated on every rank. ``num_experts % P``
    must be 0.

    Before anything changes, one ``all_gather_object`` over all ranks of the mesh compares
    the mesh (its rank layout, dim names, which dim is ``ep``), every layer's configuration
    and a checksum of its replicated weights (router, loss-free bias, shared experts): a
    rank built differently gets a ``ValueError`` naming the fields, on every rank, instead
    of a hang or silently diverging replicas.

    Routers whose ``balance_group`` is unset get the group of all ranks of the mesh: the
    router is replicated everywhere, so its loss-free counts and global aux-loss counts are
    summed over every rank (bit-identical biases everywhere).

    Gradients: call :func:`sync_gradients` after ``backward`` (not DDP, which would average
    the different expert shards together); FSDP2's ``fully_shard`` may manage the non-expert
    parameters instead (see :func:`sync_gradients`). ``model.state_dict()`` holds the expert
    weights as global DTensors, so ``torch.distributed.checkpoint`` reshards them (see
    :mod:`moebal.parallel.checkpoint`).
    """
    require_initialized("expert_parallel")
    emesh = resolve_expert_mesh(mesh_or_group, ep_dim=ep_dim, dp_dim=dp_dim)
    layers = _moe_layers(model)
    config = {"num_moe_layers": len(layers), **emesh.describe()}
    for name, moe in layers:
        if isinstance(moe.experts, ExpertParallel):
            raise ValueError(f"MoE layer {name} is already expert-parallel")
        config.update(_layer_config(name, moe))
    check_same_config(config, emesh.world_group, "expert_parallel: the model")
    world = emesh.ep_size
    bad = [f"{name} (num_experts={moe.num_experts})" for name, moe in layers if moe.num_experts % world]
    if bad:
        raise ValueError(
            f"expert_parallel over {world} ranks needs num_experts to be a multiple of {world}; not so for: "
            + ", ".join(bad)
        )
    for _, moe in layers:
        moe.experts = ExpertParallel.from_experts(moe.experts, emesh)
        if getattr(moe.router, "balance_group", None) is None:
            moe.router.balance_group = emesh.world_group
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters of ``model`` (pass them as FSDP2's ``ignored_params``)."""
    return [p for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()]


def _model_mesh(model: nn.Module, mesh_or_group) -> ExpertMesh | None:
    """The one ExpertMesh of the model's expert-parallel layers (None when it has none)."""
    meshes = {id(m.expert_mesh): m.expert_mesh for m in model.modules() if isinstance(m, ExpertParallel)}
    if len({repr(e.describe()) for e in meshes.values()}) > 1:
        raise ValueError("sync_gradients: the model's expert-parallel layers are sharded over different meshes")
    emesh = next(iter(meshes.values()), None)
    if emesh is None or mesh_or_group is None or mesh_or_group is emesh.mesh:
        return emesh
    from moebal.parallel.mesh import _is_mesh

    size = mesh_or_group.size() if _is_mesh(mesh_or_group) else dist.get_world_size(mesh_or_group)
    if size != emesh.world_size:
        raise ValueError(
            f"sync_gradients over {size} ranks, but the model's experts are sharded over {emesh.ep_size} ranks "
            f"and replicated over {emesh.dp_size} (a mesh of {emesh.world_size}): pass the mesh the model was "
            "sharded with (or nothing)"
        )
    return emesh


def _all_reduce_mean(params: list, group, world: int, reduce: bool = True) -> None:
    """``p.grad <- (sum over group of p.grad) / world`` for every p, one all-reduce per dtype."""
    by_dtype: dict = {}
    for p in params:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        if reduce:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        for p, g in zip(ps, flat.split([p.numel() for p in ps])):
            p.grad.copy_(g.view_as(p.grad))


@torch.no_grad()
def sync_gradients(model: nn.Module, mesh_or_group=None) -> None:
    """Data-parallel gradient averaging for an expert-parallel model (call after ``backward``).

    Every one of the W = P·Q ranks holds different tokens; the objective is the mean over
    ranks of each rank's loss. Replicated parameters (router, shared experts, everything
    else) get their gradients all-reduced over all W ranks and divided by W. The local
    expert weights already hold the sum over their ``ep`` group (their backward gathered
    every ``ep`` rank's contribution), so they are all-reduced over the ``dp`` group only
    and divided by W. The result equals the gradient of the single-process model on the
    concatenated batch with the per-rank losses averaged.

    The groups come from the model's expert-parallel layers; ``mesh_or_group`` (optional,
    for models without such layers: the data-parallel group, None = world) must span the
    same ranks. Parameters that are DTensors (managed by FSDP2's ``fully_shard``, whose
    reduce-scatter already averaged them — shard them over all W ranks,
    :func:`moebal.parallel.fsdp_mesh`) are left alone. Parameters without a gradient
    count as zero (and receive one).
    """
    require_initialized("sync_gradients")
    from torch.distributed.tensor import DTensor

    emesh = _model_mesh(model, mesh_or_group)
    if emesh is None:
        world_group = mesh_or_group.get_group() if hasattr(mesh_or_group, "get_group") else mesh_or_group
        world = dist.get_world_size(world_group)
    else:
        world_group, world = emesh.world_group, emesh.world_size
    sharded = {id(p): p for p in expert_parameters(model)}
    replicated = [
        p for p in model.parameters() if p.requires_grad and id(p) not in sharded and not isinstance(p, DTensor)
    ]
    for p in replicated:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _all_reduce_mean(replicated, world_group, world)
    experts = [p for p in sharded.values() if p.grad is not None]
    if emesh is not None and experts:
        _all_reduce_mean(experts, emesh.dp_group, world, reduce=emesh.dp_group is not None)
