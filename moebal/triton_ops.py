"""Differentiable Triton dispatch/combine and the device-side plan builder.

Shape legend: T tokens, D model dim, K top-k, E experts, R rows of ``xs`` (see plan.py).

Each autograd Function here has its pure-torch twin in ``moebal.dispatch``
(``_TritonDispatch`` ~ ``_TorchDispatch``, ``_TritonCombine`` ~ ``_TorchCombine``) and
``triton_build_plan`` returns the same ``DispatchPlan`` as ``build_plan`` (dropless or
position-based drops), bit for bit. The kernels are in ``moebal.kernels``; callers go
through ``moebal.dispatch`` / ``build_plan(..., backend=...)``, which decide the backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from moebal.plan import DispatchPlan, _check_capacity, _check_indices

__all__ = ["triton_build_plan", "triton_dispatch", "triton_combine"]


def _load_kernels():
    """``moebal.kernels``; in a source checkout that was not pip-installed, the
    ``package-dir`` mapping (``kernels/`` -> ``moebal.kernels``) is not active, so the
    top-level ``kernels/`` folder is loaded under that name, as an install would."""
    try:
        return importlib.import_module("moebal.kernels")
    except ModuleNotFoundError as err:
        if err.name != "moebal.kernels":
            raise
    root = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        "moebal.kernels", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"moebal.kernels is not installed and {root} holds no kernels package")
    module = importlib.util.module_from_spec(spec)
    sys.modules["moebal.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["moebal.kernels"]
        raise
    sys.modules["moebal"].kernels = module
    return module


_kernels = _load_kernels()


def triton_build_plan(indices_TK: torch.Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """``build_plan(indices_TK, num_experts, capacity)`` computed by Triton kernels.

    Deterministic and sync-free (per-block histograms and prefix sums, no atomics);
    equal to the torch plan field by field. Drops are position-based (earliest tokens
    kept); ``drop_policy="weight"`` is built by ``build_plan``'s torch path.

    Args:
        indices_TK: int32/int64 ``[T, K]`` expert ids in ``[0, num_experts)`` on a CUDA
            device (or the CPU under ``TRITON_INTERPRET=1``).
        num_experts: E.
        capacity: rows per expert (int >= 1) or None for dropless.
    """
    _check_indices(indices_TK, num_experts)
    _check_capacity(capacity)
    T, K = indices_TK.shape
    meta = _kernels.routing_metadata(indices_TK, num_experts, capacity)
    return DispatchPlan(
        num_tokens=T,
        top_k=K,
        num_experts=num_experts,
        capacity=capacity,
        counts_E=meta.counts_E,
        kept_E=meta.kept_E,
        starts_E=meta.starts_E,
        group_ends_E=meta.group_ends_E,
        row_of_pair_TK=meta.row_of_pair_TK,
        pair_of_row_R=meta.pair_of_row_R,
        token_of_row_R=meta.token_of_row_R,
    )


class _TritonDispatch(torch.autograd.Function):
    """xs[r] = x[token(r)] (zero padding rows); backward grad_x[t] = sum_k grad_xs[row(t,k)]."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        return _kernels.dispatch_rows(x_TD, plan.token_of_row_R)

    @staticmethod
    def backward(ctx, grad_xs_RD: torch.Tensor):
        return _kernels.dispatch_rows_backward(grad_xs_RD, ctx.plan.row_of_pair_TK), None


class _TritonCombine(torch.autograd.Function):
    """y[t] = sum_k w[t,k] ys[row(t,k)]; backward writes grad_ys and grad_w in one pass."""

    @staticmethod
    def forward(ctx, ys_RD: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        ctx.save_for_backward(ys_RD, weights_TK)
        return _kernels.combine_rows(ys_RD, plan.row_of_pair_TK, weights_TK)

    @staticmethod
    def backward(ctx, grad_y_TD: torch.Tensor):
        ys_RD, weights_TK = ctx.saved_tensors
        plan = ctx.plan
        padding = plan.pair_of_row_R if plan.has_drops else None
        grad_ys, grad_w = _kernels.combine_rows_backward(grad_y_TD, ys_RD, plan.row_of_pair_TK, weights_TK, padding)
        return grad_ys, grad_w, None


def triton_dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Differentiable Triton gather of ``x [T, D]`` into ``xs [R, D]`` (padding rows zero).

    Args:
        x_TD: ``[T, D]`` float tensor (fp32/bf16/fp16/fp64), T = ``plan.num_tokens``.
        plan: the ``DispatchPlan`` (int64 maps on the device of ``x``).
    """
    return _TritonDispatch.apply(x_TD, plan)


def triton_combine(ys_RD: torch.Tensor, plan: DispatchPlan, weights_TK: torch.Tensor) -> torch.Tensor:
    """Differentiable Triton ``y[t] = sum_k weights[t,k] * ys[row(t,k)]`` (fp32 accumulation).

    Args:
        ys_RD: ``[R, D]`` float expert outputs, R = ``plan.num_rows``.
        plan: the ``DispatchPlan``.
        weights_TK: float ``[T, K]`` routing weights (gets a gradient).

    Returns:
        ``y [T, D]`` in the dtype of ``ys``.
    """
    return _TritonCombine.apply(ys_RD, weights_TK, plan)
