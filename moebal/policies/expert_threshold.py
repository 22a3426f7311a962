"""``ExpertThreshold``: a token goes to expert e iff its score passes e's learned threshold.

Shape legend: T tokens, E experts, K the router's top-k (mean experts per token aimed
at), W slots per token.

Expert choice's balance without its leak: expert choice gives expert e the tokens whose
score reaches the C-th largest score of the batch, C = ceil(c * T * K / E), i.e. the top
``c*K/E`` quantile of e's scores. Expert-Threshold routing keeps that quantile as a
per-expert threshold, an exponential moving average over training batches, and routes
each token by comparing its own scores with the thresholds: causal, independent of the
batch, usable one token at a time at decode. A token gets 0..E experts.

State: ``router.threshold_ema`` (fp32 [E], the raw EMA, kept fp32 under ``.to(dtype)``)
and ``router.threshold_steps`` (int64 scalar, the updates so far); the threshold is the
bias-corrected ``ema / (1 - decay**steps)``, so the first update sets it to that batch's
quantile. Before any update a token goes to its top-K experts (token choice). The state
moves only in a committing forward (training, grad enabled, not a checkpoint's
recompute): once per step under activation checkpointing, whose recompute replays the
first pass's thresholds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal.policies.base import Policy, RouteContext, check_coefficient
from moebal.policies.expert_choice import _check_factor, _check_pair_router

__all__ = ["ExpertThreshold"]


@dataclass(frozen=True)
class ExpertThreshold(Policy):
    """Expert-Threshold routing.

    Args:
        capacity_factor: c: each threshold tracks the C-th largest score of a batch's real
            tokens, C = ceil(c * n * K / E) (n real tokens), as expert choice would pick.
        decay: the EMA's decay per update (0.99: about the last 100 steps).
        max_experts: cap on the experts a token may take (its best passing ones); None =
            E. Compiled, the layer sizes its buffers for T * max_experts rows.

    Weights are the unnormalised scores at the passing experts (build the router with
    ``renormalize=False``, its default with this policy).
    """

    capacity_factor: float = 1.0
    decay: float = 0.99
    max_experts: int | None = None

    selects = True
    pair_based = True

    def __post_init__(self):
        _check_factor(self.capacity_factor)
        check_coefficient("ExpertThreshold decay", self.decay)
        if not self.decay < 1:
            raise ValueError(f"ExpertThreshold decay must be in [0, 1), got {self.decay!r}")
        if self.max_experts is not None and (
            isinstance(self.max_experts, bool) or not isinstance(self.max_experts, int) or self.max_experts < 1
        ):
            raise ValueError(f"ExpertThreshold max_experts must be a positive int or None, got {self.max_experts!r}")

    def setup(self, router) -> None:
        _check_pair_router(self, router)
        E, device = router.num_experts, router.gate.weight.device
        router.register_buffer("threshold_ema", torch.zeros(E, dtype=torch.float32, device=device))
        router.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64, device=device))

    def thresholds(self, router) -> torch.Tensor:
        """fp32 [E]: the current thresholds (NaN before the first update)."""
        steps = router.threshold_steps
        correction = 1.0 - torch.pow(torch.tensor(self.decay, dtype=torch.float64, device=steps.device), steps)
        tau_E = (router.threshold_ema.double() / correction.clamp(min=1e-300)).float()
        return torch.where(steps > 0, tau_E, torch.full_like(tau_E, float("nan")))

    def select(self, ctx: RouteContext) -> tuple[torch.Tensor, torch.Tensor]:
        router = ctx.router
        E, K, T = router.num_experts, router.top_k, ctx.num_tokens
        tau_E = ctx.replayed("threshold.tau")
        if tau_E is None:
            tau_E = self.thresholds(router)  # a fresh tensor: nothing to copy for a recompute
            ctx.remember("threshold.tau", tau_E)
        scores_TE = ctx.scores_TE
        key_TE = scores_TE.detach()
        # before the first update: token choice, each token's top-K
        top_TE = torch.zeros_like(key_TE, dtype=torch.bool).scatter_(1, key_TE.nan_to_num(nan=-1.0).topk(K, dim=1).indices, True)
        pass_TE = torch.where(torch.isnan(tau_E), top_TE, key_TE >= tau_E)
        pass_TE = pass_TE & ctx.counted_T[:, None]
        compiling = torch.compiler.is_compiling()
        cap = E if self.max_experts is None else min(self.max_experts, E)
        W = cap if compiling else min(cap, int(pass_TE.sum(1).max())) if T > 0 else 0
        ranked_TE = torch.where(pass_TE, key_TE, -float("inf"))
        slot_TW = ranked_TE.topk(W, dim=1).indices  # the token's best passing experts first
        valid_TW = pass_TE.gather(1, slot_TW)
        indices_TW = torch.where(valid_TW, slot_TW, -1)
        weights_TW = torch.where(valid_TW, scores_TE.gather(1, slot_TW), 0.0)
        ctx.num_rows = T * W if compiling else None  # None: the plan counts the used slots
        return weights_TW, indices_TW

    def commit(self, ctx: RouteContext) -> None:
        router = ctx.router
        E, K, T = router.num_experts, router.top_k, ctx.num_tokens
        if T == 0:
            return
        with torch.no_grad():
            counted_T = ctx.counted_T
            key_ET = ctx.scores_TE.detach().t().masked_fill(~counted_T[None, :], -float("inf"))
            sorted_ET = torch.sort(key_ET, dim=1, descending=True).values
            num, den = float(self.capacity_factor).as_integer_ratio()
            n = counted_T.sum()
            C = torch.div(n * (num * K) + den * E - 1, den * E, rounding_mode="floor")
            C = torch.minimum(C, n).clamp(min=1)  # at most the real tokens: never the -inf of a masked one
            q_E = sorted_ET.gather(1, (C - 1).view(1, 1).expand(E, 1)).squeeze(1)  # a gather: no host read of C
            q_E = _mean_over_group(q_E, router.balance_group)
            any_T = n > 0
            router.threshold_ema.copy_(torch.where(any_T, self.decay * router.threshold_ema + (1 - self.decay) * q_E,
                                                   router.threshold_ema))
            router.threshold_steps.add_(any_T.long())


def _mean_over_group(q_E: torch.Tensor, group) -> torch.Tensor:
    """The ranks' mean quantile, so every rank holds the same thresholds (local without a group)."""
    dist = torch.distributed
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return q_E
    q_E = q_E.clone()
    dist.all_reduce(q_E, op=dist.ReduceOp.SUM, group=group)
    return q_E / dist.get_world_size(group)
