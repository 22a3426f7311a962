"""``LinearAssignment``: BASE layers' balanced assignment in training, greedy top-k at eval."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal import routing as R
from moebal.policies.base import Policy, RouteContext

__all__ = ["LinearAssignment"]


@dataclass(frozen=True)
class LinearAssignment(Policy):
    """BASE layers' balanced assignment; ``solver`` "exact", "sinkhorn" or "quantile".

    In training every expert receives exactly T*K/E of the counted tokens' pairs (maximal
    total score); masked tokens take no seat. When the n kept tokens' pairs are not a
    multiple of E, zero-score filler rows take the spare seats of the smallest exact
    assignment that holds them, so each expert gets at most ``(n + fill) * K / E`` pairs. At eval: greedy top-k.
    """

    solver: str = "exact"

    selects = True

    def __post_init__(self):
        if self.solver not in ("exact", "sinkhorn", "quantile"):
            raise ValueError(f"LinearAssignment solver must be 'exact', 'sinkhorn' or 'quantile', got {self.solver!r}")

    def setup(self, router) -> None:
        if router.top_groups is not None and router.top_groups < router.num_groups:
            raise ValueError("group-limited routing (top_groups < num_groups) does not apply to LinearAssignment")

    def select(self, ctx: RouteContext) -> tuple[torch.Tensor, torch.Tensor]:
        router = ctx.router
        if not ctx.training:
            return R.topk_routing(ctx.logits_TE, router.top_k, router.score, renormalize=router.renormalize)
        indices_TK = ctx.replayed("assignment.indices")
        if indices_TK is None:
            with torch.no_grad():
                # a non-finite token takes whichever seats are left (a zero score everywhere), so
                # T*K stays the multiple of E that BASE needs; its weights come out NaN below
                scores_TE = torch.where(ctx.finite_T[:, None], ctx.scores_TE.detach(), 0.0)
                indices_TK = _assign(scores_TE, router.top_k, self.solver, ctx.mask_T)
            ctx.remember("assignment.indices", indices_TK)
        # the same weights rule as topk_routing: finite for finite logits, NaN for a non-finite token
        weights_TK = R._chosen_weights(ctx.scores_TE, ctx.logits_TE, indices_TK.clamp(min=0), router.score, router.renormalize)
        return weights_TK, indices_TK


def _assign(scores_TE: torch.Tensor, top_k: int, solver: str, mask_T: torch.Tensor | None) -> torch.Tensor:
    if mask_T is None:
        mask_T = torch.ones(0, dtype=torch.bool, device=scores_TE.device)  # empty = every token kept
    if torch.compiler.is_compiling():  # the solvers loop on host reads: an opaque op to the compiler
        return _assign_op(scores_TE, top_k, solver, mask_T)
    return _assign_kept(scores_TE, top_k, solver, mask_T)


def _assign_kept(scores_TE: torch.Tensor, top_k: int, solver: str, mask_T: torch.Tensor) -> torch.Tensor:
    """Balanced assignment of the kept rows; masked rows get -1. When the kept rows' T*K is
    not a multiple of E, zero-score filler rows take the spare seats and are cut off."""
    from moebal import assignment

    if mask_T.numel() == 0:
        return assignment.assign(scores_TE, top_k, solver=solver)
    T, E = scores_TE.shape
    kept = mask_T.nonzero().squeeze(1)
    n = kept.numel()
    out_TK = torch.full((T, top_k), -1, dtype=torch.int64, device=scores_TE.device)
    if n == 0:
        return out_TK
    fill = (-(n * top_k) % E + top_k - 1) // top_k
    while (n + fill) * top_k % E:  # a filler row holds K seats: find the smallest fitting count
        fill += 1
    rows_NE = torch.cat([scores_TE[kept], scores_TE.new_zeros(fill, E)])
    out_TK[kept] = assignment.assign(rows_NE, top_k, solver=solver)[:n]
    return out_TK


@torch.library.custom_op("moebal::balanced_assign_kept", mutates_args=())
def _assign_op(scores_TE: torch.Tensor, top_k: int, solver: str, mask_T: torch.Tensor) -> torch.Tensor:
    """``_assign_kept`` as one op, so torch.compile(fullgraph=True) runs it as is."""
    return _assign_kept(scores_TE, top_k, solver, mask_T)


@_assign_op.register_fake
def _(scores_TE, top_k, solver, mask_T):
    return scores_TE.new_empty((scores_TE.shape[0], top_k), dtype=torch.int64)
