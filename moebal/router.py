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

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from moebal import routing as R
from moebal.recompute import Selection, SelectionLog, fingerprint, in_backward, saving_under_hooks

__all__ = ["Router", "Routing", "AuxLoss", "LossFree", "LinearAssignment", "update_biases", "make_router"]


def _check_coefficient(name: str, value) -> None:
    """A finite number >= 0 (NaN and inf would poison every step silently)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


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
        _check_coefficient("AuxLoss alpha", self.alpha)
        if self.variant not in ("batch", "sequence", "global_batch"):
            raise ValueError(f"AuxLoss variant must be 'batch', 'sequence' or 'global_batch', got {self.variant!r}")


@dataclass(frozen=True)
class LossFree:
    """Bias-based loss-free balancing with update rate ``rate``; ``update`` "auto" or "manual"."""

    rate: float = 1e-3
    update: str = "auto"

    def __post_init__(self):
        _check_coefficient("LossFree rate", self.rate)
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
    replayed: bool = False  # an activation checkpoint's recompute that replayed the first pass's selection


class Router(nn.Module):
    """Linear gate ``logits = x W^T`` with top-k selection and a balancing policy.

    Args:
        d_model, num_experts, top_k: sizes; ``1 <= top_k <= num_experts``.
        score: ``"softmax"`` or ``"sigmoid"``.
        balancer: ``AuxLoss(...)``, ``LossFree(...)``, ``LinearAssignment(...)`` or None.
        z_loss: coefficient of the router z-loss (0 = off).
        renormalize: renormalise the top-k weights to sum 1. Default (None): True when
            top_k > 1; False for top_k == 1, where renormalising would make every weight 1
            and cut the router off from the task gradient (setting it True then warns).
        scale: multiplier applied to the final weights (DeepSeek's routed scaling factor).
        balance_group: process group over which balancing counts are summed (see the
            module docstring); None keeps them local.
        num_groups, top_groups: group-limited routing (DeepSeek-V3's ``n_group`` /
            ``topk_group``, see ``topk_routing``); not with ``LinearAssignment``.
        device, dtype: factory kwargs for the gate weight, as ``nn.Linear`` takes them.

    Non-finite logits: the token is still routed to K valid experts (NaN ranks lowest), its
    weights are NaN so the loss shows it, and ``Routing.nonfinite_tokens`` counts it; it
    is never counted in a balancing statistic, so it cannot move a bias.

    Balancing state follows BatchNorm's manners: the loss-free ``expert_bias`` stays fp32
    under ``.to(dtype)``/``.half()``/``.bfloat16()``/``.double()`` and the counters stay
    int64. The counters (``load_counts``, the global-batch window) are each rank's own:
    they are saved in ``state_dict`` but are not module buffers, so DDP's buffer broadcast
    (``broadcast_buffers=True``) never overwrites one rank's pending counts with another's.

    State moves only in a training forward with grad enabled (a ``torch.no_grad()``
    forward in training mode routes but is not a training step), once per forward even
    under activation checkpointing: see :mod:`moebal.recompute`.
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
        num_groups: int = 1,
        top_groups: int | None = None,
        device=None,
        dtype=None,
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
        _check_coefficient("z_loss", z_loss)
        R._check_groups(num_experts, top_k, num_groups, top_groups)
        if isinstance(balancer, LinearAssignment) and top_groups is not None and top_groups < num_groups:
            raise ValueError("group-limited routing (top_groups < num_groups) does not apply to LinearAssignment")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.score, self.balancer, self.z_loss, self.scale = score, balancer, float(z_loss), float(scale)
        self.renormalize = (top_k > 1) if renormalize is None else bool(renormalize)
        self.num_groups, self.top_groups = num_groups, top_groups
        self.gate = nn.Linear(d_model, num_experts, bias=False, device=device, dtype=dtype)
        counter = dict(dtype=torch.int64, device=device)
        if isinstance(balancer, LossFree):
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
            self._local = {"load_counts": torch.zeros(num_experts, **counter)}
        else:
            self.expert_bias = None
            self._local = {}
        self.balance_group = balance_group
        if isinstance(balancer, AuxLoss) and balancer.variant == "global_batch":
            # the step's window: summed counts [E] + routed pairs, and local detached
            # sums of P and tokens for the exact step value (GlobalBatchBalance)
            self._local["window_counts"] = torch.zeros(num_experts + 1, **counter)
            self._local["window_probs"] = torch.zeros(num_experts + 1, dtype=torch.float64, device=device)
            self.window_open = False
        self._selections = SelectionLog()

    # --- state: counters that are each rank's own, a bias that keeps fp32 ----------------

    load_counts = property(lambda self: self._local["load_counts"], doc="int64 [E] pairs counted since the last bias update")
    window_counts = property(lambda self: self._local["window_counts"])
    window_probs = property(lambda self: self._local["window_probs"])
    _PERSISTENT_LOCAL = ("load_counts",)  # saved in state_dict under the same key as when it was a buffer

    def _apply(self, fn, recurse=True):
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:  # a dtype cast: keep fp32, move only
            self._buffers["expert_bias"] = bias.to(device=self.expert_bias.device)
        for name, t in self._local.items():
            moved = fn(t)
            self._local[name] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._PERSISTENT_LOCAL:
            if name in self._local:
                destination[prefix + name] = self._local[name]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name in self._PERSISTENT_LOCAL:
            key = prefix + name
            if name not in self._local:
                continue
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if value.shape != self._local[name].shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {tuple(self._local[name].shape)}.")
                continue
            with torch.no_grad():
                self._local[name].copy_(value)

    @property
    def renormalize(self) -> bool:
        return self._renormalize

    @renormalize.setter
    def renormalize(self, value: bool) -> None:
        if value and self.top_k == 1:
            warnings.warn(
                "Router(top_k=1, renormalize=True): every renormalised weight is exactly 1, so the router gets no "
                "gradient from the task loss (only from a balancing loss; with LossFree or LinearAssignment it "
                "is not trained at all). Use renormalize=False or top_k >= 2.",
                UserWarning,
                stacklevel=3,
            )
        self._renormalize = bool(value)

    @property
    def balance_group(self):
        """Process group whose counts are summed for balancing (None = local only)."""
        return self._balance_group.group

    @balance_group.setter
    def balance_group(self, group) -> None:
        self._balance_group = _GroupRef(group)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh gate (``nn.Linear``'s init), a zero bias and zero counters."""
        self.gate.reset_parameters()
        if self.expert_bias is not None:
            self.expert_bias.zero_()
        for t in self._local.values():
            t.zero_()

    # --- forward ----------------------------------------------------------------------------

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> Routing:
        """Route ``x [T, D]``; ``seq_len`` (rows per sequence) is needed by the sequence aux loss."""
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [T, {self.d_model}], got {tuple(x_TD.shape)}")
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = nn.functional.linear(x_TD.float(), self.gate.weight.float())
        E, K = self.num_experts, self.top_k
        finite_T = torch.isfinite(logits_TE).all(dim=-1)
        nonfinite = (~finite_T).sum()
        bal = self.balancer
        eager_training = self.training and not torch.compiler.is_compiling()
        replay = None
        if eager_training and in_backward():  # a checkpoint's recompute: replay the first pass
            replay = self._selections.find(logits_TE)
            if replay is None and saving_under_hooks():
                raise RuntimeError(
                    "moebal.Router: a non-reentrant checkpoint recomputed this router, but its first pass left no "
                    "selection to replay (was the first pass run in eval mode or under no_grad?)"
                )
        # a training step moves state; a no-grad forward or a replayed recompute does not
        commits = self.training and torch.is_grad_enabled() and replay is None
        # the recompute must run the same ops as the first pass (checkpoint matches the tensors
        # they save by order): only what the selection depended on is swapped for the record
        scores_TE = R.scores_from_logits(logits_TE, self.score)
        bias = None
        if isinstance(bal, LinearAssignment) and self.training:
            with torch.no_grad():
                # a non-finite token takes whichever seats are left (a zero score everywhere), so
                # T*K stays the multiple of E that BASE needs; its weights come out NaN below
                indices_TK = replay.indices_TK if replay is not None else _assign(
                    torch.where(finite_T[:, None], scores_TE.detach(), 0.0), K, bal.solver
                )
            # the same weights rule as topk_routing: finite for finite logits, NaN for a non-finite token
            weights_TK = R._chosen_weights(scores_TE, logits_TE, indices_TK, self.score, self.renormalize)
        else:
            if isinstance(bal, LossFree):
                bias = replay.bias_E if replay is not None else self.expert_bias
            # topk_routing scores the logits again (~30 us at T=1024, E=16): reusing scores_TE would
            # merge the weights' and the aux loss's softmax backward into one, changing training
            # at the last bit, and with it every recorded `moebal compare` result
            weights_TK, indices_TK = R.topk_routing(
                logits_TE, K, self.score, bias=bias, renormalize=self.renormalize,
                num_groups=self.num_groups, top_groups=self.top_groups,
            )
        if self.scale != 1.0:
            weights_TK = weights_TK * self.scale

        aux = logits_TE.new_zeros(())
        fraction_E = None
        has_tokens = logits_TE.shape[0] > 0  # no tokens, no loss (exactly 0, never NaN)
        if isinstance(bal, AuxLoss) and bal.alpha > 0 and self.training and has_tokens:
            # sigmoid scores normalised per token: s / sum(s) as a softmax of logsigmoid (never 0/0)
            probs_TE = scores_TE if self.score == "softmax" else torch.softmax(nn.functional.logsigmoid(logits_TE), -1)
            if bal.variant == "sequence":
                if seq_len is None:
                    raise ValueError("AuxLoss(variant='sequence') needs seq_len (pass x as [B, S, D] to MoE)")
                aux = aux + bal.alpha * R.sequence_aux_loss(probs_TE, indices_TK, E, seq_len)
            elif bal.variant == "global_batch":
                fraction_E = replay.fraction_E if replay is not None else self._window_fraction(indices_TK, finite_T, probs_TE, commits)
                aux = aux + bal.alpha * E * torch.dot(fraction_E, probs_TE.float().mean(dim=0))
            else:
                aux = aux + bal.alpha * R.switch_aux_loss(probs_TE, indices_TK, E)
        if self.z_loss > 0 and self.training and has_tokens:
            aux = aux + self.z_loss * R.router_z_loss(logits_TE)

        if eager_training and replay is None and torch.is_grad_enabled() and saving_under_hooks():
            selection = Selection(
                logits_TE.shape[0], fingerprint(logits_TE), indices_TK, fraction_E, None if bias is None else bias.clone()
            )
            weights_TK = self._selections.hold(weights_TK, selection)
        if isinstance(bal, LossFree) and commits:
            with torch.no_grad():
                self.load_counts.scatter_add_(0, indices_TK.reshape(-1), _pair_counts(finite_T, K))
                if bal.update == "auto":
                    _all_reduce_sum(self.load_counts, self.balance_group)
                    self.apply_bias_update()
        return Routing(indices_TK, weights_TK, scores_TE, aux, nonfinite, replayed=replay is not None)

    @torch.no_grad()
    def _window_fraction(self, indices_TK, finite_T, probs_TE, commits: bool) -> torch.Tensor:
        """f_E of the global-batch loss: the window's counts (summed over the group) with these.

        Only a committing forward adds to the window; a no-grad training forward sees the
        counts it would add without adding them.
        """
        E = self.num_experts
        counts = torch.zeros(E + 1, dtype=torch.int64, device=indices_TK.device)
        counts[:E].scatter_add_(0, indices_TK.reshape(-1), _pair_counts(finite_T, indices_TK.shape[1]))
        counts[E] = counts[:E].sum()
        _all_reduce_sum(counts, self.balance_group)
        if not commits:
            window = (self.window_counts if self.window_open else torch.zeros_like(counts)) + counts
        else:
            if not self.window_open:  # outside a GlobalBatchBalance window every forward is its own step
                self.window_counts.zero_()
                self.window_probs.zero_()
            window = self.window_counts.add_(counts)
            self.window_probs[:E] += probs_TE.detach().sum(0).double()
            self.window_probs[E] += probs_TE.shape[0]
        return window[:E].float() / window[E].clamp(min=1).float()

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
            + (f", num_groups={self.num_groups}, top_groups={self.top_groups}" if self.top_groups is not None else "")
        )


def _pair_counts(finite_T: torch.Tensor, top_k: int) -> torch.Tensor:
    """int64 [T*K]: 1 for each (token, slot) pair of a token with finite logits, else 0."""
    return finite_T.unsqueeze(1).expand(-1, top_k).reshape(-1).long()


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
    if torch.compiler.is_compiling():  # the solvers loop on host reads: an opaque op to the compiler
        return _assign_op(scores_TE, top_k, solver)
    from moebal import assignment

    return assignment.assign(scores_TE, top_k, solver=solver)


@torch.library.custom_op("moebal::balanced_assign", mutates_args=())
def _assign_op(scores_TE: torch.Tensor, top_k: int, solver: str) -> torch.Tensor:
    """``assignment.assign`` as one op, so torch.compile(fullgraph=True) runs it as is."""
    from moebal import assignment

    return assignment.assign(scores_TE, top_k, solver=solver)


@_assign_op.register_fake
def _(scores_TE, top_k, solver):
    return scores_TE.new_empty((scores_TE.shape[0], top_k), dtype=torch.int64)


def make_router(spec, d_model: int, num_experts: int, top_k: int, device=None, dtype=None) -> Router:
    """Build a router from ``"aux_loss"``, ``"loss_free"``, ``"base"`` or pass a Router through
    (``device``/``dtype`` are factory kwargs for a router built here)."""
    if isinstance(spec, Router):
        if (spec.d_model, spec.num_experts, spec.top_k) != (d_model, num_experts, top_k):
            raise ValueError(
                f"router was built for (d_model, num_experts, top_k)={(spec.d_model, spec.num_experts, spec.top_k)}, "
                f"the layer has {(d_model, num_experts, top_k)}"
            )
        return spec
    factory = dict(device=device, dtype=dtype)
    if spec == "aux_loss":
        return Router(d_model, num_experts, top_k, score="softmax", balancer=AuxLoss(), **factory)
    if spec == "loss_free":
        return Router(d_model, num_experts, top_k, score="sigmoid", balancer=LossFree(), **factory)
    if spec == "base":
        return Router(d_model, num_experts, top_k, score="softmax", balancer=LinearAssignment(), **factory)
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
