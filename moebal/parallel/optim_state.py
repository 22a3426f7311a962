"""Optimizer state of an expert-parallel model for ``torch.distributed.checkpoint``.

Shape legend: E experts (global), L = E / P local experts.

``optimizer.state_dict()`` keys its state by parameter index and holds the experts'
moments (Adam's ``exp_avg``, ``exp_avg_sq``) as plain ``[L, ...]`` tensors; DCP takes a
plain tensor for a replicated one and would keep one rank's shard only. These two
functions wrap torch's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (state
keyed by parameter name, FSDP2's DTensors handled) and present every per-parameter state
tensor of an expert weight as a global ``[E, ...]`` DTensor, exactly as the weight itself
appears in ``model.state_dict()``:

    state = {"model": model.state_dict(), "optim": optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=path)
    ...                                            # any mesh, any EP size
    state = {"model": model.state_dict(), "optim": optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"]); load_optimizer_state_dict(model, optimizer, state["optim"])

A plain model in one process uses torch's two functions directly (``no_dist=True``).
"""
from __future__ import annotations

import torch
from torch import nn

from moebal.parallel.checkpoint import expert_placements, global_shape

__all__ = ["optimizer_state_dict", "load_optimizer_state_dict"]


def _expert_fqns(model: nn.Module) -> dict:
    """{parameter name: its ExpertParallel layer} for every sharded expert weight."""
    from moebal.parallel.expert_parallel import ExpertParallel

    found = {}
    for prefix, m in model.named_modules():
        if isinstance(m, ExpertParallel):
            for name in m.sharded_parameter_names():
                found[f"{prefix}.{name}" if prefix else name] = m
    return found


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``get_optimizer_state_dict(model, optimizer)`` with the experts' state as global DTensors.

    An optimizer that has not stepped yet gets its state initialised first (torch does a
    zero-learning-rate step), so the result can be the target of ``dcp.load``.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    state = get_optimizer_state_dict(model, optimizer)
    for fqn, layer in _expert_fqns(model).items():
        emesh, placements = layer.expert_mesh, expert_placements(layer.expert_mesh)
        local_shape = getattr(layer, fqn.rsplit(".", 1)[-1]).shape
        for key, value in state["state"].get(fqn, {}).items():
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == local_shape:
                shape, stride = global_shape(value, layer.num_global_experts)
                state["state"][fqn][key] = DTensor.from_local(
                    value, emesh.mesh, placements, run_check=False, shape=shape, stride=stride
                )
    return state


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``set_optimizer_state_dict`` after taking this rank's rows of the experts' state
    (a DTensor on the layer's own mesh: its local shard; any other DTensor or a full
    ``[E, ...]`` tensor: gathered or sliced)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    for fqn, layer in _expert_fqns(model).items():
        placements = expert_placements(layer.expert_mesh)
        lo, hi = layer.first_expert, layer.first_expert + layer.num_experts
        for key, value in list(state["state"].get(fqn, {}).items()):
            if isinstance(value, DTensor):
                if value.device_mesh == layer.expert_mesh.mesh and tuple(value.placements) == placements:
                    value = value.to_local()
                else:
                    value = value.full_tensor()[lo:hi]
            elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == layer.num_global_experts:
                value = value[lo:hi]
            state["state"][fqn][key] = value
    set_optimizer_state_dict(model, optimizer, state)
