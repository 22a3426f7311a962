"""``ExpertChoice``: each expert takes its C best tokens (Zhou et al. 2022).

Shape legend: T tokens, E experts, C tokens per expert (the capacity), B sequences,
S positions per sequence, N = E*C (token, expert) pairs, W slots per token.

Perfect balance by construction (every expert gets exactly C tokens), but a token gets
0..E experts, and an expert's choice among a batch's tokens depends on every other token
in it: inside a decoder it sees the future of each sequence (a token's output changes
when a later token of its sequence changes), so training loss looks better than any
causal model can reach. ``group="batch"`` therefore refuses data the layer flags as
causal (``MoE(causal=True)``) unless ``allow_future=True`` says the leak is wanted (to
measure it, or for an encoder); ``group="position"`` lets each expert choose among the B
tokens at the same position of the batch's sequences, which never looks ahead in a
sequence (it still depends on the other sequences of the batch).

The selection is laid out as per-token slots ``[T, W]`` (-1 = unused, see
``moebal.plan.slots_from_pairs``) and the layer builds a plan of R = E*C rows from them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from moebal.plan import slots_from_pairs
from moebal.policies.base import Policy, RouteContext

__all__ = ["ExpertChoice", "expert_choice", "expert_capacity"]


def expert_choice(scores_TE: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing: each expert takes the ``capacity`` tokens it scores highest.

    Args:
        scores_TE: float ``[T, E]`` token-expert scores (the router's softmax, say).
        capacity: C, an int in [0, T].

    Returns:
        ``(tokens [E, C] int64, weights [E, C])``: expert e's tokens by decreasing score
        (ties to the lower token index; NaN ranks as -inf) and their scores
        ``scores[tokens[e, c], e]`` (differentiable). A token may get 0..E experts.
    """
    if not isinstance(scores_TE, torch.Tensor) or scores_TE.dim() != 2 or not scores_TE.is_floating_point():
        got = tuple(scores_TE.shape) if isinstance(scores_TE, torch.Tensor) else type(scores_TE).__name__
        raise ValueError(f"scores must be a float tensor of shape [T, E], got {got}")
    T = scores_TE.shape[0]
    if isinstance(capacity, bool) or not isinstance(capacity, (int, torch.SymInt)) or not 0 <= capacity <= T:
        raise ValueError(f"capacity must be an int in [0, T={T}], got {capacity!r}")
    key_ET = scores_TE.detach().t().nan_to_num(nan=-float("inf"))
    # a stable descending sort keeps equal scores in token order: ties go to the lower index
    tokens_EC = torch.sort(key_ET, dim=1, descending=True, stable=True).indices[:, :capacity]
    weights_EC = scores_TE.t().gather(1, tokens_EC)
    return tokens_EC, weights_EC


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(c * T * K / E), at most T (and at least 1 when T > 0), in integer arithmetic
    (the factor as its exact integer ratio), so a compiled symbolic T gives an integer C."""
    num, den = float(capacity_factor).as_integer_ratio()
    c = -(-(num * num_tokens * top_k) // (den * num_experts))
    return min(num_tokens, max(1, c)) if num_tokens > 0 else 0


def _check_factor(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class ExpertChoice(Policy):
    """Expert-choice selection: each expert takes ``C = ceil(capacity_factor * T * K / E)``
    tokens (T the rows of the batch, or of one position group; K the router's ``top_k``:
    the mean experts per token), weighted by their unnormalised scores.

    Args:
        capacity_factor: c above; 1 gives E*C = T*K pairs, the compute of top-K.
        group: ``"batch"`` (experts choose among all T tokens: not causal) or
            ``"position"`` (among the B tokens at each sequence position; needs
            ``[B, S, D]`` input, C = ceil(c * B * K / E)).
        allow_future: with ``group="batch"``, run on data flagged causal
            (``MoE(causal=True)``) anyway, knowing each output then depends on later
            tokens of its sequence. False (default) raises ValueError there.

    Masked and non-finite tokens are never chosen (an expert with fewer real tokens than
    C leaves its remaining seats empty). Build the router with ``renormalize=False`` (its
    default with this policy): replayed routing then gives the same weights.
    """

    capacity_factor: float = 1.0
    group: str = "batch"
    allow_future: bool = False

    selects = True
    pair_based = True  # the selection gives a variable number of experts per token

    def __post_init__(self):
        _check_factor(self.capacity_factor)
        if self.group not in ("batch", "position"):
            raise ValueError(f"ExpertChoice group must be 'batch' or 'position', got {self.group!r}")
        if not isinstance(self.allow_future, bool):
            raise TypeError(f"ExpertChoice allow_future must be a bool, got {self.allow_future!r}")

    def setup(self, router) -> None:
        _check_pair_router(self, router)

    def select(self, ctx: RouteContext) -> tuple[torch.Tensor, torch.Tensor]:
        router = ctx.router
        E, K, T = router.num_experts, router.top_k, ctx.num_tokens
        scores_TE, counted_T = ctx.scores_TE, ctx.counted_T
        key_TE = scores_TE.detach().masked_fill(~counted_T[:, None], -float("inf"))
        if self.group == "batch":
            if ctx.causal and not self.allow_future:
                raise ValueError(
                    "ExpertChoice(group='batch') on data flagged causal (MoE(causal=True)): each expert would choose "
                    "among every position of every sequence, so a token's output would depend on later tokens (the "
                    "model learns to read the future). Use group='position', ExpertThreshold, or "
                    "allow_future=True to accept the leak"
                )
            C = expert_capacity(self.capacity_factor, T, K, E)
            tokens_EC, _ = expert_choice(key_TE, C)
        else:
            S = ctx.seq_len
            if S is None:
                raise ValueError("ExpertChoice(group='position') needs sequence input [B, S, D] (seq_len is unknown)")
            B = T // S
            C = expert_capacity(self.capacity_factor, B, K, E)
            # each (position s, expert e) row chooses C of the B tokens b*S + s
            key_SEB = rearrange(key_TE, "(b s) e -> s e b", s=S)
            b_SEC = torch.sort(key_SEB, dim=-1, descending=True, stable=True).indices[..., :C]
            s_S11 = torch.arange(S, device=key_TE.device).view(S, 1, 1)
            tokens_EC = rearrange(b_SEC * S + s_S11, "s e c -> e (s c)")
        experts_EC = torch.arange(E, device=key_TE.device)[:, None].expand_as(tokens_EC)
        tokens_N, experts_N = tokens_EC.reshape(-1), experts_EC.reshape(-1)
        tokens_N = torch.where(counted_T[tokens_N], tokens_N, -1)  # seats a masked token took stay empty
        width = E if torch.compiler.is_compiling() else None  # exact width needs a host read
        indices_TW, pair_TW = slots_from_pairs(tokens_N, experts_N, T, width)
        safe_TW = indices_TW.clamp(min=0)
        weights_TW = torch.where(indices_TW >= 0, scores_TE.gather(1, safe_TW), 0.0)
        ctx.num_rows = tokens_N.shape[0]  # E*C rows (fewer used when a masked token's seat stays empty)
        return weights_TW, indices_TW


def _check_pair_router(policy, router) -> None:
    name = type(policy).__name__
    if router.num_null_experts:
        raise ValueError(f"{name} does not combine with null experts (num_null_experts={router.num_null_experts})")
    if router.top_groups is not None and router.top_groups < router.num_groups:
        raise ValueError(f"group-limited routing (top_groups < num_groups) does not apply to {name}")
    if router.renormalize:
        raise ValueError(
            f"{name} weights are the tokens' unnormalised scores: build the Router with renormalize=False "
            "(its default with this policy)"
        )
