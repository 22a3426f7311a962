"""``AuxLoss``: the Switch/GShard auxiliary balance loss (per batch, sequence or global batch)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal import routing as R
from moebal.policies.base import Policy, RouteContext, check_coefficient
from moebal.policies.group import all_reduce_sum

__all__ = ["AuxLoss"]


@dataclass(frozen=True)
class AuxLoss(Policy):
    """Switch/GShard auxiliary loss ``alpha * E * sum_i f_i P_i``.

    ``variant``: ``"batch"`` (f, P over this forward's tokens), ``"sequence"`` (per
    sequence, averaged: DeepSeek-V3's sequence-wise loss) or ``"global_batch"`` (Qiu et
    al. 2025, "Demons in the Detail"): f is the fraction of routed pairs per expert summed
    over the router's ``balance_group`` and, inside a ``moebal.parallel.GlobalBatchBalance``
    window, over the micro-batches seen so far in the step; P stays local (this rank's
    tokens), so under data-parallel gradient averaging the gradient has the scale of the
    concatenated batch's loss, whatever the world size. Masked tokens count in neither.
    """

    alpha: float = 1e-2
    variant: str = "batch"

    def __post_init__(self):
        check_coefficient("AuxLoss alpha", self.alpha)
        if self.variant not in ("batch", "sequence", "global_batch"):
            raise ValueError(f"AuxLoss variant must be 'batch', 'sequence' or 'global_batch', got {self.variant!r}")

    def setup(self, router) -> None:
        if self.variant == "global_batch":
            # the step's window: summed counts [E] + routed pairs, and local detached sums
            # of P and tokens for the exact step value (GlobalBatchBalance)
            E, device = router.num_choices, router.gate.weight.device
            router._local["window_counts"] = torch.zeros(E + 1, dtype=torch.int64, device=device)
            router._local["window_probs"] = torch.zeros(E + 1, dtype=torch.float64, device=device)
            router.window_open = False

    def loss(self, ctx: RouteContext) -> torch.Tensor | None:
        if self.alpha == 0 or not ctx.training or ctx.num_tokens == 0:
            return None
        E, probs_TE, mask_T = ctx.router.num_choices, ctx.probs_TE, ctx.mask_T
        if self.variant == "sequence":
            if ctx.seq_len is None:
                raise ValueError("AuxLoss(variant='sequence') needs seq_len (pass x as [B, S, D] to MoE)")
            return self.alpha * R.sequence_aux_loss(probs_TE, ctx.indices_TK, E, ctx.seq_len, mask=mask_T)
        if self.variant == "batch":
            return self.alpha * R.switch_aux_loss(probs_TE, ctx.indices_TK, E, mask=mask_T)
        fraction_E = ctx.replayed("aux.fraction")
        if fraction_E is None:
            fraction_E = _window_fraction(ctx)
            ctx.remember("aux.fraction", fraction_E)
        if mask_T is None:
            P_E = probs_TE.float().mean(dim=0)
        else:
            P_E = torch.where(mask_T[:, None], probs_TE.float(), 0.0).sum(0) / mask_T.sum().clamp(min=1)
        return self.alpha * E * torch.dot(fraction_E, P_E)


@torch.no_grad()
def _window_fraction(ctx: RouteContext) -> torch.Tensor:
    """f_E of the global-batch loss: the window's counts (summed over the group) with these.

    Only a committing forward adds to the window; a no-grad training forward sees the
    counts it would add without adding them.
    """
    router = ctx.router
    E = router.num_choices
    counts = torch.zeros(E + 1, dtype=torch.int64, device=ctx.indices_TK.device)
    counts[:E] = ctx.pair_counts()
    counts[E] = counts[:E].sum()
    all_reduce_sum(counts, router.balance_group)
    if not ctx.commits:
        window = (router.window_counts if router.window_open else torch.zeros_like(counts)) + counts
    else:
        if not router.window_open:  # outside a GlobalBatchBalance window every forward is its own step
            router.window_counts.zero_()
            router.window_probs.zero_()
        window = router.window_counts.add_(counts)
        probs_TE = ctx.probs_TE.detach()
        if ctx.mask_T is not None:
            probs_TE = torch.where(ctx.mask_T[:, None], probs_TE, 0.0)
        router.window_probs[:E] += probs_TE.sum(0).double()
        router.window_probs[E] += probs_TE.shape[0] if ctx.mask_T is None else ctx.mask_T.sum()
    return window[:E].float() / window[E].clamp(min=1).float()
