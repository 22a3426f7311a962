"""dispatch / combine: move token rows into expert-contiguous order and back.

Shape legend: T tokens, D model dim, K top-k, E experts, R rows of ``xs`` (see plan.py).

The pure-torch twins below are the CPU path and the oracle the Triton kernels are tested
against. Both directions are gathers (no ``index_add_``, no atomics), so results are
deterministic; combine accumulates the weighted sum over K in fp32.

Under ``torch.compile`` the autograd Functions run straight-line twins (``_*_graph``): the
eager code's token-chunk loops and ``out=`` buffers would make dynamo read the token count
as a Python int (one graph per T, even with ``dynamic=True``), and the compiler fuses the
gathers with the multiply-adds anyway.
"""
from __future__ import annotations


import torch

from moebal.backend import resolve_backend
from moebal.plan import DispatchPlan, build_plan
from moebal.workspace import empty_buffer

__all__ = ["dispatch", "combine", "dispatch_rows", "combine_rows"]


def _gather_rows(src_RD: torch.Tensor, rows: torch.Tensor, may_skip: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """``src[rows]`` with rows == -1 giving zero rows (only checked when ``may_skip``).

    Written into ``out`` when given, else into a pooled buffer (see ``empty_buffer``).
    """
    rows = rows.reshape(-1)
    if out is None:
        out = empty_buffer((rows.shape[0], src_RD.shape[1]), src_RD.dtype, src_RD.device)
    if src_RD.shape[0] == 0:  # no source rows: every row is padding (-1)
        return out.zero_()
    torch.index_select(src_RD, 0, rows.clamp(min=0) if may_skip else rows, out=out)
    if may_skip:
        out.masked_fill_((rows < 0).unsqueeze(-1), 0)
    return out


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, the input's own for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


# Token-chunked loops keep their gather scratch (chunk x K x D) cache-resident instead of
# materialising a [T, K, D] copy of ys; about 2 MiB of scratch per chunk.
_CHUNK_BYTES = 1 << 21


def _token_chunk(T: int, K: int, D: int, dtype: torch.dtype) -> int:
    itemsize = _acc(dtype).itemsize
    return max(1, min(T, _CHUNK_BYTES // max(1, K * D * itemsize)))


def _gather_pairs_acc(src_RD, rows_nK, pad, scratch, scratch_acc):
    """``src[rows]`` for a chunk of tokens as ``[n, K, D]`` in the accumulation dtype."""
    n, K = rows_nK.shape
    g = _gather_rows(src_RD, rows_nK, pad, out=scratch[: n * K])
    if scratch_acc is not None:
        g = scratch_acc[: n * K].copy_(g)
    return g.view(n, K, src_RD.shape[1])


def _pair_scratch(src_RD, T, K, acc: torch.dtype | None = None):
    D, dtype = src_RD.shape[1], src_RD.dtype
    acc = _acc(dtype) if acc is None else acc
    c = _token_chunk(T, K, D, dtype)
    scratch = empty_buffer((c * K, D), dtype, src_RD.device)
    scratch_acc = empty_buffer((c * K, D), acc, src_RD.device) if acc != dtype else None
    return c, scratch, scratch_acc


def _combine_fwd(ys_RD, weights_TK, plan: DispatchPlan):
    T, K = plan.row_of_pair_TK.shape
    D, dtype, acc = ys_RD.shape[1], ys_RD.dtype, _acc(ys_RD.dtype)
    y_TD = empty_buffer((T, D), dtype, ys_RD.device)
    if T == 0:
        return y_TD
    w_TK1 = weights_TK.to(acc).unsqueeze(1)
    c, scratch, scratch_acc = _pair_scratch(ys_RD, T, K)
    y_acc = empty_buffer((c, D), acc, ys_RD.device) if acc != dtype else None
    for t0 in range(0, T, c):
        t1 = min(T, t0 + c)
        g_nKD = _gather_pairs_acc(ys_RD, plan.row_of_pair_TK[t0:t1], plan.has_drops, scratch, scratch_acc)
        out = y_TD[t0:t1] if y_acc is None else y_acc[: t1 - t0]
        torch.bmm(w_TK1[t0:t1], g_nKD, out=out.unsqueeze(1))
        if y_acc is not None:
            y_TD[t0:t1].copy_(out)
    return y_TD


def _combine_small(ys_RD, weights_TK, plan: DispatchPlan):
    """``_combine_fwd`` of a batch that fits one token chunk and has no row -1, in 3-5 ops.

    The same gather, fp32 copy and ``bmm`` (so the same values), into fresh tensors
    instead of pooled scratch: at decode sizes (a few tokens) the op count is the cost.
    """
    T, K = plan.row_of_pair_TK.shape
    dtype, acc = ys_RD.dtype, _acc(ys_RD.dtype)
    g_NKD = ys_RD.index_select(0, plan.row_of_pair_TK.reshape(-1)).view(T, K, ys_RD.shape[1])
    y_T1D = torch.bmm(weights_TK.to(acc).unsqueeze(1), g_NKD.to(acc))
    return y_T1D.view(T, ys_RD.shape[1]).to(dtype)


def _combine_bwd(grad_y_TD, ys_RD, weights_TK, plan: DispatchPlan):
    T, K = plan.row_of_pair_TK.shape
    pad = plan.has_drops
    acc = _acc(ys_RD.dtype)
    # d ys[r] = w[pair(r)] * dy[token(r)]: a gather, each row written once; the in-place
    # multiply by the fp32 weight computes in fp32 and rounds once
    w_R1 = _gather_rows(weights_TK.reshape(-1, 1).to(acc), plan.pair_of_row_R, pad)  # [R, 1], padding rows 0
    dtype = ys_RD.dtype
    grad_ys = _gather_rows(grad_y_TD.to(dtype), plan.token_of_row_R, pad)
    if acc == dtype:
        grad_ys.mul_(w_R1)
    else:  # by row chunks through an fp32 scratch: a mixed-dtype in-place mul is ~50x slower
        R, D = grad_ys.shape
        c = max(1, min(R, _CHUNK_BYTES // max(1, D * 4)))
        scratch_acc = empty_buffer((c, D), acc, ys_RD.device)
        for r0 in range(0, R, c):
            r1 = min(R, r0 + c)
            g = scratch_acc[: r1 - r0].copy_(grad_ys[r0:r1])
            grad_ys[r0:r1].copy_(g.mul_(w_R1[r0:r1]))
    if pad:
        grad_ys.masked_fill_((plan.pair_of_row_R < 0).unsqueeze(-1), 0)
    # d w[t,k] = <dy[t], ys[row(t,k)]>
    grad_w_TK = torch.empty((T, K), dtype=acc, device=ys_RD.device)
    if T:
        dy_TD1 = grad_y_TD.to(acc).unsqueeze(1)
        c, scratch, scratch_acc = _pair_scratch(ys_RD, T, K)
        for t0 in range(0, T, c):
            t1 = min(T, t0 + c)
            g_nKD = _gather_pairs_acc(ys_RD, plan.row_of_pair_TK[t0:t1], pad, scratch, scratch_acc)
            # multiply + sum: a [K, D] @ [D, 1] bmm per token runs ~5x slower
            torch.sum(g_nKD.mul_(dy_TD1[t0:t1]), dim=-1, out=grad_w_TK[t0:t1])
    return grad_ys, grad_w_TK.to(weights_TK.dtype)


def _dispatch_bwd(grad_xs_RD, plan: DispatchPlan):
    """``dx[t] = sum_k dxs[row(t,k)]`` (dropped pairs add 0), summed in the accumulation dtype."""
    T, K = plan.row_of_pair_TK.shape
    D, dtype, acc = grad_xs_RD.shape[1], grad_xs_RD.dtype, _acc(grad_xs_RD.dtype)
    grad_x_TD = empty_buffer((T, D), dtype, grad_xs_RD.device)
    if T == 0:
        return grad_x_TD
    if K <= 2:  # at most one addition per token: a half-dtype add computes it in fp32 and rounds
        acc = dtype  # once, so fp32 scratch copies (about half the time at K = 2) would change nothing
    c, scratch, scratch_acc = _pair_scratch(grad_xs_RD, T, K, acc)
    sum_acc = empty_buffer((c, D), acc, grad_xs_RD.device) if acc != dtype else None
    for t0 in range(0, T, c):
        t1 = min(T, t0 + c)
        g_nKD = _gather_pairs_acc(grad_xs_RD, plan.row_of_pair_TK[t0:t1], plan.has_drops, scratch, scratch_acc)
        out = grad_x_TD[t0:t1] if sum_acc is None else sum_acc[: t1 - t0]
        if K == 1:
            out.copy_(g_nKD[:, 0])
        elif K == 2:  # a plain add: ~2x faster than a half-dtype sum over the middle dim
            torch.add(g_nKD[:, 0], g_nKD[:, 1], out=out)
        else:
            torch.sum(g_nKD, dim=1, out=out)
        if sum_acc is not None:
            grad_x_TD[t0:t1].copy_(out)
    return grad_x_TD


# --- torch.compile twins: no loops over T, no out= buffers, no size-0 branches ------------


def _gather_rows_graph(src_RD: torch.Tensor, rows: torch.Tensor, may_skip: bool) -> torch.Tensor:
    """``src[rows]`` with rows == -1 giving zero rows (only checked when ``may_skip``)."""
    rows = rows.reshape(-1)
    if not may_skip:
        return src_RD.index_select(0, rows)
    out = src_RD.index_select(0, rows.clamp(min=0))
    return out.masked_fill((rows < 0).unsqueeze(-1), 0)


def _combine_fwd_graph(ys_RD, weights_TK, plan: DispatchPlan):
    T, K = plan.row_of_pair_TK.shape
    acc = _acc(ys_RD.dtype)
    g_TKD = _gather_rows_graph(ys_RD, plan.row_of_pair_TK, plan.has_drops).to(acc).view(T, K, ys_RD.shape[1])
    return torch.bmm(weights_TK.to(acc).unsqueeze(1), g_TKD).squeeze(1).to(ys_RD.dtype)


def _combine_bwd_graph(grad_y_TD, ys_RD, weights_TK, plan: DispatchPlan):
    T, K = plan.row_of_pair_TK.shape
    pad, dtype, acc = plan.has_drops, ys_RD.dtype, _acc(ys_RD.dtype)
    w_R1 = _gather_rows_graph(weights_TK.reshape(-1, 1).to(acc), plan.pair_of_row_R, pad)  # padding rows 0
    grad_ys = (_gather_rows_graph(grad_y_TD.to(dtype), plan.token_of_row_R, pad).to(acc) * w_R1).to(dtype)
    g_TKD = _gather_rows_graph(ys_RD, plan.row_of_pair_TK, pad).to(acc).view(T, K, ys_RD.shape[1])
    grad_w_TK = (g_TKD * grad_y_TD.to(acc).unsqueeze(1)).sum(dim=-1)
    return grad_ys, grad_w_TK.to(weights_TK.dtype)


def _dispatch_bwd_graph(grad_xs_RD, plan: DispatchPlan):
    T, K = plan.row_of_pair_TK.shape
    dtype = grad_xs_RD.dtype
    g_TKD = _gather_rows_graph(grad_xs_RD, plan.row_of_pair_TK, plan.has_drops).view(T, K, grad_xs_RD.shape[1])
    return g_TKD.to(_acc(dtype)).sum(dim=1).to(dtype)


class _TorchDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, plan):
        ctx.plan = plan
        if torch.compiler.is_compiling():
            return _gather_rows_graph(x_TD, plan.token_of_row_R, plan.has_drops)
        return _gather_rows(x_TD, plan.token_of_row_R, plan.has_drops)

    @staticmethod
    def backward(ctx, grad_xs_RD):
        if torch.compiler.is_compiling():
            return _dispatch_bwd_graph(grad_xs_RD, ctx.plan), None
        return _dispatch_bwd(grad_xs_RD.contiguous(), ctx.plan), None


class _TorchCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys_RD, weights_TK, plan):
        ctx.plan = plan
        ctx.save_for_backward(ys_RD, weights_TK)
        if torch.compiler.is_compiling():
            return _combine_fwd_graph(ys_RD, weights_TK, plan)
        return _combine_fwd(ys_RD.contiguous(), weights_TK, plan)

    @staticmethod
    def backward(ctx, grad_y_TD):
        ys_RD, weights_TK = ctx.saved_tensors
        if torch.compiler.is_compiling():
            return (*_combine_bwd_graph(grad_y_TD, ys_RD, weights_TK, ctx.plan), None)
        grad_ys, grad_w = _combine_bwd(grad_y_TD.contiguous(), ys_RD.contiguous(), weights_TK, ctx.plan)
        return grad_ys, grad_w, None


def _check_x(x_TD: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x_TD, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x_TD).__name__}")
    if not x_TD.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x_TD.dtype}")
    if x_TD.dim() != 2:
        raise ValueError(f"{name} must have shape [T, D], got {tuple(x_TD.shape)}")


def dispatch_rows(x_TD: torch.Tensor, plan: DispatchPlan, backend: str = "auto") -> torch.Tensor:
    """Gather ``x`` rows into the plan's expert-contiguous order: ``xs [R, D]``."""
    _check_x(x_TD)
    if x_TD.shape[0] != plan.num_tokens:
        raise ValueError(f"x has {x_TD.shape[0]} rows but the plan was built for {plan.num_tokens} tokens")
    if resolve_backend(backend, x_TD.device) == "triton":
        from moebal.triton_ops import triton_dispatch

        return triton_dispatch(x_TD, plan)
    if not _needs_graph(x_TD):  # no gradient: the forward alone, without autograd.Function's bookkeeping
        return _gather_rows(x_TD, plan.token_of_row_R, plan.has_drops)
    return _TorchDispatch.apply(x_TD, plan)


def combine_rows(ys_RD: torch.Tensor, plan: DispatchPlan, weights_TK: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``y[t] = sum_k weights[t,k] * ys[row(t,k)]`` (fp32 accumulation; dropped pairs and pairs
    without an expert, row -1, add 0 and get a zero weight gradient)."""
    _check_x(ys_RD, "ys")
    if ys_RD.shape[0] != plan.num_rows:
        raise ValueError(f"ys has {ys_RD.shape[0]} rows but the plan has {plan.num_rows}")
    if not isinstance(weights_TK, torch.Tensor) or weights_TK.shape != plan.row_of_pair_TK.shape:
        shape = tuple(weights_TK.shape) if isinstance(weights_TK, torch.Tensor) else type(weights_TK).__name__
        raise ValueError(f"weights must have shape {tuple(plan.row_of_pair_TK.shape)}, got {shape}")
    if resolve_backend(backend, ys_RD.device) == "triton":
        from moebal.triton_ops import triton_combine

        return triton_combine(ys_RD, plan, weights_TK)
    if not _needs_graph(ys_RD, weights_TK):
        small = not plan.has_drops and plan.num_tokens <= _token_chunk(*plan.row_of_pair_TK.shape, ys_RD.shape[1], ys_RD.dtype)
        return (_combine_small if small else _combine_fwd)(ys_RD.contiguous(), weights_TK, plan)
    return _TorchCombine.apply(ys_RD, weights_TK, plan)


def _needs_graph(*tensors: torch.Tensor) -> bool:
    """Whether the autograd Function must run: a gradient can flow, or torch.compile traces it."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def dispatch(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    backend: str = "auto",
    *,
    weights: torch.Tensor | None = None,
    drop_policy: str = "position",
    validate: bool = True,
) -> tuple[torch.Tensor, DispatchPlan]:
    """Group the rows of ``x [T, D]`` by expert.

    Args:
        x: ``[T, D]`` float tensor.
        indices: int ``[T, K]`` expert ids in ``[0, num_experts)``, or -1 for a pair without
            an expert (a masked token, a null-expert pick): it gets no row, takes no
            capacity seat and contributes zero in ``combine`` (see ``moebal.plan``).
        num_experts: E.
        capacity: integer rows per expert, or None for dropless. On overflow the earliest
            tokens are kept (``drop_policy="position"``), the lowest-weight pairs dropped
            (``"weight"``) or the pairs kept by slot, then by the token's largest weight
            (``"priority"``, batch-priority routing); the last two need ``weights``.
            Dropped pairs contribute zero in ``combine``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check index range (one host sync): values below -1 or at least
            ``num_experts`` raise ``ValueError``; layers that produce their own indices skip it.

    Returns:
        ``(xs [R, D], plan)``; differentiable with respect to ``x``.
    """
    _check_x(x)
    from moebal.plan import _check_indices

    _check_indices(indices, num_experts)
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} rows but x has {x.shape[0]}")
    if validate and indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"indices must lie in [0, {num_experts}) or be -1 (no expert), got {bad} (values span [{lo}, {hi}])"
            )
    plan = build_plan(indices, num_experts, capacity, weights, drop_policy, backend=backend)
    return dispatch_rows(x, plan, backend), plan


def combine(ys: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Weighted sum over the K expert outputs of each token, back in token order ``[T, D]``."""
    return combine_rows(ys, plan, weights, backend)
