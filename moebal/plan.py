"""DispatchPlan: where every routed (token, slot) pair goes, built once per forward.

Shape legend: T tokens, K top-k, E experts, N = T*K routed pairs, R rows of the
expert-contiguous buffer ``xs`` (R = N when dropless, R = E*C with a capacity C).

Layout of ``xs``: expert e owns rows ``[starts_E[e], group_ends_E[e])``. Dropless, the
groups are packed back to back and expert e's rows hold its tokens in token order.
With a capacity C, expert e owns the fixed block ``[e*C, (e+1)*C)``; its first
``kept_E[e]`` rows hold the kept tokens and the rest are padding (zero rows whose outputs
are never read). Everything is built with tensor ops: no host sync, static shapes.

Pairs without an expert: an index of -1 (a masked token, a null-expert pick, a replayed
"no expert"; any value outside [0, E) is treated the same, as only the public
``dispatch`` checks ranges) is never dispatched. It is not counted in ``counts_E`` or
``kept_E``, takes no capacity seat and gets no row (``row_of_pair_TK == -1``), so
``combine`` adds nothing for it and no gradient flows through it. Shapes stay static:
dropless R is still N, the V valid pairs fill rows ``[0, V)`` and the N - V rows after
them are padding (``pair_of_row_R == token_of_row_R == -1``). Those tail rows belong to
the last expert's group (``group_ends_E[E-1] = R`` always, while ``kept_E[E-1]`` counts
only its real rows), so the groups tile all R rows as grouped GEMM offsets expect and the
tail is handled like capacity padding: zero input rows, outputs never read, zero output
gradients. ``has_drops`` tells the gathers to skip row -1; it is exact on the CPU and
assumed (True) on other devices and under ``torch.compile``, where finding out would be a
host sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moebal.backend import resolve_backend

__all__ = ["DispatchPlan", "build_plan", "build_pair_plan", "slots_from_pairs", "DROP_POLICIES"]

# "position": earliest tokens kept; "weight": highest-weight pairs kept; "priority":
# V-MoE / LIMoE batch-priority routing (all slot-0 picks before slot-1 picks, then tokens
# by their largest routing weight)
DROP_POLICIES = ("position", "weight", "priority")


@dataclass(frozen=True)
class DispatchPlan:
    num_tokens: int  # T
    top_k: int  # K
    num_experts: int  # E
    capacity: int | None  # C, rows per expert; None = dropless
    counts_E: torch.Tensor  # int64 [E]  routed pairs per expert (before capacity; -1 pairs not counted)
    kept_E: torch.Tensor  # int64 [E]  pairs that got a row (= counts_E when dropless)
    starts_E: torch.Tensor  # int64 [E]  first row of each expert's group
    group_ends_E: torch.Tensor  # int32 [E]  end row of each group (grouped_mm ``offs``; last = R)
    row_of_pair_TK: torch.Tensor  # int64 [T, K]  row in xs of each pair, -1 = dropped or no expert
    pair_of_row_R: torch.Tensor  # int64 [R]  flat pair id t*K+k of each row, -1 = padding
    token_of_row_R: torch.Tensor  # int64 [R]  source token of each row, -1 = padding
    may_have_null_pairs: bool = False  # pairs with expert -1 may exist (exact on CPU, else assumed)
    # per expert (first row, rows in use, end of its block) as host ints, where the builder had them
    # (the decode step's host plan); None: read from the tensors when a path needs them
    host_bounds: list | None = field(default=None, compare=False, repr=False)

    @property
    def num_rows(self) -> int:
        return self.pair_of_row_R.shape[0]

    @property
    def has_drops(self) -> bool:
        """True when pairs can lack a row (a capacity, or pairs without an expert); static, no sync."""
        return self.capacity is not None or self.may_have_null_pairs

    def dropped_pairs(self) -> torch.Tensor:
        """Pairs dropped by the capacity as a 0-d int64 tensor (pairs without an expert are not counted)."""
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


def _may_have_null_pairs(indices_TK: torch.Tensor, num_experts: int) -> bool:
    """Whether some pair has no expert (an index outside [0, E)).

    Read exactly for eager CPU tensors, where it costs no device sync; assumed True on other
    devices and while compiling, so the gathers there always skip row -1.
    """
    if indices_TK.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    return bool(((indices_TK < 0) | (indices_TK >= num_experts)).any())


def _pair_order(group_N: torch.Tensor, weights_TK: torch.Tensor | None, drop_policy: str, K: int) -> torch.Tensor:
    """Pair ids sorted by group, and inside each group in the order seats are handed out.

    ``"position"``: token order. ``"weight"``: by the pair's weight, descending.
    ``"priority"``: by slot, then by the token's largest weight over its K slots,
    descending. Scores rank NaN last (below -inf); ties keep token order.
    """
    if drop_policy == "position" or K == 0:
        # pairs are numbered token-major, so a stable sort keeps token order per group
        return torch.sort(group_N, stable=True).indices
    w_TK = weights_TK.detach()
    if drop_policy == "weight":
        score_N = w_TK.reshape(-1)
    else:  # priority: slot first, so every top-1 pick outranks every top-2 pick
        score_N = w_TK.max(dim=1).values.unsqueeze(1).expand(-1, K).reshape(-1)
        slot_N = torch.arange(group_N.shape[0], device=group_N.device) % K
        group_N = group_N * K + slot_N
    nan_N = torch.isnan(score_N)
    by_score_N = torch.sort(score_N.masked_fill(nan_N, 0.0), descending=True, stable=True).indices
    # one stable sort by (group, is NaN) keeps the score order inside each group, finite scores first
    key_N = (group_N * 2 + nan_N)[by_score_N]
    return by_score_N[torch.sort(key_N, stable=True).indices]


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
        indices_TK: int64/int32 ``[T, K]`` expert of each (token, slot): in [0, E), or -1
            for a pair without an expert (never dispatched, see the module docstring).
            Ranges are not checked here (that would need a host sync): values outside
            [0, E) are all treated as -1. The public ``dispatch`` checks them.
        num_experts: E.
        capacity: rows per expert, or None (dropless).
        weights_TK: routing weights, needed only with a capacity and
            ``drop_policy="weight"`` or ``"priority"``.
        drop_policy: which pairs an overflowing expert keeps (dropless it changes nothing).
            ``"position"``: its earliest tokens (by token index). ``"weight"``: its
            highest-weight pairs (ties: the later token is dropped; NaN weights rank below
            every number, -inf included, so they are dropped first). ``"priority"``
            (V-MoE / LIMoE batch-priority routing): every slot-0 pair before any slot-1
            pair, and within a slot the tokens by priority, their largest weight over the K
            slots (``weights_TK.max(dim=1)``, -1 slots included; NaN ranks last), ties to
            the lower token index.
        backend: ``"torch"`` (default), ``"auto"`` or ``"triton"``; when it resolves to
            Triton and the plan is dropless or its drop policy is ``"position"``, the plan
            is built on the device by ``moebal.triton_ops.triton_build_plan`` (same fields,
            bit for bit); ``"weight"`` and ``"priority"`` drops are built by the torch ops below.
    """
    _check_indices(indices_TK, num_experts)
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    _check_capacity(capacity)
    ranked = capacity is not None and drop_policy != "position"
    if ranked and (not isinstance(weights_TK, torch.Tensor) or weights_TK.shape != indices_TK.shape):
        raise ValueError(f"drop_policy={drop_policy!r} needs weights_TK with the shape of indices_TK")
    if backend != "torch" and not ranked and resolve_backend(backend, indices_TK.device) == "triton":
        from moebal.triton_ops import triton_build_plan

        return triton_build_plan(indices_TK, num_experts, capacity)
    T, K = indices_TK.shape
    N, E, device = T * K, num_experts, indices_TK.device
    expert_N = indices_TK.reshape(-1).long()
    if capacity is None:
        lean = _lean_dropless_plan(expert_N, T, K, E)
        if lean is not None:
            return lean
    # pairs without an expert go to a spare group E, sorted after every real group
    group_N = torch.where((expert_N >= 0) & (expert_N < E), expert_N, E)
    order_N = _pair_order(group_N, weights_TK, drop_policy if ranked else "position", K)
    group_sorted_N = group_N[order_N]

    counts_E1 = torch.zeros(E + 1, dtype=torch.int64, device=device)
    counts_E1.scatter_add_(0, group_N, torch.ones_like(group_N))
    ends_E1 = torch.cumsum(counts_E1, 0)
    first_E1 = ends_E1 - counts_E1
    counts_E = counts_E1[:E]
    arange_N = torch.arange(N, device=device)

    if capacity is None:
        # the valid pairs fill rows [0, V) in group order; rows [V, N) are padding that the
        # last group owns, so the group ends tile all R = N rows
        keep_N = group_sorted_N < E
        row_sorted_N = torch.where(keep_N, arange_N, -1)
        kept_E, starts_E = counts_E, first_E1[:E]
        group_ends_E = ends_E1[:E].clone()
        group_ends_E[E - 1] = N
        pair_of_row_R = torch.where(keep_N, order_N, -1)
    else:
        rank_N = arange_N - first_E1[group_sorted_N]
        keep_N = (group_sorted_N < E) & (rank_N < capacity)
        R = E * capacity
        row_sorted_N = torch.where(keep_N, group_sorted_N * capacity + rank_N, -1)
        kept_E = counts_E.clamp(max=capacity)
        starts_E = torch.arange(E, device=device) * capacity
        group_ends_E = starts_E + capacity
        # scatter into R+1 slots; dropped pairs land in the spare last slot, then cut off
        pair_of_row_R = torch.full((R + 1,), -1, dtype=torch.int64, device=device)
        pair_of_row_R.scatter_(0, torch.where(keep_N, row_sorted_N, R), order_N)
        pair_of_row_R = pair_of_row_R[:R]
    token_of_row_R = torch.where(pair_of_row_R >= 0, pair_of_row_R // max(K, 1), -1)

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
        may_have_null_pairs=_may_have_null_pairs(indices_TK, E),
    )


def _lean_dropless_plan(expert_N: torch.Tensor, T: int, K: int, E: int) -> DispatchPlan | None:
    """The dropless plan in a dozen ops when every pair has an expert, else None.

    Eager CPU only, where the two host reads that prove it (the smallest index, and a
    ``bincount`` no longer than E) cost no device sync. Field for field equal to the general
    construction below, which spends most of its ~35 ops on pairs without an expert: with
    none, the rows are the stable sort of the pairs by expert and nothing is padding. A
    decode step's plan is op-bound (N = T*K of a few dozen pairs), so the count matters.
    """
    N = expert_N.shape[0]
    if N == 0 or expert_N.device.type != "cpu" or torch.compiler.is_compiling() or int(expert_N.min()) < 0:
        return None
    counts_E = torch.bincount(expert_N, minlength=E)
    if counts_E.shape[0] != E:  # an index >= E: a pair without an expert
        return None
    order_N = torch.sort(expert_N, stable=True).indices
    ends_E = torch.cumsum(counts_E, 0)
    row_of_pair_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(N))  # the inverse permutation
    return DispatchPlan(
        num_tokens=T, top_k=K, num_experts=E, capacity=None, counts_E=counts_E, kept_E=counts_E,
        starts_E=ends_E - counts_E, group_ends_E=ends_E.to(torch.int32), row_of_pair_TK=row_of_pair_N.view(T, K),
        pair_of_row_R=order_N, token_of_row_R=order_N // K, may_have_null_pairs=False,
    )


# --- plans from (token, expert) pairs: a variable number of experts per token ---------------
#
# Expert choice, Expert-Threshold and other pair-based routings give a token 0..E experts.
# Their N pairs are laid out token-major as slots ``[T, W]`` (W = the largest number of
# pairs any token has, or a static bound such as E when the exact width would need a host
# read; unused slots are -1) and the plan keeps R = N rows, not T*W: dispatch stays one
# gather of x rows and combine a padded per-token gather of the token's W slots in slot
# order, summed in a fixed order (no atomics, deterministic) by the same code as top-k.


def slots_from_pairs(
    tokens_N: torch.Tensor, experts_N: torch.Tensor, num_tokens: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay N (token, expert) pairs out as per-token slots.

    Args:
        tokens_N: int64 ``[N]`` token of each pair, in [0, T); -1 = a pair to skip.
        experts_N: int64 ``[N]`` expert of each pair (no token may hold an expert twice).
        num_tokens: T.
        width: W, slots per token; None = the largest pair count of a token (read on the
            host: exact, a device sync off the CPU, not under ``torch.compile``). A token
            with more than W pairs raises nothing but loses its pairs beyond W, so pass a
            true bound (E, for distinct experts).

    Returns:
        ``(indices_TW, pair_of_slot_TW)``: int64 ``[T, W]`` expert of each slot and the
        pair it came from, both -1 for an unused slot; a token's slots hold its pairs by
        increasing expert index.
    """
    if tokens_N.shape != experts_N.shape or tokens_N.dim() != 1:
        raise ValueError(f"tokens and experts must be 1-D of one shape, got {tuple(tokens_N.shape)} and {tuple(experts_N.shape)}")
    T, device = num_tokens, tokens_N.device
    valid_N = (tokens_N >= 0) & (tokens_N < T)
    token_N = torch.where(valid_N, tokens_N, T)  # skipped pairs sort into a spare token T
    by_expert_N = torch.sort(experts_N, stable=True).indices
    order_N = by_expert_N[torch.sort(token_N[by_expert_N], stable=True).indices]
    counts_T1 = torch.zeros(T + 1, dtype=torch.int64, device=device).scatter_add_(0, token_N, torch.ones_like(token_N))
    if width is None:
        width = int(counts_T1[:T].max()) if T > 0 else 0
    first_T1 = torch.cumsum(counts_T1, 0) - counts_T1
    token_sorted_N = token_N[order_N]
    rank_N = torch.arange(order_N.shape[0], device=device) - first_T1[token_sorted_N]
    keep_N = (token_sorted_N < T) & (rank_N < width)
    spare = T * width  # dropped pairs land in one spare slot, then cut off
    slot_N = torch.where(keep_N, token_sorted_N * width + rank_N, spare)
    pair_of_slot = torch.full((spare + 1,), -1, dtype=torch.int64, device=device).scatter_(0, slot_N, order_N)
    pair_of_slot_TW = pair_of_slot[:spare].view(T, width)
    indices_TW = torch.where(pair_of_slot_TW >= 0, experts_N.long()[pair_of_slot_TW.clamp(min=0)], -1)
    return indices_TW, pair_of_slot_TW


def build_pair_plan(indices_TW: torch.Tensor, num_experts: int, num_rows: int | None = None) -> DispatchPlan:
    """A dropless plan for per-token slots (see ``slots_from_pairs``) with only ``num_rows`` rows.

    Args:
        indices_TW: int64 ``[T, W]`` expert of each slot, -1 = unused.
        num_experts: E.
        num_rows: R, at least the number V of used slots (expert choice: E*C); None = V,
            read on the host (exact; a device sync off the CPU). Rows ``[V, R)`` are
            padding owned by the last expert, as in a dropless top-k plan. Too small an R
            is not checked (it would need a host read) and loses the pairs past it.

    The plan is the dropless top-k plan of ``indices_TW`` cut to R rows: the same fields
    with ``top_k = W``, so the torch and Triton dispatch/combine run it unchanged.
    """
    _check_indices(indices_TW, num_experts)
    plan = build_plan(indices_TW, num_experts)
    if num_rows is None:
        num_rows = int(plan.counts_E.sum())
    if isinstance(num_rows, bool) or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")
    N = plan.pair_of_row_R.shape[0]
    if num_rows >= N:  # nothing to cut (R = T*W is the plain dropless plan)
        return plan
    group_ends_E = plan.group_ends_E.clone()
    group_ends_E[-1] = num_rows
    valid_TW = plan.row_of_pair_TK < num_rows  # pairs past R (an R below V) lose their row
    return DispatchPlan(
        num_tokens=plan.num_tokens,
        top_k=plan.top_k,
        num_experts=num_experts,
        capacity=None,
        counts_E=plan.counts_E,
        kept_E=plan.kept_E,
        starts_E=plan.starts_E,
        group_ends_E=group_ends_E,
        row_of_pair_TK=torch.where(valid_TW, plan.row_of_pair_TK, -1),
        pair_of_row_R=plan.pair_of_row_R[:num_rows],
        token_of_row_R=plan.token_of_row_R[:num_rows],
        may_have_null_pairs=True,
    )
