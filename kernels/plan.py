"""Routing metadata on the device: group the routed (token, slot) pairs by expert.

Shape legend: T tokens, K top-k, E experts, N = T*K pairs (numbered p = t*K + k),
B = cdiv(N, BLOCK_N) blocks of pairs, R rows of the expert-contiguous buffer
(R = N dropless, R = E*C with a capacity C).

Three launches, no host sync, no atomics, so the result is the same bit for bit on every
run and equals a stable sort of the pairs by expert:

1. ``_expert_histogram_kernel``: per block of pairs, how many go to each expert.
2. ``_expert_offsets_kernel``: one program scans the histograms over blocks (exclusive
   prefix sum per expert) and over experts (group starts), and writes counts/kept/starts.
3. ``_pair_rows_kernel``: each pair's rank inside its expert is its block's offset plus
   the number of earlier pairs of the same expert in the block (a scan over the block),
   so equal experts keep token order; from the rank it writes the pair's row and, for
   kept pairs, the inverse maps row -> pair and row -> token.

With a capacity C, expert e owns rows [e*C, (e+1)*C); pairs of rank >= C are dropped
(row -1), so the earliest tokens are kept; unused rows stay -1 (padding).
Expert ids outside [0, E) (-1: a pair without an expert) are neither counted nor given a
row (row -1). Dropless, the V valid pairs fill rows [0, V) and rows [V, N) stay padding;
the last group's end is N all the same, so the group ends tile all R rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import check_launchable, next_pow2

__all__ = ["RoutingMetadata", "routing_metadata"]


@triton.jit
def _expert_histogram_kernel(experts_ptr, hist_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    # hist[b, e] = #{p in block b : expert[p] == e}
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ex = tl.load(experts_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
    for e0 in range(0, E, BLOCK_E):
        e_idx = e0 + tl.arange(0, BLOCK_E)
        hit = (ex[:, None] == e_idx[None, :]).to(tl.int32)
        tl.store(hist_ptr + pid * E + e_idx, tl.sum(hit, axis=0), mask=e_idx < E)


@triton.jit
def _expert_offsets_kernel(
    hist_ptr,
    block_off_ptr,
    counts_ptr,
    kept_ptr,
    starts_ptr,
    ends_ptr,
    NUM_BLOCKS,
    N,
    E,
    CAPACITY,
    HAS_CAPACITY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # block_off[b, e] = sum_{b' < b} hist[b', e];  counts[e] = sum_b hist[b, e];
    # starts[e] = sum_{e' < e} counts[e'] (dropless) or e*C;  kept = min(counts, C);
    # ends = starts + counts (dropless; the last end is N) or starts + C
    e_idx = tl.arange(0, BLOCK_E)
    e_mask = e_idx < E
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b0 in range(0, NUM_BLOCKS, BLOCK_B):
        b_idx = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        mask = (b_idx < NUM_BLOCKS)[:, None] & e_mask[None, :]
        offs = b_idx[:, None] * E + e_idx[None, :]
        h = tl.load(hist_ptr + offs, mask=mask, other=0)
        inclusive = tl.cumsum(h, axis=0)
        tl.store(block_off_ptr + offs, carry[None, :] + inclusive - h, mask=mask)
        carry += tl.sum(h, axis=0)
    counts = carry.to(tl.int64)
    if HAS_CAPACITY:
        kept = tl.minimum(counts, CAPACITY)
        starts = e_idx.to(tl.int64) * CAPACITY
        ends = starts + CAPACITY
    else:
        kept = counts
        ends = tl.cumsum(counts, axis=0)
        starts = ends - counts
        ends = tl.where(e_idx == E - 1, N, ends)  # rows of pairs without an expert: padding of the last group
    tl.store(counts_ptr + e_idx, counts, mask=e_mask)
    tl.store(kept_ptr + e_idx, kept, mask=e_mask)
    tl.store(starts_ptr + e_idx, starts, mask=e_mask)
    tl.store(ends_ptr + e_idx, ends.to(tl.int32), mask=e_mask)


@triton.jit
def _pair_rows_kernel(
    experts_ptr,
    block_off_ptr,
    starts_ptr,
    row_of_pair_ptr,
    pair_of_row_ptr,
    token_of_row_ptr,
    N,
    E,
    K,
    CAPACITY,
    HAS_CAPACITY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # rank(p) = block_off[b, e_p] + #{q < p in block b : e_q == e_p};
    # row(p) = starts[e_p] + rank(p)  (capacity: e_p*C + rank(p), or -1 when rank(p) >= C)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs < N
    ex = tl.load(experts_ptr + offs, mask=in_range, other=-1).to(tl.int32)
    valid = in_range & (ex >= 0) & (ex < E)
    local = tl.zeros([BLOCK_N], dtype=tl.int32)
    for e0 in range(0, E, BLOCK_E):
        e_idx = e0 + tl.arange(0, BLOCK_E)
        hit = (ex[:, None] == e_idx[None, :]).to(tl.int32)
        local += tl.sum(hit * (tl.cumsum(hit, axis=0) - 1), axis=1)
    ex = tl.where(valid, ex, 0)
    rank = tl.load(block_off_ptr + pid * E + ex, mask=valid, other=0) + local
    if HAS_CAPACITY:
        keep = valid & (rank < CAPACITY)
        row = ex.to(tl.int64) * CAPACITY + rank
    else:
        keep = valid
        row = tl.load(starts_ptr + ex, mask=valid, other=0) + rank
    row = tl.where(keep, row, -1)
    tl.store(row_of_pair_ptr + offs, row, mask=in_range)
    tl.store(pair_of_row_ptr + row, offs, mask=keep)
    tl.store(token_of_row_ptr + row, offs // K, mask=keep)


@dataclass(frozen=True)
class RoutingMetadata:
    counts_E: torch.Tensor  # int64 [E]  routed pairs per expert (before capacity)
    kept_E: torch.Tensor  # int64 [E]  pairs that got a row
    starts_E: torch.Tensor  # int64 [E]  first row of each expert's group
    group_ends_E: torch.Tensor  # int32 [E]  end row of each group
    row_of_pair_TK: torch.Tensor  # int64 [T, K]  row of each pair, -1 = dropped
    pair_of_row_R: torch.Tensor  # int64 [R]  pair t*K+k of each row, -1 = padding
    token_of_row_R: torch.Tensor  # int64 [R]  token of each row, -1 = padding


def routing_metadata(
    indices_TK: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    *,
    block_n: int | None = None,
    block_e: int | None = None,
) -> RoutingMetadata:
    """Group the routed pairs by expert (stable in token order), on the device.

    Args:
        indices_TK: int32/int64 ``[T, K]`` expert id of each (token, slot), in ``[0, E)``,
            or -1 (any value outside: a pair without an expert, not counted, no row).
        num_experts: E (python int >= 1).
        capacity: C rows per expert (python int >= 0) or None for dropless; with C the
            earliest tokens of an overflowing expert are kept.
        block_n: pairs per program (power of two); default from the device.
        block_e: experts per scan chunk (power of two); default from the device.

    Returns:
        ``RoutingMetadata`` with R = T*K rows dropless (padding after the valid pairs, in
        the last group), E*C rows with a capacity.
    """
    if indices_TK.dim() != 2 or indices_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be an int32/int64 [T, K] tensor, got {indices_TK.dtype} {tuple(indices_TK.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be >= 0 or None, got {capacity}")
    check_launchable(_pair_rows_kernel, indices_TK)
    T, K = indices_TK.shape
    N, E, device = T * K, num_experts, indices_TK.device
    on_gpu = device.type == "cuda"
    if block_e is None:
        block_e = min(next_pow2(E), 64 if on_gpu else 32)
    if block_n is None:
        block_n = max(32, 8192 // block_e) if on_gpu else 64
    num_blocks = triton.cdiv(N, block_n)
    R = N if capacity is None else E * capacity
    experts_N = indices_TK.contiguous().view(-1)

    i64 = dict(dtype=torch.int64, device=device)
    counts_E = torch.empty(E, **i64)
    kept_E = torch.empty(E, **i64)
    starts_E = torch.empty(E, **i64)
    group_ends_E = torch.empty(E, dtype=torch.int32, device=device)
    row_of_pair_N = torch.empty(N, **i64)
    pair_of_row_R = torch.full((R,), -1, **i64)
    token_of_row_R = torch.full((R,), -1, **i64)
    hist_BE = torch.empty((num_blocks, E), dtype=torch.int32, device=device)
    block_off_BE = torch.empty_like(hist_BE)

    has_cap = capacity is not None
    cap = 0 if capacity is None else int(capacity)
    if num_blocks > 0:
        _expert_histogram_kernel[(num_blocks,)](experts_N, hist_BE, N, E, BLOCK_N=block_n, BLOCK_E=block_e)
    e_all = next_pow2(E)
    _expert_offsets_kernel[(1,)](
        hist_BE, block_off_BE, counts_E, kept_E, starts_E, group_ends_E, num_blocks, N, E, cap,
        HAS_CAPACITY=has_cap, BLOCK_B=min(max(1, 4096 // e_all), next_pow2(num_blocks)), BLOCK_E=e_all,
    )
    if num_blocks > 0:
        _pair_rows_kernel[(num_blocks,)](
            experts_N, block_off_BE, starts_E, row_of_pair_N, pair_of_row_R, token_of_row_R,
            N, E, K, cap, HAS_CAPACITY=has_cap, BLOCK_N=block_n, BLOCK_E=block_e,
        )
    return RoutingMetadata(
        counts_E=counts_E,
        kept_E=kept_E,
        starts_E=starts_E,
        group_ends_E=group_ends_E,
        row_of_pair_TK=row_of_pair_N.view(T, K),
        pair_of_row_R=pair_of_row_R,
        token_of_row_R=token_of_row_R,
    )
