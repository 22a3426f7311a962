"""``ReMoE``: ReLU routing with an adaptive L1 penalty (Wang et al., ICLR 2025).

Shape legend: T tokens, E experts (the router's choices, null experts included), K the
router's ``top_k``, which acts as k_max here.

The gate's softmax and top-k are replaced by ``R = ReLU(x W_g)``: a token goes to every
expert whose ReLU output is positive, weighted by that output, so the number of experts
per token varies (0 ... E) and the router is differentiable everywhere but at 0. An L1
penalty on R, whose coefficient lambda is steered multiplicatively toward a target
sparsity ``1 - k/E``, keeps the mean number of active experts near k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal import routing as R
from moebal.policies.base import Policy, RouteContext, check_coefficient
from moebal.policies.group import all_reduce_sum

__all__ = ["ReMoE", "remoe_l1_loss"]


def remoe_l1_loss(relu_TE: torch.Tensor, k: float, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ReMoE's load-balanced L1 term, the Switch formula on the ReLU outputs::

        L = E * sum_e f_e * P_e,   f_e = c_e / (n * k),   P_e = (1/n) sum_t R_te

    with n the counted tokens, ``c_e = #{t : R_te > 0}`` (detached: it moves nothing) and k
    the target experts per token. Its gradient is the L1 gradient of R, each expert's
    weighted by how often it is active. 0 for no counted token (never NaN).
    """
    E = relu_TE.shape[-1]
    if mask_T is None:  # n as a tensor op: a Python int of T would make torch.compile specialise on T
        n = relu_TE.new_ones(relu_TE.shape[0], dtype=torch.float32).sum().clamp(min=1)
    else:
        relu_TE = torch.where(mask_T[:, None], relu_TE, 0.0)
        n = mask_T.sum().float().clamp(min=1)
    active_E = (relu_TE.detach() > 0).sum(0).float()
    return E * torch.dot(active_E / (n * k), relu_TE.float().sum(0) / n)


@dataclass(frozen=True)
class ReMoE(Policy):
    """ReLU routing with an adaptive, load-balanced L1 regulariser; selects.

    Selection: ``R = relu(logits)`` (the router's fp32 logits; its ``score`` is not used
    for routing). Token t goes to the experts with ``R_te > 0``, weight ``R_te`` (renormalised
    over them when the router's ``renormalize`` is True; ReMoE itself uses R as is:
    ``Router(..., renormalize=False)``). A token with no positive output goes nowhere (its
    MoE output is 0, or the shared experts' alone).

    k_max: the ``[T, K]`` routing holds K = the router's ``top_k`` slots. When more than K
    outputs of a token are positive, the K largest are kept and the others are dropped
    (ties to the lower expert index); ``router.remoe_overflow`` (int64 0-d, the last
    forward's counted tokens) holds how many positive pairs were dropped so. ``top_k = E``
    never drops and is exact ReMoE (at the cost of a ``[T, E]`` plan).

    Regulariser: ``lambda * remoe_l1_loss(R, k)`` (the Switch formula on R, see
    :func:`remoe_l1_loss`; the paper also averages it over layers, here each layer's
    router adds its own term). After each committing forward (training, grad enabled, not
    a checkpoint's recompute) lambda moves::

        lambda <- lambda * alpha ** sign((1 - k/E) - S)

    where S is the measured sparsity, the share of zero outputs ``R_te = 0`` among the
    counted tokens' E outputs (summed over the router's ``balance_group`` when set). Below
    the target sparsity (too many active experts) lambda grows, above it lambda shrinks;
    equal leaves it. The paper measures S averaged over the layers; here each router
    steers its own lambda.

    State: ``router.remoe_lambda``, an fp32 persistent buffer (stays fp32 under
    ``.to(dtype)``, saved in ``state_dict``), starting at ``lambda0``. The loss of a
    checkpoint's recompute uses the lambda its first pass used. A step rebinds the buffer
    to a new tensor rather than updating it in place (the loss just computed holds the old
    one for its backward): a reference taken to ``router.remoe_lambda`` does not follow it
    (DDP's buffer broadcast included: with data parallelism set ``balance_group`` so every
    rank steps its lambda from the same summed counts).

    Args:
        k: target experts per token (target sparsity ``1 - k/E``), ``0 < k <= E``.
        lambda0: initial lambda (the paper: 1e-8), > 0.
        alpha: multiplicative step (the paper: 1.2), > 1.
    """

    k: float = 1.0
    lambda0: float = 1e-8
    alpha: float = 1.2

    selects = True

    def __post_init__(self):
        check_coefficient("ReMoE k", self.k)
        check_coefficient("ReMoE lambda0", self.lambda0)
        check_coefficient("ReMoE alpha", self.alpha)
        if self.k == 0:
            raise ValueError(f"ReMoE k must be > 0, got {self.k!r}")
        if self.lambda0 == 0:
            raise ValueError(f"ReMoE lambda0 must be > 0 (a multiplicative step cannot leave 0), got {self.lambda0!r}")
        if not self.alpha > 1:
            raise ValueError(f"ReMoE alpha must be > 1, got {self.alpha!r}")

    def setup(self, router) -> None:
        if self.k > router.num_choices:
            raise ValueError(f"ReMoE k={self.k!r} exceeds the router's {router.num_choices} experts")
        if router.top_groups is not None and router.top_groups < router.num_groups:
            raise ValueError("group-limited routing (top_groups < num_groups) does not apply to ReMoE")
        device = router.gate.weight.device
        router.register_buffer("remoe_lambda", torch.full((), self.lambda0, dtype=torch.float32, device=device))
        router.remoe_overflow = torch.zeros((), dtype=torch.int64, device=device)

    def sparsity_target(self, router) -> float:
        """``1 - k/E``."""
        return 1.0 - self.k / router.num_choices

    def select(self, ctx: RouteContext) -> tuple[torch.Tensor, torch.Tensor]:
        router, K = ctx.router, ctx.router.top_k
        relu_TE = torch.relu(ctx.logits_TE)
        # a non-finite token: its K first-ranked experts (NaN last), NaN weights, so the loss shows it
        finite_T1 = ctx.finite_T[:, None]
        select_TE = torch.nan_to_num(relu_TE.detach(), nan=float("-inf"))
        top_TK = R._topk_indices(select_TE, K)
        chosen_TK = relu_TE.gather(1, top_TK)
        keep_TK = (chosen_TK.detach() > 0) | ~finite_T1
        weights_TK = torch.where(keep_TK, chosen_TK, 0.0)
        weights_TK = torch.where(finite_T1, weights_TK, torch.nan)
        if router.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=R._TINY)
        with torch.no_grad():
            counted_T1 = ctx.counted_T[:, None]
            active = ((relu_TE > 0) & counted_T1).sum()
            kept = (keep_TK & counted_T1).sum()
            router.remoe_overflow = active - kept
        return weights_TK, torch.where(keep_TK, top_TK, -1)

    def loss(self, ctx: RouteContext) -> torch.Tensor | None:
        if not ctx.training or ctx.num_tokens == 0:
            return None
        lam = ctx.replayed("remoe.lambda")
        if lam is None:
            lam = ctx.router.remoe_lambda  # never changed in place (see step), so no copy is needed
            ctx.remember("remoe.lambda", lam)
        mask_T = ctx.mask_T
        relu_TE = torch.relu(ctx.logits_TE)
        return lam * remoe_l1_loss(relu_TE, self.k, mask_T)

    def commit(self, ctx: RouteContext) -> None:
        router = ctx.router
        with torch.no_grad():
            counted_T = ctx.counted_T
            zeros = ((ctx.logits_TE <= 0) & counted_T[:, None]).sum()
            totals = torch.stack([zeros, counted_T.sum() * router.num_choices])
            all_reduce_sum(totals, router.balance_group)
            self.step(router, totals[0], totals[1])

    @torch.no_grad()
    def step(self, router, zero_outputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """One multiplicative lambda step from a count of zero ReLU outputs among ``outputs``
        (no step when ``outputs`` is 0)."""
        # S < 1 - k/E  <=>  zeros * E < (E - k) * outputs: compared so, an exact hit reads as equal
        E = router.num_choices
        direction = torch.sign((E - self.k) * outputs.double() - E * zero_outputs.double())
        direction = torch.where(outputs > 0, direction, 0.0)
        # a new tensor, not an in-place update: this forward's loss saved the old lambda for its
        # backward, and torch.compile (2.13, aot_eager and inductor) would read an in-place
        # update there even through a clone
        router.remoe_lambda = router.remoe_lambda * torch.pow(self.alpha, direction).float()
