"""``TopP``: dynamic-k top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts").

Shape legend: T tokens, E experts (the router's choices, null experts included), K the
router's ``top_k``, which acts as k_max here.

A token takes the smallest prefix of its experts, sorted by probability, whose
probabilities reach p: easy tokens (one confident expert) get one expert, hard tokens
(flat probabilities) get several. Without a counter-force the router learns to flatten
its probabilities so that every token takes many experts; the paper adds an entropy
regulariser, here the policy's loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal import routing as R
from moebal.entropy import local_entropy
from moebal.policies.base import Policy, RouteContext, check_coefficient

__all__ = ["TopP", "top_p_counts"]


def top_p_counts(sorted_probs_TK: torch.Tensor, p: float, k_min: int, k_max: int) -> torch.Tensor:
    """int64 [T]: experts taken per token from its probabilities sorted descending (the first
    ``k_max`` are enough): the smallest n with ``sum_{j<n} p_(j) >= p``, clamped to
    ``[k_min, k_max]``. Equivalently, the number of prefixes whose sum before the slot is
    still below p (the first slot's is 0 < p, so n >= 1). The sums run in float64."""
    before_TK = sorted_probs_TK.double().cumsum(-1) - sorted_probs_TK.double()
    return (before_TK < p).sum(-1).clamp(min=k_min, max=k_max)


@dataclass(frozen=True)
class TopP(Policy):
    """Top-p routing with an entropy regulariser; selects (at most one selecting policy).

    With ``P = ctx.probs_TE`` (the softmax scores; for a sigmoid router ``s / sum(s)``) each
    token t takes its experts in decreasing P until their sum reaches ``p``::

        n_t = min{ n : P_(1) + ... + P_(n) >= p },  clamped to [k_min, k_max]

    where ``k_max`` is the router's ``top_k`` (the ``[T, K]`` routing keeps K slots; the
    slots after ``n_t`` hold expert -1 and weight 0, and are never dispatched). Ties in P
    break toward the lower expert index. The weights are the chosen probabilities,
    renormalised over the chosen experts when the router's ``renormalize`` is True (the
    paper uses them as they are: ``Router(..., renormalize=False)``).

    Args:
        p: the threshold, ``0 < p <= 1`` (the paper: 0.4). p -> 0 gives top-1 (top-k_min),
            p = 1 gives every expert up to k_max.
        k_min: at least this many experts per token (``1 <= k_min <= top_k``).
        entropy: coefficient of the regulariser ``entropy * mean_t H(P_t)`` (natural log,
            over the counted tokens; the paper: 1e-4). Minimising it sharpens each token's
            distribution, which lowers the number of experts top-p takes. 0 turns it off.

    Loss only in training; none for zero tokens. Balance itself is not this policy's job:
    add ``AuxLoss`` beside it (the aux loss's f counts the routed pairs, -1 slots skipped).
    Works under ``torch.compile(fullgraph=True, dynamic=True)`` (no host reads).
    """

    p: float = 0.4
    k_min: int = 1
    entropy: float = 1e-4

    selects = True

    def __post_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)):
            raise TypeError(f"TopP p must be a number, got {self.p!r}")
        if not 0 < self.p <= 1:
            raise ValueError(f"TopP p must be in (0, 1], got {self.p!r}")
        if isinstance(self.k_min, bool) or not isinstance(self.k_min, int):
            raise TypeError(f"TopP k_min must be an int, got {self.k_min!r}")
        if self.k_min < 1:
            raise ValueError(f"TopP k_min must be >= 1, got {self.k_min}")
        check_coefficient("TopP entropy", self.entropy)

    def setup(self, router) -> None:
        if self.k_min > router.top_k:
            raise ValueError(f"TopP k_min={self.k_min} exceeds the router's top_k={router.top_k} (k_max)")
        if router.top_groups is not None and router.top_groups < router.num_groups:
            raise ValueError("group-limited routing (top_groups < num_groups) does not apply to TopP")

    def select(self, ctx: RouteContext) -> tuple[torch.Tensor, torch.Tensor]:
        router, K = ctx.router, ctx.router.top_k
        probs_TE = ctx.probs_TE
        # NaN ranks last, ties to the lower expert index (a non-finite token: k_min experts, NaN weights)
        select_TE = torch.nan_to_num(probs_TE.detach(), nan=float("-inf"))
        top_TK = R._topk_indices(select_TE, K)
        chosen_TK = probs_TE.gather(1, top_TK)
        n_T = top_p_counts(chosen_TK.detach(), self.p, self.k_min, K)
        keep_TK = torch.arange(K, device=top_TK.device) < n_T[:, None]
        weights_TK = torch.where(keep_TK, chosen_TK, 0.0)
        if router.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=R._TINY)
        return weights_TK, torch.where(keep_TK, top_TK, -1)

    def loss(self, ctx: RouteContext) -> torch.Tensor | None:
        if self.entropy == 0 or not ctx.training or ctx.num_tokens == 0:
            return None
        return self.entropy * local_entropy(ctx.probs_TE, ctx.mask_T)
