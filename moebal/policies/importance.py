"""``ImportanceLoss`` and ``LoadLoss``: the CV^2 balance losses of Shazeer et al. 2017 as
V-MoE (Riquelme et al. 2021, appendix A.2) writes them, with V-MoE's noisy top-k.

Shape legend: T tokens, E experts (the router's choices, null experts included), K top-k.

Both losses are ``weight * CV(x_E)^2`` with ``CV = std / mean`` over the E experts
(population std), computed as ``var(x_E / mean(x_E))`` so that ``x_E = 0`` (no counted
token) gives exactly 0 with a zero gradient, and the std's undefined gradient at 0 never
arises (V-MoE squares the CV for the same reason). A token with non-finite logits counts,
as in ``AuxLoss``: the loss comes out NaN, so the run shows it; a masked token
(``token_mask``) counts nowhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal.policies.base import Policy, RouteContext, check_coefficient

__all__ = ["ImportanceLoss", "LoadLoss", "cv_squared", "load_probabilities"]

_NOISE = "load.noise"  # LoadLoss's remembered noise [T, E]


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """``(std(x) / mean(x))^2`` over the last dim, population std; 0 where ``mean(x) == 0``
    (the inputs here are sums of probabilities, so a zero mean means all zeros)."""
    mean = x_E.mean(dim=-1, keepdim=True)
    ratio_E = x_E / torch.where(mean > 0, mean, 1.0)  # = x / mean, or 0 everywhere when x is all 0
    return ratio_E.var(dim=-1, unbiased=False)


def load_probabilities(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, top_k: int, noise_std: float) -> torch.Tensor:
    """V-MoE's smooth load ``p_ti = 1 - Phi((eta_t - clean_ti) / sigma)`` ``[T, E]``.

    ``eta_t`` is token t's K-th largest *noisy* logit (the bar its experts cleared this
    time) and ``Phi`` the standard normal CDF, so ``p_ti`` is the probability that expert
    i's clean logit plus fresh noise ``N(0, sigma^2)`` reaches ``eta_t``: a differentiable
    stand-in for "expert i is among token t's top K". Computed as
    ``Phi((clean_ti - eta_t) / sigma)`` (the same value, without the cancellation of
    ``1 - Phi`` near 1). As in V-MoE the gradient flows through both the clean logits and
    ``eta_t`` (the noisy K-th logit, which is a clean logit plus a constant).
    """
    eta_T1 = noisy_TE.topk(top_k, dim=-1).values[:, top_k - 1 :]
    return torch.special.ndtr((clean_TE - eta_T1) / noise_std)


def _counted_sum(x_TE: torch.Tensor, mask_T: torch.Tensor | None) -> torch.Tensor:
    """``sum_t x_te`` over the unmasked tokens (a masked row is dropped even when NaN)."""
    if mask_T is not None:
        x_TE = torch.where(mask_T[:, None], x_TE, 0.0)
    return x_TE.sum(dim=0)


@dataclass(frozen=True)
class ImportanceLoss(Policy):
    """Importance loss ``weight * CV(importance_E)^2``, ``importance_i = sum_t p_ti``.

    ``p = ctx.probs_TE``: the softmax scores (for a sigmoid router the normalised ones),
    taken after any perturbation, so next to ``LoadLoss`` they are the noisy scores the
    router routes with (V-MoE computes its importance on the clean softmax instead).
    Only in training; None for zero tokens or ``weight == 0``. Balanced importance gives
    0; every token's whole probability on one of E experts gives ``E - 1``.
    """

    weight: float = 1e-2

    def __post_init__(self):
        check_coefficient("ImportanceLoss weight", self.weight)

    def loss(self, ctx: RouteContext) -> torch.Tensor | None:
        if self.weight == 0 or not ctx.training or ctx.num_tokens == 0:
            return None
        importance_E = _counted_sum(ctx.probs_TE.float(), ctx.mask_T)
        return self.weight * cv_squared(importance_E)


@dataclass(frozen=True)
class LoadLoss(Policy):
    """Noisy top-k gating with the load loss ``weight * CV(load_E)^2`` (V-MoE).

    In training ``perturb`` adds ``N(0, sigma^2)`` noise to the router's logits (``sigma =
    noise_std``, default ``1 / E`` as in V-MoE, E = ``router.num_choices``): the scores,
    the selection and every other policy see the noisy logits. At eval nothing is added
    and the router is deterministic. The loss sums :func:`load_probabilities` over the
    counted tokens, ``load_i = sum_t Phi((clean_ti - eta_t) / sigma)`` with ``eta_t``
    the K-th largest noisy logit of token t (K = ``router.top_k``), and takes its CV^2.
    ``eta_t`` is the plain top-k's bar: next to a selecting policy or with group-limited
    routing the loss still balances the noisy plain top-k, not the realised selection.

    ``weight=0`` keeps the noise and drops the loss (noisy top-k alone).

    Activation checkpointing: the noise is kept with ``ctx.remember`` and a recompute
    reuses it (``ctx.replayed``) instead of drawing again. ``torch.utils.checkpoint``
    restores the RNG for its recompute only when ``preserve_rng_state=True`` and only for
    the devices it tracks; the replay makes the recompute's noisy logits bit-identical
    whatever the RNG does, as the router's replay of the selection already requires. The
    cost is one fp32 ``[T, E]`` tensor held by the first pass's graph until its backward.
    The clean logits are recovered in ``loss`` as ``noisy - noise`` (within one rounding
    of the noisy logits; its gradient is exactly the identity), so nothing else is held.
    """

    weight: float = 1e-2
    noise_std: float | None = None

    def __post_init__(self):
        check_coefficient("LoadLoss weight", self.weight)
        if self.noise_std is not None:
            check_coefficient("LoadLoss noise_std", self.noise_std)
            if self.noise_std == 0:
                raise ValueError("LoadLoss noise_std must be > 0 (None = 1 / num_experts), got 0")

    def sigma(self, router) -> float:
        """The noise std this router gets: ``noise_std``, or ``1 / router.num_choices``."""
        return 1.0 / router.num_choices if self.noise_std is None else float(self.noise_std)

    def perturb(self, ctx: RouteContext, logits_TE: torch.Tensor) -> torch.Tensor:
        if not ctx.training:
            return logits_TE
        noise_TE = ctx.replayed(_NOISE)
        if noise_TE is None:
            noise_TE = torch.randn_like(logits_TE) * self.sigma(ctx.router)
        ctx.remember(_NOISE, noise_TE)
        return logits_TE + noise_TE

    def loss(self, ctx: RouteContext) -> torch.Tensor | None:
        if self.weight == 0 or not ctx.training or ctx.num_tokens == 0:
            return None
        noise_TE = ctx.remembered.get(_NOISE)
        if noise_TE is None:
            raise RuntimeError("LoadLoss.loss needs the noise its perturb hook draws; the router did not call perturb")
        noisy_TE = ctx.logits_TE
        router = ctx.router
        p_TE = load_probabilities(noisy_TE - noise_TE, noisy_TE, router.top_k, self.sigma(router))
        return self.weight * cv_squared(_counted_sum(p_TE, ctx.mask_T))
