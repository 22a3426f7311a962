"""Router: a linear gate, top-k selection and a set of balancing policies.

Shape legend: T tokens, D model dim, E experts (plus Z null experts: the router chooses
among E + Z), K top-k.

A router is gate -> scores -> selection -> weights. ``balancer`` is one policy or a
sequence of them (the protocol is in :mod:`moebal.policies.base`): at most one decides
the selection (``LossFree``'s bias, ``LinearAssignment``, ``HashRouting``; without one,
plain top-k), and the loss terms (``AuxLoss``, ``EntropyLoss``, ``ImportanceLoss``,
``LoadLoss``) add up. DeepSeek-V3's recipe is
``balancer=(LossFree(1e-3), AuxLoss(1e-4, "sequence"))``.

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
from moebal.policies import AuxLoss, LinearAssignment, LossFree, Policy, RouteContext
from moebal.policies.base import check_coefficient
from moebal.policies.group import GroupRef, all_reduce_sum
from moebal.recompute import Selection, SelectionLog, fingerprint, in_backward, saving_under_hooks
from moebal.router_lean import lean_route

__all__ = ["Router", "Routing", "AuxLoss", "LossFree", "LinearAssignment", "update_biases", "make_router"]

_check_coefficient = check_coefficient  # the name other modules imported


@dataclass
class Routing:
    """What a router decided for T tokens."""

    indices: torch.Tensor  # int64 [T, K], in [0, E + Z); -1 = no expert (a masked token)
    weights: torch.Tensor  # fp32 [T, K], combine weights (unbiased scores, scaled); 0 for -1
    scores: torch.Tensor | None  # fp32 [T, E + Z] softmax/sigmoid scores; None when no policy needed the gate
    aux_loss: torch.Tensor  # fp32 scalar, already multiplied by its coefficients; 0 if none
    nonfinite_tokens: torch.Tensor  # int64 scalar, tokens whose logits were not all finite
    replayed: bool = False  # an activation checkpoint's recompute that replayed the first pass's selection
    pair_based: bool = False  # a variable number of experts per token: indices are slots [T, W], -1 unused
    num_rows: int | None = None  # pair-based: rows the dispatch plan needs (None = the used slots, counted)


def _as_policies(balancer) -> tuple[Policy, ...]:
    policies = () if balancer is None else tuple(balancer) if isinstance(balancer, (tuple, list)) else (balancer,)
    for p in policies:
        if not isinstance(p, Policy):
            raise TypeError(
                f"balancer must be a policy (AuxLoss, LossFree, LinearAssignment, HashRouting, EntropyLoss, "
                f"ImportanceLoss, LoadLoss), a sequence of them or None, got {p!r}"
            )
    selecting = [p for p in policies if p.selects]
    if len(selecting) > 1:
        raise ValueError(f"at most one balancing policy may decide the selection, got {selecting}")
    kinds = [type(p).__name__ for p in policies]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise ValueError(f"each policy type may appear once in balancer, got {repeated} more than once")
    return policies


class Router(nn.Module):
    """Linear gate ``logits = x W^T`` with top-k selection and balancing policies.

    Args:
        d_model, num_experts, top_k: sizes; ``1 <= top_k <= num_experts + num_null_experts``.
        score: ``"softmax"`` or ``"sigmoid"``.
        balancer: one policy, a sequence of policies, or None (see the module docstring).
        z_loss: coefficient of the router z-loss (0 = off).
        renormalize: renormalise the top-k weights to sum 1. Default (None): True when
            top_k > 1; False for top_k == 1, where renormalising would make every weight 1
            and cut the router off from the task gradient (setting it True then warns).
        scale: multiplier applied to the final weights (DeepSeek's routed scaling factor).
        balance_group: process group over which balancing counts are summed (see the
            module docstring); None keeps them local.
        num_groups, top_groups: group-limited routing (DeepSeek-V3's ``n_group`` /
            ``topk_group``, see ``topk_routing``); not with ``LinearAssignment``.
        num_null_experts: Z null experts the gate scores besides the E real ones (AdaMoE,
            MoE++): a token's K choices may include null experts (indices E .. E+Z-1),
            which ``moebal.MoE`` never dispatches.
        device, dtype: factory kwargs for the gate weight, as ``nn.Linear`` takes them.

    ``forward(x [T, D], seq_len=None, token_mask=None, token_ids=None, token_groups=None)``:
    ``token_mask`` (bool [T], True = a real token): a masked token gets indices -1 and
    weights 0 and counts in no statistic, loss or bias update; ``token_ids`` feed hash
    routing; ``token_groups`` (int [T]) are the groups of per-group losses.

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
        balancer=None,
        z_loss: float = 0.0,
        renormalize: bool | None = None,
        scale: float = 1.0,
        balance_group=None,
        num_groups: int = 1,
        top_groups: int | None = None,
        num_null_experts: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value, low in (("d_model", d_model, 1), ("num_experts", num_experts, 1), ("top_k", top_k, 1),
                                 ("num_null_experts", num_null_experts, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if top_k > num_experts + num_null_experts:
            raise ValueError(f"top_k must be <= num_experts + num_null_experts ({num_experts + num_null_experts}), got {top_k}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        policies = _as_policies(balancer)
        check_coefficient("z_loss", z_loss)
        if num_null_experts and num_groups != 1:
            raise ValueError("group-limited routing (num_groups > 1) does not combine with null experts")
        R._check_groups(num_experts + num_null_experts, top_k, num_groups, top_groups)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.num_null_experts = num_null_experts
        self.score, self.z_loss, self.scale = score, float(z_loss), float(scale)
        pair_based = any(p.pair_based for p in policies)  # expert choice, thresholds: weights are raw scores
        self.renormalize = (top_k > 1 and not pair_based) if renormalize is None else bool(renormalize)
        self.num_groups, self.top_groups = num_groups, top_groups
        self.gate = nn.Linear(d_model, num_experts + num_null_experts, bias=False, device=device, dtype=dtype)
        self._local = {}  # each rank's own counters: see _apply and the state-dict hooks
        self.balance_group = balance_group
        self.balancer = balancer
        self._selections = SelectionLog()
        self._route_hook = None  # set by moebal.record_routing / replay_routing

    @property
    def num_choices(self) -> int:
        """E + Z: the experts a token can be routed to, null experts included."""
        return self.num_experts + self.num_null_experts

    @property
    def balancer(self):
        """The ``balancer`` the router was built with (one policy, a sequence, or None); settable."""
        return self._balancer

    @balancer.setter
    def balancer(self, value) -> None:
        # the policies set their state up afresh; state a new policy shares with the old ones
        # (a loss-free bias and its counts, say) keeps its values
        policies = _as_policies(value)
        old = {name: self._buffers.pop(name) for name in self.__dict__.get("_policy_buffers", ())}
        old.update(self._local)
        self.__dict__.pop("expert_bias", None)
        self._local.clear()
        before = set(self._buffers)
        for policy in policies:
            policy.setup(self)
        self._policy_buffers = tuple(n for n in self._buffers if n not in before)
        if "expert_bias" not in self._buffers:
            self.expert_bias = None
        for name, t in old.items():
            store = self._buffers if name in self._policy_buffers else self._local if name in self._local else None
            if store is not None and store[name].shape == t.shape and store[name].dtype == t.dtype:
                store[name] = t
        self._balancer, self.policies = value, policies

    def policy(self, kind: type):
        """This router's policy of type ``kind``, or None."""
        return next((p for p in self.policies if isinstance(p, kind)), None)

    @property
    def selector(self) -> Policy | None:
        return next((p for p in self.policies if p.selects), None)

    # --- state: counters that are each rank's own, a bias that keeps fp32 ----------------

    load_counts = property(lambda self: self._local["load_counts"], doc="int64 [E] pairs counted since the last bias update")
    window_counts = property(lambda self: self._local["window_counts"])
    window_probs = property(lambda self: self._local["window_probs"])
    _PERSISTENT_LOCAL = ("load_counts",)  # saved in state_dict under the same key as when it was a buffer

    def _apply(self, fn, recurse=True):
        # every fp32 policy buffer (the loss-free bias, ReMoE's lambda) stays fp32 under a dtype cast
        fp32 = {n: self._buffers[n] for n in self.__dict__.get("_policy_buffers", ())
                if self._buffers.get(n) is not None and self._buffers[n].dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, t in fp32.items():
            if self._buffers[name].dtype != torch.float32:  # a dtype cast: keep fp32, move only
                self._buffers[name] = t.to(device=self._buffers[name].device)
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
        self._balance_group = GroupRef(group)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh gate (``nn.Linear``'s init), a zero bias and zero counters."""
        self.gate.reset_parameters()
        if self.expert_bias is not None:
            self.expert_bias.zero_()
        for t in self._local.values():
            t.zero_()

    # --- forward ----------------------------------------------------------------------------

    def forward(
        self,
        x_TD: torch.Tensor,
        seq_len: int | None = None,
        token_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        token_groups: torch.Tensor | None = None,
        causal: bool = False,
    ) -> Routing:
        """Route ``x [T, D]``; ``seq_len`` (rows per sequence) is needed by the sequence aux loss;
        ``causal`` flags causal sequence data (a decoder), which expert choice refuses."""
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [T, {self.d_model}], got {tuple(x_TD.shape)}")
        T = x_TD.shape[0]
        token_mask = _check_per_token("token_mask", token_mask, T, bool_=True)
        token_ids = _check_per_token("token_ids", token_ids, T)
        token_groups = _check_per_token("token_groups", token_groups, T)
        lean = lean_route(self, x_TD, token_mask, token_ids, token_groups, seq_len, causal)
        if lean is not None:  # eval, no gradient, plain top-k on the CPU: the same routing in fewer ops
            return Routing(*lean)
        selector = self.selector
        needs_logits = self.z_loss > 0 or selector is None or any(p.needs_logits for p in self.policies)
        if needs_logits:
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                logits_TE = nn.functional.linear(x_TD.float(), self.gate.weight.float())
            finite_T = torch.isfinite(logits_TE).all(dim=-1)
        else:  # hash routing with unit weights: no gate GEMM, no logits to be non-finite
            logits_TE, finite_T = None, torch.ones(T, dtype=torch.bool, device=x_TD.device)
        nonfinite = (~finite_T).sum()
        eager_training = self.training and not torch.compiler.is_compiling()
        replay = None
        if eager_training and in_backward() and logits_TE is not None:  # a checkpoint's recompute: replay the first pass
            replay = self._selections.find(logits_TE)
            if replay is None and saving_under_hooks():
                raise RuntimeError(
                    "moebal.Router: a non-reentrant checkpoint recomputed this router, but its first pass left no "
                    "selection to replay (was the first pass run in eval mode or under no_grad?)"
                )
        forced = None  # experts given from outside: moebal.replay_routing, or its checkpoint recompute
        if replay is not None:
            forced = replay.indices_TK if replay.state.get("forced") else None
        elif self._route_hook is not None:
            recompute = eager_training and in_backward()  # a reentrant checkpoint's recompute
            forced = self._route_hook.indices_for(self, T, logits_TE, recompute)
        # a training step moves state; a no-grad forward, a checkpoint's recompute and (unless
        # asked) a replayed routing do not
        commits = self.training and torch.is_grad_enabled() and replay is None
        if forced is not None and replay is None and not self._route_hook.update_state:
            commits = False
        ctx = RouteContext(self, logits_TE, None, finite_T, token_mask, seq_len, token_ids, token_groups,
                           self.training, commits, replay, causal=bool(causal))
        if logits_TE is not None:
            if self.training:
                for policy in self.policies:
                    ctx.logits_TE = policy.perturb(ctx, ctx.logits_TE)
            ctx.scores_TE = R.scores_from_logits(ctx.logits_TE, self.score)
        # the recompute must run the same ops as the first pass (checkpoint matches the tensors
        # they save by order): only what the selection depended on is swapped for the record
        if forced is not None:
            weights_TK, indices_TK = _forced_weights(ctx, forced), forced
            ctx.remember("forced", True)
        elif selector is not None:
            weights_TK, indices_TK = selector.select(ctx)
        else:
            # topk_routing scores the logits again (~30 us at T=1024, E=16): reusing scores_TE would
            # merge the weights' and the aux loss's softmax backward into one, changing training
            # at the last bit, and with it every recorded `moebal compare` result
            weights_TK, indices_TK = R.topk_routing(
                ctx.logits_TE, self.top_k, self.score, renormalize=self.renormalize,
                num_groups=self.num_groups, top_groups=self.top_groups,
            )
        if token_mask is not None:  # a masked token goes nowhere
            indices_TK = torch.where(token_mask[:, None], indices_TK, -1)
            weights_TK = torch.where(token_mask[:, None], weights_TK, 0.0)
        if self.scale != 1.0:
            weights_TK = weights_TK * self.scale
        ctx.indices_TK, ctx.weights_TK = indices_TK, weights_TK

        aux = x_TD.new_zeros((), dtype=torch.float32)
        for policy in self.policies:
            term = policy.loss(ctx)
            if term is not None:
                aux = aux + term
        if self.z_loss > 0 and self.training and T > 0:  # no tokens, no loss (exactly 0, never NaN)
            aux = aux + self.z_loss * R.router_z_loss(ctx.logits_TE, mask=token_mask)

        if eager_training and replay is None and torch.is_grad_enabled() and saving_under_hooks() and logits_TE is not None:
            selection = Selection(T, fingerprint(logits_TE), indices_TK, ctx.snapshot())
            weights_TK = self._selections.hold(weights_TK, selection)
        if commits:
            for policy in self.policies:
                policy.commit(ctx)
        if self._route_hook is not None and replay is None and not (eager_training and in_backward()):
            self._route_hook.seen(self, indices_TK)
        pair_based = selector is not None and selector.pair_based
        return Routing(indices_TK, weights_TK, ctx.scores_TE, aux, nonfinite, replayed=replay is not None,
                       pair_based=pair_based, num_rows=ctx.num_rows if forced is None else None)

    @torch.no_grad()
    def apply_bias_update(self, load_E: torch.Tensor | None = None) -> None:
        """Move the bias by the accumulated (or given) load and reset the counters."""
        policy = self.policy(LossFree)
        if policy is None:
            raise RuntimeError("apply_bias_update needs a LossFree balancer")
        policy.apply(self, load_E)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}, "
            f"balancer={self.balancer}, z_loss={self.z_loss}, renormalize={self.renormalize}"
            + (f", num_groups={self.num_groups}, top_groups={self.top_groups}" if self.top_groups is not None else "")
            + (f", num_null_experts={self.num_null_experts}" if self.num_null_experts else "")
        )


def _check_per_token(name: str, value, num_tokens: int, bool_: bool = False):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if bool_ and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = a real token), got dtype {value.dtype}")
    if not bool_ and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if value.numel() != num_tokens:
        raise ValueError(f"{name} must have one entry per token ({num_tokens}), got shape {tuple(value.shape)}")
    return value.reshape(num_tokens)


def _forced_weights(ctx: RouteContext, indices_TK: torch.Tensor) -> torch.Tensor:
    """The router's weights at replayed experts: bit-identical to the first pass where a row
    has no -1; rows with a -1 renormalise over their real choices."""
    router = ctx.router
    if ctx.scores_TE is None:  # a gate-free hash router: its weights do not depend on the scores
        return router.selector.unit_weights(indices_TK)
    valid_TK = indices_TK >= 0
    safe_TK = indices_TK.clamp(min=0)
    chosen_TK = R._chosen_weights(ctx.scores_TE, ctx.logits_TE, safe_TK, router.score, router.renormalize)
    partial_TK = torch.where(valid_TK, ctx.scores_TE.gather(1, safe_TK), 0.0)
    if router.renormalize:
        partial_TK = partial_TK / partial_TK.sum(-1, keepdim=True).clamp(min=R._TINY)
    return torch.where(valid_TK.all(-1, keepdim=True), chosen_TK, partial_TK)


_NAMED = {  # name -> (score, policy class)
    "aux_loss": ("softmax", AuxLoss),
    "loss_free": ("sigmoid", LossFree),
    "base": ("softmax", LinearAssignment),
}


def make_router(
    spec, d_model: int, num_experts: int, top_k: int, device=None, dtype=None, num_null_experts: int | None = None,
    **options,
) -> Router:
    """Build a router from ``"aux_loss"``, ``"loss_free"``, ``"base"`` or pass a Router through
    (``device``/``dtype`` are factory kwargs for a router built here; ``num_null_experts``
    None takes a given router's own, 0 for a named one).

    ``options`` configure a named router: the policy's own fields (``alpha``/``variant``
    for ``"aux_loss"``; ``rate``/``update``/``rule``/``center`` for ``"loss_free"``;
    ``solver`` for ``"base"``) and ``Router`` arguments (``z_loss``, ``score``,
    ``renormalize``, ``scale``, ...), e.g. ``make_router("loss_free", ..., rate=1e-2,
    update="manual")``. An unknown option raises ``TypeError`` naming it.
    """
    if isinstance(spec, Router):
        if options:
            raise TypeError(f"router options {sorted(options)} apply to a named router, not to a moebal.Router instance")
        if (spec.d_model, spec.num_experts, spec.top_k) != (d_model, num_experts, top_k):
            raise ValueError(
                f"router was built for (d_model, num_experts, top_k)={(spec.d_model, spec.num_experts, spec.top_k)}, "
                f"the layer has {(d_model, num_experts, top_k)}"
            )
        if num_null_experts is not None and num_null_experts != spec.num_null_experts:
            raise ValueError(
                f"num_null_experts={num_null_experts} but the router was built with "
                f"num_null_experts={spec.num_null_experts}"
            )
        return spec
    if not isinstance(spec, str) or spec not in _NAMED:
        raise ValueError(f"router must be 'aux_loss', 'loss_free', 'base' or a moebal.Router, got {spec!r}")
    score, policy_cls = _NAMED[spec]
    fields = set(policy_cls.__dataclass_fields__)
    router_args = {"score", "z_loss", "renormalize", "scale", "balance_group", "num_groups", "top_groups"}
    unknown = sorted(set(options) - fields - router_args)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for router={spec!r}; it takes {sorted(fields)} ({policy_cls.__name__}) "
            f"and {sorted(router_args)} (Router)"
        )
    policy = policy_cls(**{k: v for k, v in options.items() if k in fields})
    kwargs = {"score": score, **{k: v for k, v in options.items() if k in router_args}}
    return Router(d_model, num_experts, top_k, balancer=policy, device=device, dtype=dtype,
                  num_null_experts=num_null_experts or 0, **kwargs)


@torch.no_grad()
def update_biases(model: nn.Module, group=None) -> int:
    """Apply the pending loss-free bias updates of every router in ``model``.

    Call after ``optimizer.step()`` with ``LossFree(update="manual")``. When
    ``torch.distributed`` is initialised, the int64 load counts are all-reduced over
    ``group`` first (summed exactly), so every rank computes a bit-identical bias;
    ``group=None`` means each router's ``balance_group`` when set, else the default group.
    Returns the number of routers updated.
    """
    routers = [m for m in model.modules() if isinstance(m, Router) and m.policy(LossFree) is not None]
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    for router in routers:
        if distributed:
            reduce_over = group if group is not None else router.balance_group
            dist.all_reduce(router.load_counts, op=dist.ReduceOp.SUM, group=reduce_over)
        router.apply_bias_update()
    return len(routers)
