"""Grouped GEMM over expert-contiguous rows, with the row gather fused in, and its weight gradient.

Shape legend: T rows of ``a`` (tokens), R output rows (rows of the expert-contiguous
buffer), E groups (experts), K reduction dim (here the inner GEMM dim, not top-k),
N output width.

``grouped_gemm`` computes ``out[r] = a[src(r)] @ w[e(r)]`` where e(r) owns row r: group e
holds rows ``[ends[e-1], ends[e])``. With ``src`` (gather mode) the rows of ``a`` are read
by index, so the gathered ``[R, K]`` buffer is never written; without it ``src(r) = r``
(a plain grouped GEMM). Rows with ``src(r) = -1`` and rows past a group's ``rows_used``
(capacity padding) come out as zeros; a tile made only of such rows skips its K loop.

Tiling: each program owns a BLOCK_M x BLOCK_N output tile whose BLOCK_M rows lie inside one
group. Group e has ``cdiv(size_e, BLOCK_M)`` row tiles, and the row tiles of all groups are
numbered one after the other. Row tile i finds its group from the group ends on the
device: with ``tile_ends = cumsum(cdiv(size, BLOCK_M))`` its group is
``#{e : tile_ends[e] <= i}`` (a count over E, in BLOCK_E chunks) and its place inside the
group is ``i - tile_ends[e-1]``. So the launch needs no host sync: the grid is sized for
the bound ``cdiv(R, BLOCK_M) + E`` row tiles (the sum of per-group ceilings cannot exceed
it) and the surplus programs return at once. The 1-D grid walks GROUP_M row tiles down
each column tile before moving to the next GROUP_M, so the gathered rows and the weight
columns that a wave of programs reads stay in L2.

``grouped_gemm_wgrad`` computes ``grad_w[e] = a[src(rows of e)]^T @ g[rows of e]``: one
program per (K tile, N tile, group) walks its group's rows in BLOCK_M steps, so empty
groups get zeros. Both kernels accumulate in fp32 in a fixed order and use no atomics:
results are the same bit for bit on every run.

On the CPU (``TRITON_INTERPRET=1``) the interpreter's ``tl.dot`` is wrong for bf16/fp16
tiles, so the launchers there ask the kernels to cast tiles to fp32 before the dot
(``DOT_FP32``); bf16 products are exact in fp32, so the math is the same as on a GPU,
where the half-precision tiles go to the tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import _is_interpreted, check_launchable, next_pow2

__all__ = ["grouped_gemm", "grouped_gemm_wgrad"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _find_tile(group_ends_ptr, tile, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(group, first row tile of the group) for row tile ``tile``; group = E past the last tile."""
    # tiles_e = cdiv(end_e - start_e, BLOCK_M);  group = #{e : sum_{e' <= e} tiles_e' <= tile}
    group = tl.zeros((), dtype=tl.int32)
    first_tile = tl.zeros((), dtype=tl.int32)
    carry = tl.zeros((), dtype=tl.int32)
    for e0 in range(0, E, BLOCK_E):
        e_idx = e0 + tl.arange(0, BLOCK_E)
        e_mask = e_idx < E
        end = tl.load(group_ends_ptr + e_idx, mask=e_mask, other=0)
        start = tl.load(group_ends_ptr + e_idx - 1, mask=e_mask & (e_idx > 0), other=0)
        tiles = tl.where(e_mask, (end - start + BLOCK_M - 1) // BLOCK_M, 0)
        before = e_mask & (carry + tl.cumsum(tiles, axis=0) <= tile)
        group += tl.sum(before.to(tl.int32), axis=0)
        first_tile += tl.sum(tl.where(before, tiles, 0), axis=0)
        carry += tl.sum(tiles, axis=0)
    return group, first_tile


@triton.jit
def _group_rows(group_ends_ptr, rows_used_ptr, e, HAS_USED: tl.constexpr):
    """(first row, rows in use) of group ``e``, both int64."""
    end = tl.load(group_ends_ptr + e).to(tl.int64)
    start = tl.load(group_ends_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
    if HAS_USED:
        used = tl.minimum(tl.load(rows_used_ptr + e).to(tl.int64), end - start)
    else:
        used = end - start
    return start, used


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    src_ptr,
    w_ptr,
    group_ends_ptr,
    rows_used_ptr,
    out_ptr,
    E,
    N,
    K,
    num_tiles_m,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    GATHER: tl.constexpr,
    HAS_USED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # out[r, :] = a[src(r), :] @ w[e(r)]  (src(r) = r without GATHER; zeros where src(r) = -1 or r is padding)
    # program -> (row tile, column tile): GROUP_M row tiles per column tile, group after group (L2 reuse)
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_tiles_m - first_m, GROUP_M)
    tile = first_m + (pid % per_group) % group_m
    pid_n = ((pid % per_group) // group_m).to(tl.int64)
    e, first_tile = _find_tile(group_ends_ptr, tile, E, BLOCK_M, BLOCK_E)
    if e >= E:  # surplus program of the bounded grid
        return
    e = e.to(tl.int64)
    start, used = _group_rows(group_ends_ptr, rows_used_ptr, e, HAS_USED)
    row0 = start + (tile - first_tile).to(tl.int64) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    in_group = rows < tl.load(group_ends_ptr + e).to(tl.int64)
    valid = rows < start + used
    if GATHER:
        src = tl.load(src_ptr + rows, mask=valid, other=-1).to(tl.int64)
        valid = valid & (src >= 0)
        src = tl.where(valid, src, 0)
    else:
        src = tl.where(valid, rows, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :].to(tl.int64) * stride_ak
    w_ptrs = w_ptr + e * stride_we + ks[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_stop = tl.where(row0 < start + used, K, 0)  # all-padding tile: no K loop
    for k0 in range(0, k_stop, BLOCK_K):
        k_mask = ks < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=in_group[:, None] & col_mask[None, :],
    )


@triton.jit
def _grouped_gemm_wgrad_kernel(
    a_ptr,
    src_ptr,
    g_ptr,
    group_ends_ptr,
    rows_used_ptr,
    out_ptr,
    N,
    K,
    stride_am,
    stride_ak,
    stride_gm,
    stride_gn,
    stride_oe,
    stride_ok,
    stride_on,
    GATHER: tl.constexpr,
    HAS_USED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[e, :, :] = sum_{r in group e, r used} a[src(r), :]^T g[r, :]  (zeros for an empty group)
    pid_k = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64)
    start, used = _group_rows(group_ends_ptr, rows_used_ptr, e, HAS_USED)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(0, used, BLOCK_M):
        rows = start + m0 + tl.arange(0, BLOCK_M)
        valid = rows < start + used
        if GATHER:
            src = tl.load(src_ptr + rows, mask=valid, other=-1).to(tl.int64)
            valid = valid & (src >= 0)
            src = tl.where(valid, src, 0)
        else:
            src = tl.where(valid, rows, 0)
        a_t = tl.load(
            a_ptr + src[None, :] * stride_am + ks[:, None] * stride_ak,
            mask=k_mask[:, None] & valid[None, :],
            other=0.0,
        )
        g = tl.load(
            g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn,
            mask=valid[:, None] & col_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            a_t = a_t.to(tl.float32)
            g = g.to(tl.float32)
        acc = tl.dot(a_t, g, acc, input_precision=INPUT_PRECISION)
    tl.store(
        out_ptr + e * stride_oe + ks[:, None] * stride_ok + cols[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=k_mask[:, None] & col_mask[None, :],
    )


# --------------------------------------------------------------------------- launchers


def _launch_options(kernel, dtype: torch.dtype, device: torch.device) -> dict:
    """``DOT_FP32`` (interpreter with half tiles) and ``INPUT_PRECISION`` (fp32 follows torch's TF32 flag)."""
    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return dict(
        DOT_FP32=_is_interpreted(kernel) and dtype != torch.float32,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
    )


def _tiles(device: torch.device, dtype: torch.dtype, M_hint: int, N: int, K: int, wgrad: bool):
    """Default ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``.

    CUDA: 128x128 output tiles, 64-deep K steps for half types (64x64x32 for fp32, whose
    IEEE dot runs on the CUDA cores). CPU interpreter: small tiles capped by the sizes,
    since every program is a numpy round trip.
    """
    if device.type == "cuda":
        if dtype == torch.float32:
            bm, bn, bk, warps = 64, 64, 32, 4
        elif wgrad:  # BLOCK_K is the output height here, BLOCK_M the row step
            bm, bn, bk, warps = 64, 128, 128, 8
        else:
            bm, bn, bk, warps = 128, 128, 64, 8
        return bm, bn, bk, warps, 3
    cap = lambda n, hi: max(16, min(next_pow2(n), hi))  # noqa: E731
    return cap(M_hint, 32), cap(N, 64), cap(K, 64), 4, 1


def _check_float(t: torch.Tensor, name: str, dims: int, layout: str, like: torch.Tensor | None = None) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    if like is None and t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match a dtype {like.dtype}")


def _maps(kernel, group_ends_E, src_R, rows_used_E, *tensors):
    """Check the row maps and devices; ``(ends, src, used)`` as the kernels take them.

    Unused maps are replaced by ``ends`` (never read: ``GATHER`` / ``HAS_USED`` are off).
    """
    ints = (torch.int32, torch.int64)
    if group_ends_E.dim() != 1 or group_ends_E.dtype != torch.int32:
        raise ValueError(f"group_ends must be an int32 [E] tensor, got {group_ends_E.dtype} {tuple(group_ends_E.shape)}")
    if src_R is not None and (src_R.dim() != 1 or src_R.dtype not in ints):
        raise ValueError(f"src must be an int [R] tensor, got {src_R.dtype} {tuple(src_R.shape)}")
    if rows_used_E is not None and (rows_used_E.shape != group_ends_E.shape or rows_used_E.dtype not in ints):
        raise ValueError(f"rows_used must be an int tensor of shape {tuple(group_ends_E.shape)}, "
                         f"got {rows_used_E.dtype} {tuple(rows_used_E.shape)}")
    extra = tuple(t for t in (src_R, rows_used_E) if t is not None)
    check_launchable(kernel, *tensors, group_ends_E, *extra)
    ends = group_ends_E.contiguous()
    src = src_R.contiguous() if src_R is not None else ends
    used = rows_used_E.contiguous() if rows_used_E is not None else ends
    return ends, src, used


def _tile_args(defaults, block_m, block_n, block_k) -> tuple[int, int, int]:
    bm, bn, bk = (v if v is not None else d for v, d in zip((block_m, block_n, block_k), defaults))
    for name, v in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    return bm, bn, bk


def grouped_gemm(
    a_TK: torch.Tensor,
    w_EKN: torch.Tensor,
    group_ends_E: torch.Tensor,
    src_R: torch.Tensor | None = None,
    rows_used_E: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    block_e: int | None = None,
) -> torch.Tensor:
    """``out[r] = a[src[r]] @ w[e(r)]`` for the rows ``[ends[e-1], ends[e])`` of each group e.

    Args:
        a_TK: ``[T, K]`` fp32/bf16/fp16 source rows (any strides). Without ``src`` its rows
            are the output rows (T = R).
        w_EKN: ``[E, K, N]`` weights, the dtype of ``a`` (any strides: a transposed view
            ``w.transpose(1, 2)`` gives ``a @ w[e]^T``).
        group_ends_E: int32 ``[E]`` inclusive cumulative row ends (non-decreasing, last = R).
        src_R: int32/int64 ``[R]`` source row in ``a`` of each output row, -1 = zero row;
            None = no gather (``src[r] = r``).
        rows_used_E: int ``[E]`` rows of each group that hold data (e.g. the plan's
            ``kept_E``); the rest of the group comes out zero without being computed.
            None = every row of the group.
        block_m, block_n, block_k: tile (powers of two >= 16); defaults from the device.
        block_e: groups per chunk of the tile -> group search (power of two; default
            ``min(next_pow2(E), 256)``).

    Returns:
        ``out [R, N]`` in the dtype of ``a``, accumulated in fp32.
    """
    _check_float(a_TK, "a", 2, "[rows, K]")
    _check_float(w_EKN, "w", 3, "[E, K, N]", like=a_TK)
    ends, src, used = _maps(_grouped_gemm_kernel, group_ends_E, src_R, rows_used_E, a_TK, w_EKN)
    if a_TK.shape[1] != w_EKN.shape[1]:
        raise ValueError(f"a has K = {a_TK.shape[1]} columns but w is {tuple(w_EKN.shape)} ([E, K, N])")
    if w_EKN.shape[0] != group_ends_E.shape[0]:
        raise ValueError(f"w has {w_EKN.shape[0]} groups but group_ends has {group_ends_E.shape[0]}")
    E, K, N = w_EKN.shape
    R = a_TK.shape[0] if src_R is None else src_R.shape[0]
    out_RN = torch.empty((R, N), dtype=a_TK.dtype, device=a_TK.device)
    if R == 0 or N == 0:
        return out_RN
    if K == 0 or E == 0:
        return out_RN.zero_()
    *defaults, warps, stages = _tiles(a_TK.device, a_TK.dtype, triton.cdiv(R, E), N, K, wgrad=False)
    bm, bn, bk = _tile_args(defaults, block_m, block_n, block_k)
    be = min(next_pow2(E), 256) if block_e is None else block_e
    if be < 1 or be & (be - 1):
        raise ValueError(f"block_e must be a power of two, got {be}")
    num_tiles_m = triton.cdiv(R, bm) + E  # >= sum_e cdiv(size_e, bm); the surplus returns at once
    _grouped_gemm_kernel[(num_tiles_m * triton.cdiv(N, bn),)](
        a_TK, src, w_EKN, ends, used, out_RN, E, N, K, num_tiles_m,
        a_TK.stride(0), a_TK.stride(1), w_EKN.stride(0), w_EKN.stride(1), w_EKN.stride(2),
        out_RN.stride(0), out_RN.stride(1),
        GATHER=src_R is not None, HAS_USED=rows_used_E is not None,
        **_launch_options(_grouped_gemm_kernel, a_TK.dtype, a_TK.device),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=be, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return out_RN


def grouped_gemm_wgrad(
    a_TK: torch.Tensor,
    g_RN: torch.Tensor,
    group_ends_E: torch.Tensor,
    src_R: torch.Tensor | None = None,
    rows_used_E: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """``grad_w[e] = a[src[rows of e]]^T @ g[rows of e]``: the weight gradient of ``grouped_gemm``.

    Args:
        a_TK: ``[T, K]`` fp32/bf16/fp16 forward input rows (any strides).
        g_RN: ``[R, N]`` gradient of the output, the dtype of ``a``.
        group_ends_E: int32 ``[E]`` inclusive cumulative row ends.
        src_R: int32/int64 ``[R]`` source row in ``a`` of each row (-1 adds nothing), or
            None for ``src[r] = r``.
        rows_used_E: int ``[E]`` rows of each group that hold data, or None (all).
        block_m: rows per step; block_k, block_n: output tile (powers of two >= 16).

    Returns:
        ``grad_w [E, K, N]`` in the dtype of ``a``, accumulated in fp32; zero for groups
        without rows.
    """
    _check_float(a_TK, "a", 2, "[rows, K]")
    _check_float(g_RN, "g", 2, "[R, N]", like=a_TK)
    ends, src, used = _maps(_grouped_gemm_wgrad_kernel, group_ends_E, src_R, rows_used_E, a_TK, g_RN)
    R = a_TK.shape[0] if src_R is None else src_R.shape[0]
    if g_RN.shape[0] != R:
        raise ValueError(f"g has {g_RN.shape[0]} rows but there are {R} rows (a without src, else src)")
    E, K, N = group_ends_E.shape[0], a_TK.shape[1], g_RN.shape[1]
    out_EKN = torch.empty((E, K, N), dtype=a_TK.dtype, device=a_TK.device)
    if E == 0 or K == 0 or N == 0:
        return out_EKN
    if R == 0:
        return out_EKN.zero_()
    *defaults, warps, stages = _tiles(a_TK.device, a_TK.dtype, triton.cdiv(R, E), N, K, wgrad=True)
    bm, bn, bk = _tile_args(defaults, block_m, block_n, block_k)
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn), E)
    _grouped_gemm_wgrad_kernel[grid](
        a_TK, src, g_RN, ends, used, out_EKN, N, K,
        a_TK.stride(0), a_TK.stride(1), g_RN.stride(0), g_RN.stride(1),
        out_EKN.stride(0), out_EKN.stride(1), out_EKN.stride(2),
        GATHER=src_R is not None, HAS_USED=rows_used_E is not None,
        **_launch_options(_grouped_gemm_wgrad_kernel, a_TK.dtype, a_TK.device),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )
    return out_EKN
