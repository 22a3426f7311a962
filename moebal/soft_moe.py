"""moebal.SoftMoE: Soft Mixture of Experts (Puigcerver et al. 2023), for encoders and vision.

Shape legend: B groups (sequences, images), M tokens per group, D model dim, F expert
hidden, E experts, S slots per expert, N = E*S slots per group.

Every slot is a convex mix of a group's tokens, every expert processes its S slots, and
every token's output is a convex mix of all slot outputs::

    logits[b,m,n] = scale * <x[b,m] / |x[b,m]|, phi[:,n] / |phi[:,n]|>
    D = softmax over tokens m of logits      (dispatch: D[b,:,n] sums to 1 over m)
    C = softmax over slots n of logits       (combine: C[b,m,:] sums to 1 over n)
    xs[b,n] = sum_m D[b,m,n] x[b,m]          (slot inputs, from the raw tokens)
    ys[b,n] = FFN_{e(n)}(xs[b,n])            (slot n belongs to expert e(n) = n // S)
    y[b,m]  = sum_n C[b,m,n] ys[b,n]

No token is dropped, nothing is discrete, there is no balancing loss (``aux_loss`` is 0).
It is **not causal**: every output depends on every token of its group (a decoder must
not use it within a sequence), and the output of a token depends on the group it is in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moebal.experts import GroupedExperts
from moebal.plan import DispatchPlan

__all__ = ["SoftMoE", "SoftMoEStats", "soft_moe_weights"]

_EPS = 1e-6  # the l2 normalisation's floor: a zero token gets zero logits, not NaN


@dataclass
class SoftMoEStats:
    """One forward's mixing weights, detached 0-d fp32 tensors (no host sync until read)."""

    dispatch_max: torch.Tensor  # largest dispatch weight: 1 = a slot is a single token
    combine_max: torch.Tensor  # largest combine weight: 1 = a token reads a single slot
    slot_entropy: torch.Tensor  # mean over slots of H(D[:, n]) / log(tokens): 1 = uniform mix
    num_tokens: int  # rows seen, masked included
    masked_tokens: torch.Tensor  # int64 0-d

    def to_dict(self) -> dict:
        return {
            "dispatch_max": float(self.dispatch_max), "combine_max": float(self.combine_max),
            "slot_entropy": float(self.slot_entropy), "num_tokens": self.num_tokens,
            "masked_tokens": int(self.masked_tokens),
        }


def soft_moe_weights(
    x_BMD: torch.Tensor, phi_DN: torch.Tensor, scale: torch.Tensor, mask_BM: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dispatch_BMN, combine_BMN)``: the softmaxes over tokens and over slots of the
    normalised logits (see the module docstring), in fp32 (float64 for float64 tokens). A
    padding token (``mask_BM`` False) gets dispatch weight exactly 0; a group with no real
    token dispatches nothing (zero columns)."""
    dtype = torch.float64 if x_BMD.dtype == torch.float64 else torch.float32
    x_n = F.normalize(x_BMD.to(dtype), dim=-1, eps=_EPS)
    phi_n = F.normalize(phi_DN.to(dtype), dim=0, eps=_EPS)
    logits_BMN = scale.to(dtype) * (x_n @ phi_n)
    combine_BMN = torch.softmax(logits_BMN, dim=-1)
    if mask_BM is None:
        return torch.softmax(logits_BMN, dim=1), combine_BMN
    keep_BM1 = mask_BM[..., None]
    dispatch_BMN = torch.softmax(torch.where(keep_BM1, logits_BMN, torch.finfo(dtype).min), dim=1)
    return torch.where(keep_BM1, dispatch_BMN, 0.0), combine_BMN


class SoftMoE(nn.Module):
    """Soft MoE layer: ``forward(x [B, M, D] or [T, D], token_mask=None) -> y`` (same shape).

    Args:
        d_model, d_ff: model width D and each expert's hidden width F.
        num_experts: E.
        slots_per_expert: S; each group gets ``N = E * S`` slots (the paper sizes N near the
            number of tokens per group: S = 1 or 2 with E about M).
        activation: the experts' activation (see ``moebal.experts.ACTIVATIONS``).
        ffn_bias: per-expert biases, as ``moebal.MoE`` takes them.
        device, dtype: factory kwargs for every parameter.

    Groups: ``x [B, M, D]`` (any ``[..., M, D]``: the leading dims are the groups) mixes the
    M tokens of each group into that group's own N slots; ``x [T, D]`` is ONE group of T
    tokens (every token mixes with every other). ``token_mask`` (bool, ``x.shape[:-1]``,
    True = a real token): a padding token gets dispatch weight exactly 0 (it enters no slot,
    so it cannot change any other output) and its output is 0. ``x`` with zero tokens gives
    an empty output.

    Parameters: the slot embeddings ``phi_DN [D, N]`` (normal, std ``1/sqrt(D)``, the
    paper's LeCun init), a learned scalar ``scale`` (init 1) multiplying the
    cosine logits, and ``GroupedExperts`` (expert e owns slots ``e*S .. e*S+S-1``).

    Training setups: under ``torch.autocast`` the logits and softmaxes run in fp32 (a
    padding token's dispatch logit is the dtype's lowest number, so its exp is exactly 0), the
    slot mixes and the expert GEMMs in the autocast dtype (the output has it); it has no
    balancing state, so ``.to(dtype)``, ``deepcopy``, ``state_dict`` and activation
    checkpointing need nothing special; ``torch.compile(fullgraph=True, dynamic=True)``
    handles varying token counts. After a forward, ``aux_loss`` is a zero scalar (so
    ``moebal.aux_loss``-style sums work) and ``last_stats`` a :class:`SoftMoEStats`.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        slots_per_expert: int = 1,
        activation: str = "swiglu",
        ffn_bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts),
                            ("slots_per_expert", slots_per_expert)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.d_model, self.d_ff, self.num_experts, self.slots_per_expert = d_model, d_ff, num_experts, slots_per_expert
        factory = dict(device=device, dtype=dtype)
        self.phi_DN = nn.Parameter(torch.empty(d_model, num_experts * slots_per_expert, **factory))
        self.scale = nn.Parameter(torch.empty((), **factory))
        self.experts = GroupedExperts(d_model, d_ff, num_experts, activation, bias=ffn_bias, **factory)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_stats: SoftMoEStats | None = None
        self._init_slots()

    @property
    def num_slots(self) -> int:
        """N = E * S slots per group."""
        return self.num_experts * self.slots_per_expert

    def _init_slots(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.phi_DN, std=1 / math.sqrt(self.d_model))
            self.scale.fill_(1.0)

    def reset_parameters(self) -> None:
        self._init_slots()
        self.experts.reset_parameters()

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [T, {self.d_model}] or [..., M, {self.d_model}], got {tuple(x.shape)}")
        if token_mask is not None:
            if not isinstance(token_mask, torch.Tensor) or token_mask.shape != x.shape[:-1]:
                got = tuple(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
                raise ValueError(f"token_mask must have the shape of x without its last dim {tuple(x.shape[:-1])}, got {got}")
            if token_mask.dtype != torch.bool:
                raise TypeError(f"token_mask must be a bool tensor (True = a real token), got {token_mask.dtype}")
        shape = x.shape
        B, M = math.prod(shape[:-2]), shape[-2]
        x_BMD = x.reshape(B, M, self.d_model)
        mask_BM = None if token_mask is None else token_mask.reshape(B, M)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and x_BMD.dtype != torch.float64:
            x_BMD = x_BMD.to(torch.get_autocast_dtype(device_type))  # as nn.Linear: operands in the autocast dtype
        with torch.autocast(device_type, enabled=False):
            dispatch_BMN, combine_BMN = soft_moe_weights(x_BMD, self.phi_DN, self.scale, mask_BM)
            y_BMD = self._mix(x_BMD, dispatch_BMN, combine_BMN)
        if mask_BM is not None:  # a padding token's output is zero
            y_BMD = torch.where(mask_BM[..., None], y_BMD, 0.0)
        self.last_stats = _stats(dispatch_BMN, combine_BMN, mask_BM, x_BMD.shape[0] * M)
        self.aux_loss = torch.zeros((), device=x.device)
        return y_BMD.reshape(shape)

    def _mix(self, x_BMD: torch.Tensor, dispatch_BMN: torch.Tensor, combine_BMN: torch.Tensor) -> torch.Tensor:
        B, E, S, D = x_BMD.shape[0], self.num_experts, self.slots_per_expert, self.d_model
        dtype = x_BMD.dtype
        xs_BND = dispatch_BMN.to(dtype).transpose(1, 2) @ x_BMD
        # expert-contiguous rows: expert e's slots of every group, [E * B * S, D]
        xs_RD = rearrange(xs_BND, "b (e s) d -> (e b s) d", e=E, s=S)
        ys_RD = self.experts(xs_RD, _slot_plan(E, B * S, x_BMD.device))
        ys_BND = rearrange(ys_RD, "(e b s) d -> b (e s) d", e=E, b=B, s=S)
        return combine_BMN.to(dtype) @ ys_BND

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
                f"slots_per_expert={self.slots_per_expert}")


def _slot_plan(num_experts: int, rows_per_expert, device) -> DispatchPlan:
    """The fixed layout of the slots: expert e owns rows ``[e*n, (e+1)*n)``, all of them full
    (a capacity plan with no drop, so the experts run one batched GEMM per projection)."""
    E, n = num_experts, rows_per_expert
    rows_R = torch.arange(E * n, device=device)
    full_E = torch.full((E,), n, dtype=torch.int64, device=device)
    starts_E = torch.arange(E, device=device) * n
    return DispatchPlan(
        num_tokens=E * n, top_k=1, num_experts=E, capacity=n, counts_E=full_E, kept_E=full_E, starts_E=starts_E,
        group_ends_E=(starts_E + n).to(torch.int32), row_of_pair_TK=rows_R.view(-1, 1), pair_of_row_R=rows_R,
        token_of_row_R=rows_R,
    )


@torch.no_grad()
def _stats(dispatch_BMN, combine_BMN, mask_BM, num_tokens: int) -> SoftMoEStats:
    device = dispatch_BMN.device
    masked = torch.zeros((), dtype=torch.int64, device=device) if mask_BM is None else (~mask_BM).sum()
    if dispatch_BMN.numel() == 0:
        zero = dispatch_BMN.new_zeros(())
        return SoftMoEStats(zero, zero, zero, num_tokens, masked)
    h_BN = -(dispatch_BMN * dispatch_BMN.clamp_min(1e-30).log()).sum(1)
    # log M as a tensor op: a Python log of M would make torch.compile specialise on M
    log_m = dispatch_BMN.new_ones(dispatch_BMN.shape[1]).sum().log()
    entropy = torch.where(log_m > 0, h_BN.mean() / log_m.clamp(min=1e-30), 1.0)
    combine = combine_BMN if mask_BM is None else torch.where(mask_BM[..., None], combine_BMN, 0.0)
    return SoftMoEStats(dispatch_BMN.amax(), combine.amax(), entropy, num_tokens, masked)
