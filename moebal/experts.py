"""Grouped experts: E feed-forward networks with stacked weights, run over ``xs``.

Shape legend: R rows of xs, D model dim, F expert hidden, E experts.

The experts see only the expert-contiguous rows and the plan's group boundaries, so any
router plugs in without touching them. Weights are stacked ``[E, ...]`` and laid out
for ``x @ W`` (``w_in_EDH`` with H = 2F for SwiGLU, gate then up; ``w_out_EFD``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moebal.plan import DispatchPlan

__all__ = ["GroupedExperts", "ACTIVATIONS", "grouped_matmul"]

ACTIVATIONS = ("swiglu", "gelu")
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
        return F.grouped_mm(x_RD, w_EDH, offs=plan.group_ends_E)
    ends = plan.group_ends_E.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([x_RD[s:e] @ w_EDH[i] for i, (s, e) in enumerate(zip(starts, ends))], dim=0)


class GroupedExperts(nn.Module):
    """E experts, SwiGLU (``silu(x W_gate) * (x W_up) W_out``) or GELU (``gelu(x W_in) W_out``)."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, activation: str = "swiglu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.d_model, self.d_ff, self.num_experts, self.activation = d_model, d_ff, num_experts, activation
        hidden = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        nn.init.uniform_(self.w_in_EDH, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w_out_EFD, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))

    def forward(self, xs_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        dtype = xs_RD.dtype
        h_RH = grouped_matmul(xs_RD, self.w_in_EDH.to(dtype), plan)
        if self.activation == "swiglu":
            gate_RF, up_RF = h_RH.chunk(2, dim=-1)
            a_RF = F.silu(gate_RF) * up_RF
        else:
            a_RF = F.gelu(h_RH)
        return grouped_matmul(a_RF, self.w_out_EFD.to(dtype), plan)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, activation={self.activation!r}"
