"""Grouped experts: E feed-forward networks with stacked weights, run over ``xs``.

Shape legend: R rows of xs, D model dim, F expert hidden, E experts.

The experts see only the expert-contiguous rows and the plan's group boundaries, so any
router plugs in without touching them. Weights are stacked ``[E, ...]`` and laid out
for ``x @ W`` (``w_in_EDH`` with H = 2F for SwiGLU, gate then up; ``w_out_EFD``).
Optional per-expert biases ``b_in_EH`` / ``b_out_ED`` (GPT-2-style FFNs) are added to
each row of its own expert's group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moebal.plan import DispatchPlan

__all__ = ["GroupedExperts", "ACTIVATIONS", "activate", "grouped_matmul"]

# "gelu" is the exact erf GELU; "gelu_tanh" its tanh approximation (GPT-2's gelu_new)
ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh")
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The FFN nonlinearity: SwiGLU splits ``h [..., 2F]`` into gate then up."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    return F.gelu(h)


# torch's fake (meta) kernel of grouped_mm accepts only bf16 (it mirrors the CUDA checks),
# while the CPU kernel also runs fp32/fp16: under torch.compile those dtypes go through
# this opaque op, whose backward is the same two grouped GEMMs torch's own autograd uses.
@torch.library.custom_op("moebal::grouped_mm", mutates_args=())
def _grouped_mm_op(x_RD: torch.Tensor, w_EDH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_RD, w_EDH, offs=offs_E)


@_grouped_mm_op.register_fake
def _(x_RD, w_EDH, offs_E):
    return x_RD.new_empty(x_RD.shape[0], w_EDH.shape[-1])


@torch.library.custom_op("moebal::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(x_RD: torch.Tensor, grad_RH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_RD.t(), grad_RH, offs=offs_E)


@_grouped_mm_wgrad_op.register_fake
def _(x_RD, grad_RH, offs_E):
    return x_RD.new_empty(offs_E.shape[0], x_RD.shape[1], grad_RH.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad_RH):
    x_RD, w_EDH, offs_E = ctx.saved_tensors
    grad_RH = grad_RH.contiguous()
    grad_x = _grouped_mm_op(grad_RH, w_EDH.transpose(-2, -1), offs_E) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_wgrad_op(x_RD, grad_RH, offs_E) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_matmul(x_RD: torch.Tensor, w_EDH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``out[r] = x[r] @ w[e(r)]`` where e(r) is the expert owning row r.

    With a capacity every expert owns a fixed block of C rows, so this is one ``bmm``;
    dropless it is ``F.grouped_mm`` with the plan's int32 group ends, or, where that op
    is missing or the dtype is unsupported (float64), a per-expert loop (that fallback reads the group sizes on the host).
    """
    E = w_EDH.shape[0]
    if plan.capacity is not None:
        C = plan.capacity
        return torch.bmm(x_RD.view(E, C, -1), w_EDH).view(E * C, -1)
    if _HAS_GROUPED_MM and x_RD.device.type in ("cpu", "cuda") and x_RD.dtype in _GROUPED_MM_DTYPES:
        if torch.compiler.is_compiling() and x_RD.dtype != torch.bfloat16:
            return _grouped_mm_op(x_RD, w_EDH, plan.group_ends_E)
        return F.grouped_mm(x_RD, w_EDH, offs=plan.group_ends_E)
    ends = plan.group_ends_E.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([x_RD[s:e] @ w_EDH[i] for i, (s, e) in enumerate(zip(starts, ends))], dim=0)


class GroupedExperts(nn.Module):
    """E experts, SwiGLU (``silu(x W_gate) * (x W_up) W_out``) or GELU (``gelu(x W_in) W_out``).

    ``bias=True`` adds ``b_in_EH`` after the first GEMM and ``b_out_ED`` after the second.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.d_model, self.d_ff, self.num_experts, self.activation = d_model, d_ff, num_experts, activation
        hidden = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        if bias:
            self.b_in_EH = nn.Parameter(torch.empty(num_experts, hidden))
            self.b_out_ED = nn.Parameter(torch.empty(num_experts, d_model))
        else:
            self.b_in_EH = self.b_out_ED = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        nn.init.uniform_(self.w_in_EDH, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w_out_EFD, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))
        if self.b_in_EH is not None:
            nn.init.uniform_(self.b_in_EH, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
            nn.init.uniform_(self.b_out_ED, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))

    def forward(self, xs_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        dtype = xs_RD.dtype
        h_RH = grouped_matmul(xs_RD, self.w_in_EDH.to(dtype), plan)
        if self.b_in_EH is not None:
            h_RH = h_RH + _rows_of(self.b_in_EH.to(dtype), plan, xs_RD.shape[0])
        y_RD = grouped_matmul(activate(h_RH, self.activation), self.w_out_EFD.to(dtype), plan)
        if self.b_out_ED is not None:
            y_RD = y_RD + _rows_of(self.b_out_ED.to(dtype), plan, xs_RD.shape[0])
        return y_RD

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, bias={self.b_in_EH is not None}"
        )


def _rows_of(b_EX: torch.Tensor, plan: DispatchPlan, num_rows: int) -> torch.Tensor:
    """``b[e(r)]`` for every row r of xs: ``[R, X]`` (static shapes, no host sync)."""
    if plan.capacity is not None:
        return b_EX.repeat_interleave(plan.capacity, dim=0)
    rows_R = torch.arange(num_rows, device=b_EX.device, dtype=plan.group_ends_E.dtype)
    expert_R = torch.searchsorted(plan.group_ends_E, rows_R, right=True)
    return b_EX.index_select(0, expert_R)
