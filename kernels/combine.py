"""Combine: weighted sum of each token's K expert rows, and its one-pass backward.

Shape legend: T tokens, D model dim, K top-k, R rows of ``ys``.

Every program owns BLOCK_T tokens and walks D in BLOCK_D chunks; for each chunk it
gathers the K expert rows of its tokens and accumulates in fp32 (fp64 for fp64 inputs),
so ``y`` is written once, nothing of size (T, K, D) is materialised and no atomics are
used. The backward program
reads ``dy`` once per chunk, writes the K gradient rows ``w * dy`` and accumulates the K
dot products ``<dy, ys[row]>`` for the router-weight gradient in the same pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_launchable, next_pow2, row_tile

__all__ = ["combine_rows", "combine_rows_backward", "zero_padding_rows"]


@triton.jit
def _combine_rows_kernel(
    ys_ptr,
    row_of_pair_ptr,
    weights_ptr,
    y_ptr,
    T,
    D,
    stride_ys,
    stride_y,
    K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # y[t, :] = sum_k w[t, k] * ys[row(t, k), :]  (w = 1 without weights; row -1 adds 0; sum in ACC)
    pid = tl.program_id(0).to(tl.int64)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < T
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
        for k in tl.static_range(K):
            row = tl.load(row_of_pair_ptr + tok * K + k, mask=tok_mask, other=-1).to(tl.int64)
            has_row = row >= 0
            row = tl.where(has_row, row, 0)
            v = tl.load(
                ys_ptr + row[:, None] * stride_ys + cols[None, :],
                mask=has_row[:, None] & col_mask[None, :],
                other=0.0,
            ).to(ACC)
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + tok * K + k, mask=tok_mask, other=0.0).to(ACC)
                v = v * w[:, None]
            acc += v
        tl.store(
            y_ptr + tok[:, None] * stride_y + cols[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=tok_mask[:, None] & col_mask[None, :],
        )


@triton.jit
def _combine_backward_kernel(
    dy_ptr,
    ys_ptr,
    row_of_pair_ptr,
    weights_ptr,
    grad_ys_ptr,
    grad_w_ptr,
    T,
    D,
    stride_dy,
    stride_ys,
    stride_gys,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grad_ys[row(t, k), :] = w[t, k] * dy[t, :];  grad_w[t, k] = <dy[t, :], ys[row(t, k), :]>  (row -1: 0; math in ACC)
    pid = tl.program_id(0).to(tl.int64)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < T
    slot = tl.arange(0, K_PAD)
    dots = tl.zeros([BLOCK_T, K_PAD], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        dy = tl.load(
            dy_ptr + tok[:, None] * stride_dy + cols[None, :],
            mask=tok_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(ACC)
        for k in tl.static_range(K):
            row = tl.load(row_of_pair_ptr + tok * K + k, mask=tok_mask, other=-1).to(tl.int64)
            has_row = row >= 0
            row = tl.where(has_row, row, 0)
            mask = has_row[:, None] & col_mask[None, :]
            w = tl.load(weights_ptr + tok * K + k, mask=tok_mask, other=0.0).to(ACC)
            tl.store(
                grad_ys_ptr + row[:, None] * stride_gys + cols[None, :],
                (dy * w[:, None]).to(grad_ys_ptr.dtype.element_ty),
                mask=mask,
            )
            v = tl.load(ys_ptr + row[:, None] * stride_ys + cols[None, :], mask=mask, other=0.0).to(ACC)
            dots += tl.where(slot[None, :] == k, tl.sum(dy * v, axis=1)[:, None], 0.0)
    tl.store(
        grad_w_ptr + tok[:, None] * K + slot[None, :],
        dots.to(grad_w_ptr.dtype.element_ty),
        mask=tok_mask[:, None] & (slot < K)[None, :],
    )


@triton.jit
def _zero_padding_rows_kernel(out_ptr, pair_of_row_ptr, R, D, stride_out, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[r, :] = 0 where pair(r) = -1  (other rows untouched)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    pad = tl.load(pair_of_row_ptr + rows, mask=rows < R, other=0) < 0
    zeros = tl.zeros([BLOCK_R, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], zeros, mask=pad[:, None] & (cols < D)[None, :])


def _check_rows(row_of_pair_TK: torch.Tensor, weights_TK: torch.Tensor | None) -> None:
    if row_of_pair_TK.dim() != 2 or row_of_pair_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_of_pair must be an int [T, K] tensor, got {row_of_pair_TK.dtype} {tuple(row_of_pair_TK.shape)}")
    if weights_TK is not None and weights_TK.shape != row_of_pair_TK.shape:
        raise ValueError(f"weights must have shape {tuple(row_of_pair_TK.shape)}, got {tuple(weights_TK.shape)}")


def _acc(dtype: torch.dtype):
    """Accumulation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def combine_rows(
    ys_RD: torch.Tensor,
    row_of_pair_TK: torch.Tensor,
    weights_TK: torch.Tensor | None,
    *,
    block_rows: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """``y[t] = sum_k weights[t, k] * ys[row_of_pair[t, k]]``; row -1 adds 0.

    Sums in fp32 (fp64 when ``ys`` is fp64), rounds once to the dtype of ``ys``.

    Args:
        ys_RD: ``[R, D]`` float tensor (rows with unit column stride).
        row_of_pair_TK: int64 ``[T, K]`` row of each (token, slot), -1 = dropped.
        weights_TK: float ``[T, K]`` (any float dtype), or None for unit weights.
        block_rows: tokens per program; block_d: columns per chunk (powers of two).

    Returns:
        ``y [T, D]`` with the dtype of ``ys``.
    """
    _check_rows(row_of_pair_TK, weights_TK)
    extra = () if weights_TK is None else (weights_TK,)
    check_launchable(_combine_rows_kernel, ys_RD, row_of_pair_TK, *extra)
    ys_RD = _rowwise(ys_RD)
    row_of_pair_TK = row_of_pair_TK.contiguous()
    T, K = row_of_pair_TK.shape
    D = ys_RD.shape[1]
    y_TD = torch.empty((T, D), dtype=ys_RD.dtype, device=ys_RD.device)
    if T == 0 or D == 0:
        return y_TD
    if K == 0:
        return y_TD.zero_()
    w = row_of_pair_TK if weights_TK is None else weights_TK.contiguous()  # unread without weights
    bt, bd, warps = row_tile(T, D, ys_RD.device, block_rows, block_d)
    _combine_rows_kernel[(triton.cdiv(T, bt),)](
        ys_RD, row_of_pair_TK, w, y_TD, T, D, ys_RD.stride(0), y_TD.stride(0),
        K=K, HAS_WEIGHTS=weights_TK is not None, ACC=_acc(ys_RD.dtype), BLOCK_T=bt, BLOCK_D=bd, num_warps=warps,
    )
    return y_TD


def zero_padding_rows(out_RD: torch.Tensor, pair_of_row_R: torch.Tensor, *, block_rows: int | None = None, block_d: int | None = None) -> None:
    """In place: ``out[r] = 0`` for every row whose pair is -1.

    Args:
        out_RD: ``[R, D]`` float tensor with unit column stride, written in place.
        pair_of_row_R: int64 ``[R]`` pair of each row, -1 = padding.
        block_rows: rows per program; block_d: columns per chunk (powers of two).
    """
    check_launchable(_zero_padding_rows_kernel, out_RD, pair_of_row_R)
    R, D = out_RD.shape
    if R == 0 or D == 0:
        return
    br, bd, warps = row_tile(R, D, out_RD.device, block_rows, block_d)
    _zero_padding_rows_kernel[(triton.cdiv(R, br),)](
        out_RD, pair_of_row_R.contiguous(), R, D, out_RD.stride(0), BLOCK_R=br, BLOCK_D=bd, num_warps=warps
    )


def combine_rows_backward(
    grad_y_TD: torch.Tensor,
    ys_RD: torch.Tensor,
    row_of_pair_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    pair_of_row_R: torch.Tensor | None = None,
    *,
    block_rows: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients of ``combine_rows`` in one pass over ``dy``.

    Args:
        grad_y_TD: ``[T, D]`` float gradient of ``y``.
        ys_RD: ``[R, D]`` float expert outputs saved from the forward.
        row_of_pair_TK: int64 ``[T, K]`` row of each pair, -1 = dropped.
        weights_TK: float ``[T, K]`` routing weights.
        pair_of_row_R: int64 ``[R]`` pair of each row (-1 = padding), needed only when
            some rows have no pair (a capacity); those rows of ``grad_ys`` are zeroed.
            None means every row belongs to a pair.
        block_rows: tokens per program; block_d: columns per chunk (powers of two).

    Returns:
        ``(grad_ys [R, D] in the dtype of ys, grad_w [T, K] in the dtype of weights)`` with
        ``grad_ys[row(t, k)] = w[t, k] * dy[t]`` and ``grad_w[t, k] = <dy[t], ys[row(t, k)]>``
        (fp32 math, fp64 for fp64 ys; 0 for dropped pairs).
    """
    _check_rows(row_of_pair_TK, weights_TK)
    check_launchable(_combine_backward_kernel, grad_y_TD, ys_RD, row_of_pair_TK, weights_TK)
    if grad_y_TD.shape[0] != row_of_pair_TK.shape[0] or grad_y_TD.shape[1] != ys_RD.shape[1]:
        raise ValueError(f"grad_y {tuple(grad_y_TD.shape)} does not match ys {tuple(ys_RD.shape)} and rows {tuple(row_of_pair_TK.shape)}")
    grad_y_TD, ys_RD = _rowwise(grad_y_TD), _rowwise(ys_RD)
    row_of_pair_TK, weights_TK = row_of_pair_TK.contiguous(), weights_TK.contiguous()
    T, K = row_of_pair_TK.shape
    R, D = ys_RD.shape
    grad_ys_RD = torch.empty((R, D), dtype=ys_RD.dtype, device=ys_RD.device)
    grad_w_TK = torch.zeros((T, K), dtype=weights_TK.dtype, device=ys_RD.device)
    if pair_of_row_R is not None:
        zero_padding_rows(grad_ys_RD, pair_of_row_R, block_rows=block_rows, block_d=block_d)
    if T == 0 or K == 0 or D == 0:
        return grad_ys_RD, grad_w_TK
    bt, bd, warps = row_tile(T, D, ys_RD.device, block_rows, block_d)
    _combine_backward_kernel[(triton.cdiv(T, bt),)](
        grad_y_TD, ys_RD, row_of_pair_TK, weights_TK, grad_ys_RD, grad_w_TK, T, D,
        grad_y_TD.stride(0), ys_RD.stride(0), grad_ys_RD.stride(0),
        K=K, K_PAD=next_pow2(K), ACC=_acc(ys_RD.dtype), BLOCK_T=bt, BLOCK_D=bd, num_warps=warps,
    )
    return grad_ys_RD, grad_w_TK
