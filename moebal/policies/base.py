"""The balancing-policy protocol: what a policy may do inside ``Router.forward``.

Shape legend: T tokens, E experts (the router's selection space: real experts plus null
experts), K top-k.

A router is gate -> scores -> selection -> weights. A policy is a small frozen
configuration object (its repr is its identity: DDP config checks compare it); its state
lives on the router, which the policy sets up once. A router holds a tuple of policies,
at most one of which *selects* (``selects = True``: loss-free bias, linear assignment,
hash); every ``loss`` adds up. ``Router.forward`` calls, in this order:

1. ``perturb(ctx, logits)`` — training-time logit noise (V-MoE's noisy top-k); returns
   the logits the scores and selection use. Default: unchanged.
2. ``select(ctx)`` — the selecting policy only: ``(weights [T,K], indices [T,K])``.
   Without one, the router's own top-k (with its group limit) selects. A pair-based
   policy (``pair_based = True``: expert choice, Expert-Threshold) returns per-token
   slots ``[T, W]`` of any width with -1 for unused ones, and may set ``ctx.num_rows``
   to the rows its plan needs (see ``moebal.plan.build_pair_plan``).
3. ``loss(ctx)`` — a scalar tensor already multiplied by its coefficient, or None.
4. ``commit(ctx)`` — only in a committing forward (training, grad enabled, not a
   checkpoint's recompute): move the policy's state (counts, bias, windows).

A value the selection or a loss depended on that must be the same when an activation
checkpoint recomputes the layer is stored with ``ctx.remember(key, value)`` and read back
with ``ctx.replayed(key)`` (None outside a replay).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Policy", "RouteContext", "check_coefficient"]


def check_coefficient(name: str, value) -> None:
    """A finite number >= 0 (NaN and inf would poison every step silently)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class Policy:
    """Base of every balancing policy (see the module docstring for the protocol)."""

    selects: ClassVar[bool] = False  # decides the selection (at most one per router)
    needs_logits: ClassVar[bool] = True  # False: the router may skip its gate GEMM entirely
    pair_based: ClassVar[bool] = False  # True: a variable number of experts per token (slots [T, W], -1 unused)

    def setup(self, router: nn.Module) -> None:
        """Check that the router can run this policy and register the policy's state on it."""

    def perturb(self, ctx: "RouteContext", logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE

    def select(self, ctx: "RouteContext") -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} does not select (selects = False): only a selecting policy picks experts")

    def loss(self, ctx: "RouteContext") -> torch.Tensor | None:
        return None

    def commit(self, ctx: "RouteContext") -> None:
        pass


@dataclass(eq=False)
class RouteContext:
    """Everything one router forward knows, shared by its policies."""

    router: nn.Module
    logits_TE: torch.Tensor | None  # fp32 (after any perturbation); None when no policy needs them
    scores_TE: torch.Tensor | None  # softmax/sigmoid of the logits
    finite_T: torch.Tensor  # bool: the token's logits are all finite
    mask_T: torch.Tensor | None  # bool: True = a real token (None = all real)
    seq_len: int | None  # rows per sequence (the layer saw [B, S, D])
    token_ids_T: torch.Tensor | None
    groups_T: torch.Tensor | None  # int group id per token (modality or task)
    training: bool
    commits: bool
    replay: Any = None  # the first pass's recompute.Selection under checkpointing
    indices_TK: torch.Tensor | None = None  # set once selected; -1 = no expert
    weights_TK: torch.Tensor | None = None
    remembered: dict = field(default_factory=dict)
    live: set = field(default_factory=set)  # remembered keys holding module state that moves in place
    _probs: torch.Tensor | None = None
    causal: bool = False  # the layer's data is causal sequence data (MoE(causal=True)): no peeking ahead
    num_rows: int | None = None  # set by a pair-based selection: rows its dispatch plan needs (None = count them)

    @property
    def num_tokens(self) -> int:
        return self.finite_T.shape[0]

    @property
    def counted_T(self) -> torch.Tensor:
        """bool [T]: tokens that count in balancing statistics (finite and not masked)."""
        return self.finite_T if self.mask_T is None else self.finite_T & self.mask_T

    @property
    def probs_TE(self) -> torch.Tensor:
        """Per-token probabilities for the losses: the softmax scores, or for sigmoid scores
        ``s / sum(s)`` computed as a softmax of logsigmoid (never 0/0)."""
        if self._probs is None:
            if self.router.score == "softmax":
                self._probs = self.scores_TE
            else:
                self._probs = torch.softmax(nn.functional.logsigmoid(self.logits_TE), -1)
        return self._probs

    def remember(self, key: str, value: torch.Tensor, live: bool = False) -> None:
        """Keep ``value`` for a checkpoint's recompute. ``live=True`` for module state that
        moves in place later (a bias): it is copied only when a recompute will need it."""
        self.remembered[key] = value
        if live:
            self.live.add(key)

    def snapshot(self) -> dict:
        """What a recorded selection keeps: the remembered values, live ones copied."""
        return {k: v.clone() if k in self.live else v for k, v in self.remembered.items()}

    def replayed(self, key: str):
        return None if self.replay is None else self.replay.state.get(key)

    def pair_counts(self, indices_TK: torch.Tensor | None = None) -> torch.Tensor:
        """int64 [E]: routed (token, slot) pairs per expert among the counted tokens (-1 skipped)."""
        idx_TK = self.indices_TK if indices_TK is None else indices_TK
        E = self.router.num_choices
        valid_TK = (idx_TK >= 0) & self.counted_T[:, None]
        counts_E = torch.zeros(E, dtype=torch.int64, device=idx_TK.device)
        return counts_E.scatter_add_(0, idx_TK.clamp(min=0).reshape(-1), valid_TK.reshape(-1).long())
