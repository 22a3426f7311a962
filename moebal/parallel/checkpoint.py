"""Checkpoints of expert-parallel layers: the expert weights as DTensors in ``state_dict()``.

Shape legend: E experts (global), L = E / P local experts, P ranks of the ``ep`` dim.

``ExpertParallel`` keeps its L experts as plain local parameters (the forward and the
gradient reduction stay plain tensor code). Its ``state_dict()`` presents each of them as
a ``DTensor`` of the *global* shape ``[E, ...]`` on the layer's mesh, ``Shard(0)`` over
``ep`` and ``Replicate()`` over ``dp``, sharing the parameter's storage. That is all
``torch.distributed.checkpoint`` needs to reshard:

- ``dcp.save(model.state_dict(), ...)`` writes each expert row once (the ``dp`` replicas
  are deduplicated by DCP's default planner), replicated tensors once;
- ``dcp.load(sd, ...)`` into the ``state_dict()`` of a model sharded any other way (another
  ``ep`` size, another mesh) or of the plain single-process model (``no_dist=True``) reads
  the rows each rank owns; ``model.load_state_dict(sd)`` then takes them.

``load_state_dict`` accepts for an expert weight: a DTensor on the layer's own mesh and
placements (its local shard is taken), any other DTensor (gathered, then sliced), the full
``[E, ...]`` tensor of an unsharded model (sliced), or the local ``[L, ...]`` shard (what
``state_dict()`` returned before it held DTensors).
"""
from __future__ import annotations

import torch

__all__ = ["expert_placements", "global_shape", "to_global_state", "from_global_state"]


def expert_placements(emesh) -> tuple:
    """``Shard(0)`` on the ``ep`` dim, ``Replicate()`` on the ``dp`` dim, in mesh dim order."""
    from torch.distributed.tensor import Replicate, Shard

    placements = [Replicate()] * emesh.mesh.ndim
    placements[emesh.ep_dim] = Shard(0)
    return tuple(placements)


def global_shape(local: torch.Tensor, num_global: int) -> tuple[torch.Size, tuple[int, ...]]:
    shape = torch.Size((num_global,) + tuple(local.shape[1:]))
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return shape, tuple(reversed(stride))


def to_global_state(layer, state_dict: dict, prefix: str) -> None:
    """Replace the layer's local expert tensors in ``state_dict`` by global DTensors (no copy)."""
    from torch.distributed.tensor import DTensor

    emesh, placements = layer.expert_mesh, expert_placements(layer.expert_mesh)
    for name in layer.sharded_parameter_names():
        key = prefix + name
        local = state_dict.get(key)
        if local is None or isinstance(local, DTensor):
            continue
        shape, stride = global_shape(local, layer.num_global_experts)
        state_dict[key] = DTensor.from_local(
            local, emesh.mesh, placements, run_check=False, shape=shape, stride=stride
        )


def from_global_state(layer, state_dict: dict, prefix: str) -> None:
    """Replace global expert tensors (DTensor or full) in ``state_dict`` by this rank's rows."""
    from torch.distributed.tensor import DTensor

    emesh, placements = layer.expert_mesh, expert_placements(layer.expert_mesh)
    E, L = layer.num_global_experts, layer.num_experts
    lo, hi = layer.first_expert, layer.first_expert + L
    for name in layer.sharded_parameter_names():
        key = prefix + name
        value = state_dict.get(key)
        if value is None:
            continue
        if isinstance(value, DTensor):
            if value.device_mesh == emesh.mesh and tuple(value.placements) == placements:
                state_dict[key] = value.to_local()
                continue
            value = value.full_tensor()
        if value.dim() == 0 or value.shape[0] not in (E, L):
            raise ValueError(
                f"{key}: expected the global [{E}, ...] or this rank's [{L}, ...] expert tensor, "
                f"got shape {tuple(value.shape)}"
            )
        state_dict[key] = value[lo:hi] if value.shape[0] == E else value
