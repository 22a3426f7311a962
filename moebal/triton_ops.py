"""Differentiable Triton dispatch/combine, the gather-fused first expert GEMM, and the
device-side plan builder.

Shape legend: T tokens, D model dim, K top-k, E experts, R rows of ``xs`` (see plan.py),
H width of the first expert GEMM (2F for SwiGLU).

Each autograd Function here has its pure-torch twin in ``moebal.dispatch``
(``_TritonDispatch`` ~ ``_TorchDispatch``, ``_TritonCombine`` ~ ``_TorchCombine``) and
``triton_build_plan`` returns the same ``DispatchPlan`` as ``build_plan`` (dropless or
position-based drops, pairs without an expert included), bit for bit. The kernels are in
``moebal.kernels``; callers go through ``moebal.dispatch`` / ``build_plan(..., backend=...)``,
which decide the backend.

``triton_gather_grouped_mm`` is ``grouped_matmul(dispatch_rows(x, plan), w, plan)``
(``moebal.experts``, ``moebal.dispatch``) in one kernel that reads the rows of ``x`` by
index, so ``xs`` is never materialised; it is called directly (no backend switch yet).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch

from moebal.plan import DispatchPlan, _check_capacity, _check_indices, _may_have_null_pairs

__all__ = ["triton_build_plan", "triton_dispatch", "triton_combine", "triton_gather_grouped_mm"]


def _load_kernels():
    """``moebal.kernels.api``, the launchers of the top-level ``kernels/`` folder.

    ``kernels/`` has no ``__init__.py`` on purpose: a regular package there would shadow
    the PyPI distribution ``kernels`` (which transformers probes for) whenever the
    repository root is on ``sys.path``; as a namespace portion it loses to any installed
    ``kernels``. A wheel install lays it out as ``moebal/kernels/``, found as usual. An
    editable install maps ``moebal.kernels`` to the folder, but setuptools' editable finder
    does not resolve a namespace package nested in a regular one, so the same mapping is
    made here: a namespace spec whose search location is the folder beside the package.
    """
    try:
        return importlib.import_module("moebal.kernels.api")
    except ModuleNotFoundError as err:
        if err.name != "moebal.kernels":
            raise
        folder = Path(__file__).resolve().parent.parent / "kernels"
        if not (folder / "api.py").is_file():
            raise ModuleNotFoundError(
                f"moebal.kernels is not installed and {folder} holds no kernels: reinstall moebal", name=err.name
            ) from err
    spec = importlib.machinery.ModuleSpec("moebal.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    package = importlib.util.module_from_spec(spec)
    sys.modules["moebal.kernels"] = package
    sys.modules["moebal"].kernels = package
    return importlib.import_module("moebal.kernels.api")


_kernels = _load_kernels()


def triton_build_plan(indices_TK: torch.Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """``build_plan(indices_TK, num_experts, capacity)`` computed by Triton kernels.

    Deterministic and sync-free (per-block histograms and prefix sums, no atomics);
    equal to the torch plan field by field. Drops are position-based (earliest tokens
    kept); ``drop_policy="weight"`` / ``"priority"`` drops are built by ``build_plan``'s
    torch path.

    Args:
        indices_TK: int32/int64 ``[T, K]`` expert ids in ``[0, num_experts)``, or -1 for a
            pair without an expert (no row, not counted), on a CUDA device (or the CPU
            under ``TRITON_INTERPRET=1``).
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
        may_have_null_pairs=_may_have_null_pairs(indices_TK, num_experts),
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


class _TritonGatherGroupedMM(torch.autograd.Function):
    """h[r] = x[token(r)] @ w[e(r)] (padding rows zero), never writing ``xs``.

    Backward: ``grad_w[e] = x[tokens of e]^T @ grad_h[rows of e]`` (rows gathered by
    index again), ``grad_xs = grad_h @ w[e]^T`` (the same grouped kernel on a transposed
    view of w, no gather), then ``grad_x[t] = sum_k grad_xs[row(t, k)]`` (the dispatch
    backward). No atomics anywhere: deterministic.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_EDH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        ctx.save_for_backward(x_TD, w_EDH)
        return _kernels.grouped_gemm(x_TD, w_EDH, plan.group_ends_E, plan.token_of_row_R, plan.kept_E)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h_RH: torch.Tensor):
        x_TD, w_EDH = ctx.saved_tensors
        plan = ctx.plan
        grad_h_RH = grad_h_RH.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _kernels.grouped_gemm_wgrad(x_TD, grad_h_RH, plan.group_ends_E, plan.token_of_row_R, plan.kept_E)
        if ctx.needs_input_grad[0]:
            grad_xs_RD = _kernels.grouped_gemm(grad_h_RH, w_EDH.transpose(1, 2), plan.group_ends_E, None, plan.kept_E)
            grad_x = _kernels.dispatch_rows_backward(grad_xs_RD, plan.row_of_pair_TK)
        return grad_x, grad_w, None


_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_gather_mm(x_TD, w_EDH, plan: DispatchPlan) -> None:
    for name, t in (("x_TD", x_TD), ("w_EDH", w_EDH)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _GEMM_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"plan must be a DispatchPlan, got {type(plan).__name__}")
    if w_EDH.dtype != x_TD.dtype:
        raise TypeError(f"w_EDH dtype {w_EDH.dtype} does not match x_TD dtype {x_TD.dtype}")
    if x_TD.dim() != 2 or x_TD.shape[0] != plan.num_tokens:
        raise ValueError(f"x_TD must have shape [T, D] with T = plan.num_tokens = {plan.num_tokens}, got {tuple(x_TD.shape)}")
    if w_EDH.dim() != 3 or w_EDH.shape[0] != plan.num_experts or w_EDH.shape[1] != x_TD.shape[1]:
        raise ValueError(
            f"w_EDH must have shape [E, D, H] with E = plan.num_experts = {plan.num_experts} and "
            f"D = {x_TD.shape[1]} (from x_TD), got {tuple(w_EDH.shape)}"
        )
    for name, t in (("w_EDH", w_EDH), ("plan.token_of_row_R", plan.token_of_row_R), ("plan.group_ends_E", plan.group_ends_E)):
        if t.device != x_TD.device:
            raise ValueError(f"{name} is on {t.device} but x_TD is on {x_TD.device}")


def triton_gather_grouped_mm(x_TD: torch.Tensor, w_EDH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Differentiable ``h[r] = x[token_of_row[r]] @ w[e(r)]``: dispatch and first expert GEMM in one kernel.

    Equals ``grouped_matmul(dispatch_rows(x, plan), w, plan)`` without the ``[R, D]``
    buffer: each program gathers a tile of rows of one expert's group from ``x`` by index.
    Capacity padding rows of ``h`` are zero and add nothing to either gradient.

    Args:
        x_TD: ``[T, D]`` fp32/bf16/fp16 tokens, T = ``plan.num_tokens`` (gets a gradient).
        w_EDH: ``[E, D, H]`` expert weights for ``x @ W``, the dtype of ``x`` (gets a gradient).
        plan: the ``DispatchPlan`` (maps on the device of ``x``).

    Returns:
        ``h [R, H]`` in the dtype of ``x``, R = ``plan.num_rows``, accumulated in fp32 (fp32
        inputs use TF32 on CUDA only when ``torch.backends.cuda.matmul.allow_tf32`` is set).
    """
    _check_gather_mm(x_TD, w_EDH, plan)
    return _TritonGatherGroupedMM.apply(x_TD, w_EDH, plan)
