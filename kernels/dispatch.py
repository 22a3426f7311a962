"""Dispatch: gather token rows into expert-contiguous order, and its backward.

Shape legend: T tokens, D model dim, K top-k, R rows of ``xs``.

Forward is a row gather ``xs[r] = x[token(r)]`` (padding rows, token -1, are written as
zeros). Backward is a gather-and-sum over each token's K rows
``grad_x[t] = sum_k grad_xs[row(t, k)]``, which is ``combine`` with unit weights, so it
reuses the combine kernel: no scatter, no atomics, deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_launchable, row_tile
from .combine import combine_rows

__all__ = ["dispatch_rows", "dispatch_rows_backward"]


@triton.jit
def _dispatch_rows_kernel(
    x_ptr,
    token_of_row_ptr,
    xs_ptr,
    R,
    D,
    stride_x,
    stride_xs,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # xs[r, :] = x[token(r), :]  (zeros where token(r) = -1)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    tok = tl.load(token_of_row_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    has_src = tok >= 0
    tok = tl.where(has_src, tok, 0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        v = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=has_src[:, None] & col_mask[None, :], other=0.0)
        tl.store(xs_ptr + rows[:, None] * stride_xs + cols[None, :], v, mask=row_mask[:, None] & col_mask[None, :])


def dispatch_rows(
    x_TD: torch.Tensor,
    token_of_row_R: torch.Tensor,
    *,
    block_rows: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """Gather rows: ``xs[r] = x[token_of_row[r]]``, zero rows where the token is -1.

    Args:
        x_TD: ``[T, D]`` float tensor (any float dtype; rows must have unit column stride).
        token_of_row_R: int64 ``[R]`` source token of each row in ``[0, T)``, or -1.
        block_rows, block_d: tile (powers of two); defaults from the device.

    Returns:
        ``xs [R, D]`` with the dtype of ``x``.
    """
    if x_TD.dim() != 2:
        raise ValueError(f"x must be [T, D], got {tuple(x_TD.shape)}")
    if token_of_row_R.dim() != 1 or token_of_row_R.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_of_row must be an int [R] tensor, got {token_of_row_R.dtype} {tuple(token_of_row_R.shape)}")
    check_launchable(_dispatch_rows_kernel, x_TD, token_of_row_R)
    if x_TD.stride(-1) != 1:
        x_TD = x_TD.contiguous()
    token_of_row_R = token_of_row_R.contiguous()
    R, D = token_of_row_R.shape[0], x_TD.shape[1]
    xs_RD = torch.empty((R, D), dtype=x_TD.dtype, device=x_TD.device)
    if R == 0 or D == 0:
        return xs_RD
    br, bd, warps = row_tile(R, D, x_TD.device, block_rows, block_d)
    _dispatch_rows_kernel[(triton.cdiv(R, br),)](
        x_TD, token_of_row_R, xs_RD, R, D, x_TD.stride(0), xs_RD.stride(0),
        BLOCK_R=br, BLOCK_D=bd, num_warps=warps,
    )
    return xs_RD


def dispatch_rows_backward(
    grad_xs_RD: torch.Tensor,
    row_of_pair_TK: torch.Tensor,
    *,
    block_rows: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """``grad_x[t] = sum_k grad_xs[row_of_pair[t, k]]`` (fp32 sum, fp64 for fp64; row -1 adds 0).

    Args:
        grad_xs_RD: ``[R, D]`` float gradient of ``xs``.
        row_of_pair_TK: int64 ``[T, K]`` row of each pair, -1 = dropped.
        block_rows, block_d: tile (powers of two); defaults from the device.

    Returns:
        ``grad_x [T, D]`` with the dtype of ``grad_xs``.
    """
    return combine_rows(grad_xs_RD, row_of_pair_TK, None, block_rows=block_rows, block_d=block_d)
