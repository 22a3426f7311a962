"""``EntropyLoss``: LIMoE's per-group router-entropy losses (Mustafa et al. 2022).

Shape legend: T tokens, E experts (the router's choices, null experts included), G groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal.entropy import global_entropy, local_entropy
from moebal.policies.base import Policy, RouteContext, check_coefficient

__all__ = ["EntropyLoss"]


@dataclass(frozen=True)
class EntropyLoss(Policy):
    """LIMoE's local and global entropy losses, summed over token groups.

    With ``p = ctx.probs_TE`` (softmax scores; for a sigmoid router the normalised ones)
    and ``M_g`` the tokens of group g that are not masked::

        loss = sum_g [ local_weight  * local_entropy(p, M_g)        # mean_t H(p_t): confident tokens
                     + global_weight * G_g ]
        G_g  = -global_entropy(p, M_g)                  (threshold None: keep H(mean p) large)
        G_g  = relu(threshold - global_entropy(p, M_g)) (threshold tau, in nats)

    With a threshold the global term acts only while ``H(mean_t p_t) < tau`` and is exactly
    0, with zero gradient, from tau upwards (LIMoE uses tau = log(E') for a target of E'
    used experts). A group with no token adds exactly 0. Groups are the router's
    ``token_groups`` (int [T], e.g. modality or task); without them every token is in
    group 0. A kept token's group id must lie in [0, num_groups) (checked on the host in
    eager mode: ``ValueError`` naming the id; a masked token's id is never read, so padding
    may carry any id; under ``torch.compile`` the check is skipped and a token with an id
    outside the range counts in no group).

    Only in training, None for zero tokens. As in ``AuxLoss``, a token with non-finite
    logits counts (the loss comes out NaN, so the run shows it) unless it is masked.
    Cost: one masked pass over ``[T, E]`` per group (``2 * num_groups`` passes with both
    weights); meant for a few groups (modalities, tasks).
    """

    local_weight: float = 0.0
    global_weight: float = 0.0
    threshold: float | None = None
    num_groups: int = 1

    def __post_init__(self):
        check_coefficient("EntropyLoss local_weight", self.local_weight)
        check_coefficient("EntropyLoss global_weight", self.global_weight)
        if self.threshold is not None:
            check_coefficient("EntropyLoss threshold", self.threshold)
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int):
            raise TypeError(f"EntropyLoss num_groups must be an int, got {self.num_groups!r}")
        if self.num_groups < 1:
            raise ValueError(f"EntropyLoss num_groups must be >= 1, got {self.num_groups}")
        if self.local_weight == 0 and self.global_weight == 0:
            raise ValueError(
                "EntropyLoss needs local_weight > 0 or global_weight > 0 (with both 0 the policy would do nothing), "
                f"got local_weight={self.local_weight!r}, global_weight={self.global_weight!r}"
            )
        if self.threshold is not None and self.global_weight == 0:
            raise ValueError(
                f"EntropyLoss threshold={self.threshold!r} acts on the global term: it needs global_weight > 0"
            )

    def loss(self, ctx: RouteContext) -> torch.Tensor | None:
        if not ctx.training or ctx.num_tokens == 0:
            return None
        probs_TE, mask_T, groups_T = ctx.probs_TE, ctx.mask_T, ctx.groups_T
        if groups_T is not None and not torch.compiler.is_compiling():
            self._check_groups(groups_T, mask_T)
        total = probs_TE.new_zeros((), dtype=torch.float32)
        for g in range(self.num_groups if groups_T is not None else 1):
            mask_g_T = mask_T if groups_T is None else (groups_T == g if mask_T is None else (groups_T == g) & mask_T)
            total = total + self._group_loss(probs_TE, mask_g_T)
        return total

    def _group_loss(self, probs_TE: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
        term = probs_TE.new_zeros((), dtype=torch.float32)
        if self.local_weight > 0:  # 0 for a group without tokens
            term = term + self.local_weight * local_entropy(probs_TE, mask_T)
        if self.global_weight > 0:
            h = global_entropy(probs_TE, mask_T)
            g_term = -h if self.threshold is None else torch.relu(self.threshold - h)
            if mask_T is not None:  # an empty group's H is 0: relu(tau - 0) must not count
                g_term = torch.where(mask_T.any(), g_term, 0.0)
            term = term + self.global_weight * g_term
        return term

    def _check_groups(self, groups_T: torch.Tensor, mask_T: torch.Tensor | None) -> None:
        outside_T = (groups_T < 0) | (groups_T >= self.num_groups)
        if mask_T is not None:
            outside_T = outside_T & mask_T
        if bool(outside_T.any()):
            bad = int(groups_T[outside_T][0])
            raise ValueError(
                f"EntropyLoss(num_groups={self.num_groups}): token_groups holds the group id {bad}, "
                f"outside [0, {self.num_groups})"
            )

