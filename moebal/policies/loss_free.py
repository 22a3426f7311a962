"""``LossFree``: DeepSeek's loss-free balancing, an fp32 selection bias moved by the loads."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal import routing as R
from moebal.policies.base import Policy, RouteContext, check_coefficient
from moebal.policies.group import all_reduce_sum

__all__ = ["LossFree"]


@dataclass(frozen=True)
class LossFree(Policy):
    """Loss-free balancing (Wang et al. 2024): ``expert_bias`` is added to the scores to
    choose the experts and never enters the weights.

    Args:
        rate: the step size u. Default: 1e-3 for the sign rule (the paper's), 0.3 for the
            proportional rule (best of 0.03-3 in ``moebal compare``'s 300-step run; 3
            oscillates).
        update: ``"auto"`` (after each training forward) or ``"manual"``
            (``moebal.update_biases(model)`` after ``optimizer.step()``).
        rule: ``"sign"`` (the paper: every bias moves by exactly u) or ``"proportional"``
            (LongCat-Flash: ``u * (mean(c) - c) / sum(c)``, a step that shrinks as the
            loads even out; a short run can catch up with a larger u).
        center: subtract the step's mean (torchtitan), so the bias does not drift; top-k is
            invariant to a common shift, so routing is bit-identical.
        real_per_token: with null experts (``MoE(num_null_experts=Z)``), the expected number
            of real experts per token the bias aims at (LongCat-Flash): real experts target
            ``sum(c) * real_per_token / (K * E)`` each, null experts share the rest. None
            = every choice targets the mean.

    The bias is an fp32 persistent buffer ``router.expert_bias`` (survives ``state_dict``
    and ``.to(dtype)``); the int64 counts ``router.load_counts`` count only real, finite
    tokens' routed pairs.
    """

    rate: float | None = None
    update: str = "auto"
    rule: str = "sign"
    center: bool = False
    real_per_token: float | None = None

    selects = True

    def __post_init__(self):
        if self.rate is None:  # the measured default of each rule (see the class docstring)
            object.__setattr__(self, "rate", 1e-3 if self.rule == "sign" else 0.3)
        check_coefficient("LossFree rate", self.rate)
        if self.update not in ("auto", "manual"):
            raise ValueError(f"LossFree update must be 'auto' or 'manual', got {self.update!r}")
        if self.rule not in ("sign", "proportional"):
            raise ValueError(f"LossFree rule must be 'sign' or 'proportional', got {self.rule!r}")
        if not isinstance(self.center, bool):
            raise TypeError(f"LossFree center must be a bool, got {self.center!r}")
        if self.real_per_token is not None:
            check_coefficient("LossFree real_per_token", self.real_per_token)

    def setup(self, router) -> None:
        E, device = router.num_choices, router.gate.weight.device
        router.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32, device=device))
        router._local["load_counts"] = torch.zeros(E, dtype=torch.int64, device=device)
        if self.real_per_token is not None:
            Z, K = router.num_null_experts, router.top_k
            if Z == 0:
                raise ValueError("LossFree(real_per_token=...) needs null experts (num_null_experts > 0)")
            if not 0 < self.real_per_token <= K:
                raise ValueError(f"LossFree real_per_token must be in (0, top_k={K}], got {self.real_per_token!r}")

    def select(self, ctx: RouteContext) -> tuple[torch.Tensor, torch.Tensor]:
        router = ctx.router
        bias_E = ctx.replayed("loss_free.bias")
        if bias_E is None:
            bias_E = router.expert_bias
            ctx.remember("loss_free.bias", bias_E, live=True)  # copied only if a recompute needs it
        return R.topk_routing(
            ctx.logits_TE, router.top_k, router.score, bias=bias_E, renormalize=router.renormalize,
            num_groups=router.num_groups, top_groups=router.top_groups,
        )

    def commit(self, ctx: RouteContext) -> None:
        router = ctx.router
        with torch.no_grad():
            router.load_counts.add_(ctx.pair_counts())
            if self.update == "auto":
                all_reduce_sum(router.load_counts, router.balance_group)
                self.apply(router)

    @torch.no_grad()
    def apply(self, router, load_E: torch.Tensor | None = None) -> None:
        """Move ``router.expert_bias`` by the accumulated (or given) load; reset the counts."""
        load_E = router.load_counts if load_E is None else load_E
        router.expert_bias.copy_(
            R.loss_free_update(router.expert_bias, load_E, self.rate, self.rule, self.center, self._target(router, load_E))
        )
        router.load_counts.zero_()

    def _target(self, router, load_E: torch.Tensor) -> torch.Tensor | None:
        if self.real_per_token is None:
            return None
        E, Z, K = router.num_experts, router.num_null_experts, router.top_k
        total = load_E.double().sum()
        share = self.real_per_token / K
        per_real, per_null = total * share / E, total * (1 - share) / Z
        return torch.cat([per_real.expand(E), per_null.expand(Z)])
