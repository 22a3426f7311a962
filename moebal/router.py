"""Router: a linear gate plus a pluggable balancing policy.

Shape legend: T tokens, D model dim, E experts, K top-k.

Policies:
- ``AuxLoss``: Switch/GShard balance loss (per batch, per sequence, or over the global
  batch: counts summed over the data-parallel group and the micro-batches of a step).
- ``LossFree``: DeepSeek's loss-free balancing; an fp32 ``expert_bias`` steers selection
  only and moves by ``rate * sign(mean load - load)`` after each training step (``"auto"``)
  or when ``moebal.update_biases(model)`` is called (``"manual"``).
- ``LinearAssignment``: BASE layers; in training every expert gets exactly T*K/E tokens
  (maximal total score); at eval, greedy top-k.

Data parallelism: ``Router.balance_group`` (None = this process only) is the process group
whose ranks' counts are summed (int64, exact) before a loss-free update and into the
global-batch aux loss, so every rank sees the same statistics and holds a bit-identical
bias. Set it with ``Router(..., balance_group=...)`` or ``moebal.parallel.set_balance_group``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moebal import routing as R

__all__ = ["Router", "Routing", "AuxLoss", "LossFree", "LinearAssignment", "update_biases", "make_router"]


@dataclass(frozen=True)
class AuxLoss:
    """Switch/GShard auxiliary loss ``alpha * E * sum_i f_i P_i``.

    ``variant``: ``"batch"`` (f, P over this forward's tokens), ``"sequence"`` (per
    sequence, averaged) or ``"global_batch"`` (Qiu et al. 2025, "Demons in the Detail"):
    f is the fraction of routed pairs per expert summed over the router's
    ``balance_group`` and, inside a ``moebal.parallel.GlobalBatchBalance`` window, over
    the micro-batches seen so far in the step; P stays local (this rank's tokens), so
    under data-parallel gradient averaging the gradient has the scale of the concatenated
    batch's loss, whatever the world size.
    """

    alpha: float = 1e-2
    variant: str = "batch"

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise ValueError(f"AuxLoss alpha must be a non-negative number, got {self.alpha!r}")
        if self.variant not in ("batch", "sequence", "global_batch"):
            raise ValueError(f"AuxLoss variant must be 'batch', 'sequence' or 'global_batch', got {self.variant!r}")


@dataclass(frozen=True)
class LossFree:
    """Bias-based loss-free balancing with update rate ``rate``; ``update`` "auto" or "manual"."""

    rate: float = 1e-3
    update: str = "auto"

    def __post_init__(self):
        if not isinstance(self.rate, (int, float)) or self.rate < 0:
            raise ValueError(f"LossFree rate must be a non-negative number, got {self.rate!r}")
        if self.update not in ("auto", "manual"):
            raise ValueError(f"LossFree update must be 'auto' or 'manual', got {self.update!r}")


@dataclass(frozen=True)
class LinearAssignment:
    """BASE layers' balanced assignment; ``solver`` "exact", "sinkhorn" or "quantile"."""

    solver: str = "exact"

    def __post_init__(self):
        if self.solver not in ("exact", "sinkhorn", "quantile"):
            raise ValueError(f"LinearAssignment solver must be 'exact', 'sinkhorn' or 'quantile', got {self.solver!r}")


@dataclass
class Routing:
    """What a router decided for T tokens."""

    indices: torch.Tensor  # int64 [T, K]
    weights: torch.Tensor  # fp32 [T, K], combine weights (unbiased scores, scaled)
    scores: torch.Tensor  # fp32 [T, E], softmax/sigmoid scores
    aux_loss: torch.Tensor  # fp32 scalar, already multiplied by its coefficients; 0 if none
    nonfinite_tokens: torch.Tensor  # int64 scalar, tokens whose logits were not all finite


class Router(nn.Module):
    """Linear gate ``logits = x W^T`` with top-k selection and a balancing policy.

    Args:
        d_model, num_experts, top_k: sizes; ``1 <= top_k <= num_experts``.
        score: ``"softmax"`` or ``"sigmoid"``.
        balancer: ``AuxLoss(...)``, ``LossFree(...)``, ``LinearAssignment(...)`` or None.
        z_loss: coefficient of the router z-loss (0 = off).
        renormalize: renormalise the top-k weights to sum 1. Default (None): True when
            top_k > 1; False for top_k == 1, where renormalising would make every weight 1
            and cut the router off from the task gradient.
        scale: multiplier applied to the final weights (DeepSeek's routed scaling factor).
        balance_group: process group over which balancing counts are summed (see the
            module docstring); None keeps them local.

    Non-finite logits: the token is still routed to K valid experts (NaN ranks lowest), its
    weights are NaN so the loss shows it, and ``Routing.nonfinite_tokens`` counts it.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        score: str = "softmax",
        balancer: AuxLoss | LossFree | LinearAssignment | None = None,
        z_loss: float = 0.0,
        renormalize: bool | None = None,
        scale: float = 1.0,
        balance_group=None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("num_experts", num_experts), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        if balancer is not None and not isinstance(balancer, (AuxLoss, LossFree, LinearAssignment)):
            raise TypeError(f"balancer must be AuxLoss, LossFree, LinearAssignment or None, got {balancer!r}")
        if not isinstance(z_loss, (int, float)) or z_loss < 0:
            raise ValueError(f"z_loss must be a non-negative number, got {z_loss!r}")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.score, self.balancer, self.z_loss, self.scale = score, balancer, float(z_loss), float(scale)
        self.renormalize = (top_k > 1) if renormalize is None else bool(renormalize)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        if isinstance(balancer, LossFree):
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("load_counts", torch.zeros(num_experts, dtype=torch.int64))
        else:
            self.expert_bias = None
        self.balance_group = balance_group
        if isinstance(balancer, AuxLoss) and balancer.variant == "global_batch":
            # the step's window: summed counts [E] + routed pairs, and local detached
            # sums of P and tokens for the exact step value (GlobalBatchBalance)
            self.register_buffer("window_counts", torch.zeros(num_experts + 1, dtype=torch.int64), persistent=False)
            self.register_buffer("window_probs", torch.zeros(num_experts + 1, dtype=torch.float64), persistent=False)
            self.window_open = False

    @property
    def balance_group(self):
        """Process group whose counts are summed for balancing (None = local only)."""
        return self._balance_group.group

    @balance_group.setter
    def balance_group(self, group) -> None:
        self._balance_group = _GroupRef(group)

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> Routing:
        """Route ``x [T, D]``; ``seq_len`` (rows per sequence) is needed by the sequence aux loss."""
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [T, {self.d_model}], got {tuple(x_TD.shape)}")
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = nn.functional.linear(x_TD.float(), self.gate.weight.float())
        E, K = self.num_experts, self.top_k
        nonfinite = (~torch.isfinite(logits_TE).all(dim=-1)).sum()
        bal = self.balancer
        scores_TE = R.scores_from_logits(logits_TE, self.score)
        if isinstance(bal, LinearAssignment) and self.training:
            with torch.no_grad():
                indices_TK = _assign(scores_TE.detach(), K, bal.solver)
            weights_TK = scores_TE.gather(1, indices_TK)
            if self.renormalize:
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        else:
            bias = self.expert_bias if isinstance(bal, LossFree) else None
            # topk_routing scores the logits again (~30 us at T=1024, E=16): reusing scores_TE would
            # merge the weights' and the aux loss's softmax backward into one, changing training
            # at the last bit, and with it every recorded `moebal compare` result
            weights_TK, indices_TK = R.topk_routing(logits_TE, K, self.score, bias=bias, renormalize=self.renormalize)
        if self.scale != 1.0:
            weights_TK = weights_TK * self.scale

        aux = logits_TE.new_zeros(())
        if isinstance(bal, AuxLoss) and bal.alpha > 0 and self.training:
            probs_TE = scores_TE if self.score == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            if bal.variant == "sequence":
                if seq_len is None:
                    raise ValueError("AuxLoss(variant='sequence') needs seq_len (pass x as [B, S, D] to MoE)")
                aux = aux + bal.alpha * R.sequence_aux_loss(probs_TE, indices_TK, E, seq_len)
            elif bal.variant == "global_batch":
                aux = aux + bal.alpha * self._global_aux_loss(probs_TE, indices_TK)
            else:
                aux = aux + bal.alpha * R.switch_aux_loss(probs_TE, indices_TK, E)
        if self.z_loss > 0 and self.training:
            aux = aux + self.z_loss * R.router_z_loss(logits_TE)

        if isinstance(bal, LossFree) and self.training and torch.is_grad_enabled():
            with torch.no_grad():
                flat = indices_TK.reshape(-1)
                self.load_counts.scatter_add_(0, flat, torch.ones_like(flat))
                if bal.update == "auto":
                    _all_reduce_sum(self.load_counts, self.balance_group)
                    self.apply_bias_update()
        return Routing(indices_TK, weights_TK, scores_TE, aux, nonfinite)

    def _global_aux_loss(self, probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
        """``E * sum_i f_i P_i``: f from the window's summed counts, P from these tokens."""
        E = self.num_experts
        with torch.no_grad():
            flat = indices_TK.reshape(-1)
            counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
            counts[E] = flat.numel()
            _all_reduce_sum(counts, self.balance_group)
            if not self.window_open:  # outside a GlobalBatchBalance window every forward is its own step
                self.window_counts.zero_()
                self.window_probs.zero_()
            self.window_counts += counts
            self.window_probs[:E] += probs_TE.detach().sum(0).double()
            self.window_probs[E] += probs_TE.shape[0]
            f_E = self.window_counts[:E].float() / self.window_counts[E].clamp(min=1).float()
        return E * torch.dot(f_E, probs_TE.float().mean(dim=0))

    @torch.no_grad()
    def apply_bias_update(self, load_E: torch.Tensor | None = None) -> None:
        """Move the bias by the accumulated (or given) load and reset the counters."""
        if not isinstance(self.balancer, LossFree):
            raise RuntimeError("apply_bias_update needs a LossFree balancer")
        load_E = self.load_counts if load_E is None else load_E
        self.expert_bias.copy_(R.loss_free_update(self.expert_bias, load_E, self.balancer.rate))
        self.load_counts.zero_()

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}, "
            f"balancer={self.balancer}, z_loss={self.z_loss}, renormalize={self.renormalize}"
        )


class _GroupRef:
    """Holds a process group; deep copies of the router share it (groups cannot be copied)."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


def _all_reduce_sum(t: torch.Tensor, group) -> None:
    """Sum ``t`` over ``group`` in place; a no-op for ``group=None`` or without torch.distributed."""
    dist = torch.distributed
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _assign(scores_TE: torch.Tensor, top_k: int, solver: str) -> torch.Tensor:
    from moebal import assignment

    return assignment.assign(scores_TE, top_k, solver=solver)


def make_router(spec, d_model: int, num_experts: int, top_k: int) -> Router:
    """Build a router from ``"aux_loss"``, ``"loss_free"``, ``"base"`` or pass a Router through."""
    if isinstance(spec, Router):
        if (spec.d_model, spec.num_experts, spec.top_k) != (d_model, num_experts, top_k):
            raise ValueError(
                f"router was built for (d_model, num_experts, top_k)={(spec.d_model, spec.num_experts, spec.top_k)}, "
                f"the layer has {(d_model, num_experts, top_k)}"
            )
        return spec
    if spec == "aux_loss":
        return Router(d_model, num_experts, top_k, score="softmax", balancer=AuxLoss())
    if spec == "loss_free":
        return Router(d_model, num_experts, top_k, score="sigmoid", balancer=LossFree())
    if spec == "base":
        return Router(d_model, num_experts, top_k, score="softmax", balancer=LinearAssignment())
    raise ValueError(f"router must be 'aux_loss', 'loss_free', 'base' or a moebal.Router, got {spec!r}")


@torch.no_grad()
def update_biases(model: nn.Module, group=None) -> int:
    """Apply the pending loss-free bias updates of every router in ``model``.

    Call after ``optimizer.step()`` with ``LossFree(update="manual")``. When
    ``torch.distributed`` is initialised, the int64 load counts are all-reduced over
    ``group`` first (summed exactly), so every rank computes a bit-identical bias;
    ``group=None`` means each router's ``balance_group`` when set, else the default group.
    Returns the number of routers updated.
    """
    routers = [m for m in model.modules() if isinstance(m, Router) and isinstance(m.balancer, LossFree)]
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    for router in routers:
        if distributed:
            reduce_over = group if group is not None else router.balance_group
            dist.all_reduce(router.load_counts, op=dist.ReduceOp.SUM, group=reduce_over)
        router.apply_bias_update()
    return len(routers)
