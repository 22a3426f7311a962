"""Training glue: collect the MoE layers' losses and balance, and move loss-free biases.

- :func:`aux_loss`: the sum of every MoE layer's own ``.aux_loss`` from the last forward.
  Each layer's balancing loss is computed from its own router (its own f_i and P_i), as
  in Switch/GShard; it is never one loss over router logits concatenated across layers.
- :func:`balance_report`: per-layer statistics as a flat dict of Python floats
  (``moe/layer3/max_violation``), ready for ``SummaryWriter.add_scalars``/``wandb.log``.
- :func:`register_bias_update_hook`: applies ``moebal.update_biases(model)`` after every
  ``optimizer.step()`` for routers built with ``LossFree(update="manual")``
  (``swap_ffn(..., router="loss_free", router_kwargs={"update": "manual"})``); at most one
  per model and optimizer. ``moebal.hf.MoETrainer`` registers it on the Trainer's optimizer.

Why a *post*-step hook: DESIGN fixes the order "update biases after optimizer.step()".
Both hook kinds run between the backward that counted the loads and the next forward,
so in a plain loop they move the bias identically; the post-hook is the one that is
also right at the edges: if ``step()`` raises, the bias has not moved for a step that
did not happen, and the update sees exactly the loads of the micro-batches that step
consumed (with gradient accumulation, one bias update per optimizer step, not per
micro-batch). A step skipped by ``GradScaler`` (inf/NaN gradients) calls neither hook;
its loads stay in the counters and count toward the next step's update.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from moebal.layer import MoE
from moebal.router import LossFree, Router, update_biases

__all__ = ["aux_loss", "balance_report", "register_bias_update_hook", "bias_update_hook_registered", "moe_layers"]


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(qualified name, layer)`` of every ``moebal.MoE`` in ``model`` (the model itself included)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the ``.aux_loss`` of every MoE layer from its last forward (0 in eval mode).

    Add it to the task loss: ``loss = lm_loss + moebal.aux_loss(model)``. The layers'
    coefficients (``AuxLoss(alpha)``, ``z_loss``) are already applied.
    Raises ValueError when ``model`` has no MoE layer.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no moebal.MoE layer")
    total = layers[0][1].aux_loss
    for _, layer in layers[1:]:
        total = total + layer.aux_loss.to(total.device)
    return total


_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_index(path: str) -> int | None:
    """The last integer component of a module path (``model.layers.3.mlp`` -> 3)."""
    hits = _LAYER_RE.findall(path)
    return int(hits[-1]) if hits else None


def _layer_keys(names: list[str]) -> list[str]:
    """``layer3`` from ``model.layers.3.mlp``; the full path where indices would collide."""
    idx = [layer_index(n) for n in names]
    if None not in idx and len(set(idx)) == len(idx):
        return [f"layer{i}" for i in idx]
    return [n.replace(".", "/") if n else "root" for n in names]


_STATS = ("max_violation", "cv", "entropy", "dropped_fraction", "nonfinite_tokens")


def balance_report(model: nn.Module, prefix: str = "moe") -> dict[str, float]:
    """Balance of every MoE layer's last forward as ``{f"{prefix}/layer{i}/{stat}": float}``.

    Stats per layer: ``max_violation`` (MaxVio), ``cv``, ``entropy`` (normalised load
    entropy), ``dropped_fraction``, ``nonfinite_tokens``, ``aux_loss``; plus
    ``{prefix}/max_violation_max`` and ``{prefix}/max_violation_mean`` over layers. The
    values are gathered on the device and read back with one host sync. Layers that have
    not run a forward yet are left out; ValueError when no layer has.
    """
    layers = [(n, m) for n, m in moe_layers(model) if m.last_stats is not None]
    if not layers:
        raise ValueError(f"no moebal.MoE layer of {type(model).__name__} has run a forward yet")
    rows = []
    for _, m in layers:
        s = m.last_stats
        vals = (s.max_violation, s.cv, s.entropy, s.dropped_fraction, s.nonfinite_tokens, m.aux_loss.detach())
        rows.append(torch.stack([v.to(device=s.load.device, dtype=torch.float64) for v in vals]))
    table = torch.stack(rows).tolist()  # the one host sync
    out: dict[str, float] = {}
    for key, values in zip(_layer_keys([n for n, _ in layers]), table):
        for stat, value in zip(_STATS + ("aux_loss",), values):
            out[f"{prefix}/{key}/{stat}"] = float(value)
    maxvio = [row[0] for row in table]
    out[f"{prefix}/max_violation_max"] = float(max(maxvio))
    out[f"{prefix}/max_violation_mean"] = float(sum(maxvio) / len(maxvio))
    return out


def register_bias_update_hook(optimizer: torch.optim.Optimizer, model: nn.Module, group=None):
    """Run ``moebal.update_biases(model, group)`` after every ``optimizer.step()``.

    For routers built with ``LossFree(update="manual")`` (``swap_ffn(..., router="loss_free",
    router_kwargs={"update": "manual"})``, ``make_router("loss_free", ..., update="manual")``).
    Returns the hook handle (``handle.remove()`` detaches it). Raises ValueError when
    ``model`` has no such router, when some of its loss-free routers have ``update="auto"``
    (they already move their bias in every training forward; a hook on top would hide that
    the policy is configured twice), or when a hook for ``model`` is already registered on
    ``optimizer`` (the biases would move twice per step).
    """
    routers = [m for m in model.modules() if isinstance(m, Router) and m.policy(LossFree) is not None]
    auto = [r for r in routers if r.policy(LossFree).update == "auto"]
    name = type(model).__name__
    if not routers:
        raise ValueError(
            f"register_bias_update_hook needs LossFree(update='manual') routers; {name} has 0 loss-free routers"
        )
    if auto:
        raise ValueError(
            f"register_bias_update_hook needs LossFree(update='manual') routers; {name} has {len(routers)} "
            f"loss-free routers, {len(auto)} of them with update='auto', which move their bias in every training "
            "forward and need no hook. For updates once per optimizer step build them in manual mode: "
            "swap_ffn(model, E, K, router='loss_free', router_kwargs={'update': 'manual'}), "
            "make_router('loss_free', d, E, K, update='manual') or Router(..., balancer=LossFree(update='manual'))"
        )
    if bias_update_hook_registered(optimizer, model):
        raise ValueError(f"a bias update hook for this {name} is already registered on this optimizer")

    def _hook(opt, args, kwargs):
        update_biases(model, group)

    _hook.moebal_model = model  # lets a second registration for the same model be refused
    return optimizer.register_step_post_hook(_hook)


def bias_update_hook_registered(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    """Whether :func:`register_bias_update_hook` has a live hook for ``model`` on ``optimizer``."""
    hooks = getattr(optimizer, "_optimizer_step_post_hooks", {})
    return any(getattr(h, "moebal_model", None) is model for h in hooks.values())
