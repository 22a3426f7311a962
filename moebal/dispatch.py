"""dispatch / combine: move token rows into expert-contiguous order and back.

Shape legend: T tokens, D model dim, K top-k, E experts, R rows of ``xs`` (see plan.py).

The pure-torch twins below are the CPU path and the oracle the Triton kernels are tested
against. Both directions are gathers (no ``index_add_``, no atomics), so results are
deterministic; combine accumulates the weighted sum over K in fp32.
"""
from __future__ import annotations

import torch

from moebal.backend import resolve_backend
from moebal.plan import DispatchPlan, build_plan

__all__ = ["dispatch", "combine", "dispatch_rows", "combine_rows"]


def _gather_rows(src_RD: torch.Tensor, rows: torch.Tensor, may_skip: bool) -> torch.Tensor:
    """``src[rows]`` with rows == -1 giving zero rows (only checked when ``may_skip``)."""
    out = src_RD.index_select(0, rows.clamp(min=0).reshape(-1))
    if may_skip:
        out = out.masked_fill((rows.reshape(-1) < 0).unsqueeze(-1), 0)
    return out


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, the input's own for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def _combine_fwd(ys_RD, weights_TK, plan: DispatchPlan):
    T, K = plan.row_of_pair_TK.shape
    acc = _acc(ys_RD.dtype)
    g_TKD = _gather_rows(ys_RD, plan.row_of_pair_TK, plan.has_drops).view(T, K, -1)
    y_T1D = torch.bmm(weights_TK.to(acc).unsqueeze(1), g_TKD.to(acc))
    return y_T1D.squeeze(1).to(ys_RD.dtype)


def _combine_bwd(grad_y_TD, ys_RD, weights_TK, plan: DispatchPlan):
    T, K = plan.row_of_pair_TK.shape
    pad = plan.has_drops
    acc = _acc(ys_RD.dtype)
    # d ys[r] = w[pair(r)] * dy[token(r)]: a gather, each row written once
    w_R = _gather_rows(weights_TK.reshape(-1, 1), plan.pair_of_row_R, pad).squeeze(-1)
    dy_RD = _gather_rows(grad_y_TD, plan.token_of_row_R, pad)
    grad_ys = (dy_RD.to(acc) * w_R.to(acc).unsqueeze(-1)).to(ys_RD.dtype)
    # d w[t,k] = <dy[t], ys[row(t,k)]>
    g_TKD = _gather_rows(ys_RD, plan.row_of_pair_TK, pad).view(T, K, -1)
    grad_w = torch.bmm(g_TKD.to(acc), grad_y_TD.to(acc).unsqueeze(-1)).squeeze(-1)
    return grad_ys, grad_w.to(weights_TK.dtype)


class _TorchDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, plan):
        ctx.plan = plan
        return _gather_rows(x_TD, plan.token_of_row_R, plan.has_drops)

    @staticmethod
    def backward(ctx, grad_xs_RD):
        plan = ctx.plan
        T, K = plan.row_of_pair_TK.shape
        g_TKD = _gather_rows(grad_xs_RD.contiguous(), plan.row_of_pair_TK, plan.has_drops)
        return g_TKD.view(T, K, -1).sum(dim=1, dtype=_acc(grad_xs_RD.dtype)).to(grad_xs_RD.dtype), None


class _TorchCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys_RD, weights_TK, plan):
        ctx.plan = plan
        ctx.save_for_backward(ys_RD, weights_TK)
        return _combine_fwd(ys_RD, weights_TK, plan)

    @staticmethod
    def backward(ctx, grad_y_TD):
        ys_RD, weights_TK = ctx.saved_tensors
        grad_ys, grad_w = _combine_bwd(grad_y_TD.contiguous(), ys_RD, weights_TK, ctx.plan)
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
    return _TorchDispatch.apply(x_TD, plan)


def combine_rows(ys_RD: torch.Tensor, plan: DispatchPlan, weights_TK: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``y[t] = sum_k weights[t,k] * ys[row(t,k)]`` (fp32 accumulation; dropped pairs add 0)."""
    _check_x(ys_RD, "ys")
    if ys_RD.shape[0] != plan.num_rows:
        raise ValueError(f"ys has {ys_RD.shape[0]} rows but the plan has {plan.num_rows}")
    if not isinstance(weights_TK, torch.Tensor) or weights_TK.shape != plan.row_of_pair_TK.shape:
        shape = tuple(weights_TK.shape) if isinstance(weights_TK, torch.Tensor) else type(weights_TK).__name__
        raise ValueError(f"weights must have shape {tuple(plan.row_of_pair_TK.shape)}, got {shape}")
    if resolve_backend(backend, ys_RD.device) == "triton":
        from moebal.triton_ops import triton_combine

        return triton_combine(ys_RD, plan, weights_TK)
    return _TorchCombine.apply(ys_RD, weights_TK, plan)


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
        indices: int ``[T, K]`` expert ids in ``[0, num_experts)``.
        num_experts: E.
        capacity: integer rows per expert, or None for dropless. On overflow the earliest
            tokens are kept (``drop_policy="position"``) or the lowest-weight pairs dropped
            (``"weight"``, needs ``weights``); dropped pairs contribute zero in ``combine``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        validate: check index range (one host sync); layers that produce their own
            indices skip it.

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
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"indices must lie in [0, {num_experts}), got values in [{lo}, {hi}]")
    plan = build_plan(indices, num_experts, capacity, weights, drop_policy, backend=backend)
    return dispatch_rows(x, plan, backend), plan


def combine(ys: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Weighted sum over the K expert outputs of each token, back in token order ``[T, D]``."""
    return combine_rows(ys, plan, weights, backend)
