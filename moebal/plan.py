"""DispatchPlan: where every routed (token, slot) pair goes, built once per forward.

Shape legend: T tokens, K top-k, E experts, N = T*K routed pairs, R rows of the
expert-contiguous buffer ``xs`` (R = N when dropless, R = E*C with a capacity C).

Layout of ``xs``: expert e owns rows ``[starts_E[e], group_ends_E[e])``. Dropless, the
groups are packed back to back and expert e's rows hold its tokens in token order.
With a capacity C, expert e owns the fixed block ``[e*C, (e+1)*C)``; its first
``kept_E[e]`` rows hold the kept tokens and the rest are padding (zero rows whose outputs
are never read). Everything is built with tensor ops: no host sync, static shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moebal.backend import resolve_backend

__all__ = ["DispatchPlan", "build_plan", "DROP_POLICIES"]

DROP_POLICIES = ("position", "weight")


@dataclass(frozen=True)
class DispatchPlan:
    num_tokens: int  # T
    top_k: int  # K
    num_experts: int  # E
    capacity: int | None  # C, rows per expert; None = dropless
    counts_E: torch.Tensor  # int64 [E]  routed pairs per expert (before capacity)
    kept_E: torch.Tensor  # int64 [E]  pairs that got a row (= counts_E when dropless)
    starts_E: torch.Tensor  # int64 [E]  first row of each expert's group
    group_ends_E: torch.Tensor  # int32 [E]  end row of each group (grouped_mm ``offs``)
    row_of_pair_TK: torch.Tensor  # int64 [T, K]  row in xs of each pair, -1 = dropped
    pair_of_row_R: torch.Tensor  # int64 [R]  flat pair id t*K+k of each row, -1 = padding
    token_of_row_R: torch.Tensor  # int64 [R]  source token of each row, -1 = padding

    @property
    def num_rows(self) -> int:
        return self.pair_of_row_R.shape[0]

    @property
    def has_drops(self) -> bool:
        """True when rows can be missing (capacity set); a static property, no sync."""
        return self.capacity is not None

    def dropped_pairs(self) -> torch.Tensor:
        """Number of (token, slot) pairs dropped by the capacity, as a 0-d int64 tensor."""
        return (self.counts_E - self.kept_E).sum()


def _check_indices(indices_TK: torch.Tensor, num_experts: int) -> None:
    if not isinstance(indices_TK, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices_TK).__name__}")
    if indices_TK.dim() != 2:
        raise ValueError(f"indices must have shape [T, K], got {tuple(indices_TK.shape)}")
    if indices_TK.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices_TK.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def _check_capacity(capacity) -> None:
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int or None, got {capacity!r}")


def build_plan(
    indices_TK: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    weights_TK: torch.Tensor | None = None,
    drop_policy: str = "position",
    backend: str = "torch",
) -> DispatchPlan:
    """Group the routed pairs by expert.

    Args:
        indices_TK: int64/int32 ``[T, K]`` expert of each (token, slot); values in [0, E).
            Out-of-range values are not checked here (that would need a host sync); the
            public ``dispatch`` checks them.
        num_experts: E.
        capacity: rows per expert, or None (dropless).
        weights_TK: routing weights, needed only for ``drop_policy="weight"``.
        drop_policy: when an expert overflows its capacity, ``"position"`` keeps its
            earliest tokens (by token index), ``"weight"`` drops its lowest-weight pairs
            (ties: the later token is dropped; NaN weights rank below every number, -inf
            included, so they are dropped first).
        backend: ``"torch"`` (default), ``"auto"`` or ``"triton"``; when it resolves to
            Triton and the drop policy is ``"position"``, the plan is built on the device
            by ``moebal.triton_ops.triton_build_plan`` (same fields, bit for bit);
            ``"weight"`` drops are always built with the torch ops below.
    """
    _check_indices(indices_TK, num_experts)
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    _check_capacity(capacity)
    if backend != "torch" and drop_policy == "position" and resolve_backend(backend, indices_TK.device) == "triton":
        from moebal.triton_ops import triton_build_plan

        return triton_build_plan(indices_TK, num_experts, capacity)
    T, K = indices_TK.shape
    N, E, device = T * K, num_experts, indices_TK.device
    expert_N = indices_TK.reshape(-1).long()

    if capacity is not None and drop_policy == "weight":
        if weights_TK is None or weights_TK.shape != indices_TK.shape:
            raise ValueError("drop_policy='weight' needs weights_TK with the shape of indices_TK")
        # rank by weight, descending; NaN weights rank last (a NaN marks a broken token, never
        # one to keep over a finite pair); ties keep token order, so the later token is dropped
        w_N = weights_TK.detach().reshape(-1)
        nan_N = torch.isnan(w_N)
        by_weight_N = torch.sort(w_N.masked_fill(nan_N, 0.0), descending=True, stable=True).indices
        # one stable sort by (expert, is NaN) groups each expert's pairs, finite ones first
        key_N = (expert_N * 2 + nan_N)[by_weight_N]
        order_N = by_weight_N[torch.sort(key_N, stable=True).indices]
    else:
        # pairs are numbered token-major, so a stable sort keeps token order per expert
        order_N = torch.sort(expert_N, stable=True).indices
    expert_sorted_N = expert_N[order_N]

    counts_E = torch.zeros(E, dtype=torch.int64, device=device)
    counts_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    ends_E = torch.cumsum(counts_E, 0)
    first_E = ends_E - counts_E
    arange_N = torch.arange(N, device=device)

    if capacity is None:
        row_sorted_N = arange_N
        kept_E, starts_E, group_ends_E = counts_E, first_E, ends_E
        pair_of_row_R = order_N
        token_of_row_R = order_N // K
    else:
        rank_N = arange_N - first_E[expert_sorted_N]
        keep_N = rank_N < capacity
        R = E * capacity
        row_sorted_N = torch.where(keep_N, expert_sorted_N * capacity + rank_N, -1)
        kept_E = counts_E.clamp(max=capacity)
        starts_E = torch.arange(E, device=device) * capacity
        group_ends_E = starts_E + capacity
        # scatter into R+1 slots; dropped pairs land in the spare last slot, then cut off
        pair_of_row_R = torch.full((R + 1,), -1, dtype=torch.int64, device=device)
        pair_of_row_R.scatter_(0, torch.where(keep_N, row_sorted_N, R), order_N)
        pair_of_row_R = pair_of_row_R[:R]
        token_of_row_R = torch.where(pair_of_row_R >= 0, pair_of_row_R // K, -1)

    row_of_pair_N = torch.empty(N, dtype=torch.int64, device=device)
    row_of_pair_N.scatter_(0, order_N, row_sorted_N)
    return DispatchPlan(
        num_tokens=T,
        top_k=K,
        num_experts=E,
        capacity=capacity,
        counts_E=counts_E,
        kept_E=kept_E,
        starts_E=starts_E,
        group_ends_E=group_ends_E.to(torch.int32),
        row_of_pair_TK=row_of_pair_N.view(T, K),
        pair_of_row_R=pair_of_row_R,
        token_of_row_R=token_of_row_R,
    )
