"""The CPU expert path: per-expert GEMMs into reused buffers, forward and backward.

Shape legend: R rows of xs, D model dim, F expert hidden, H first projection's width (2F
gated), E experts, n rows of one expert.

On CPU the group sizes are host values at no cost, so each expert's rows are one plain
GEMM written straight into a slice of a pooled buffer: no first-touch page faults on
fresh [R, H] tensors, no padding rows computed (a capacity block runs only its kept
rows), and the backward forms each expert's activation gradient in a small scratch
that stays in cache instead of several full [R, H] temporaries. ``moebal.experts`` picks
this path (``"loop"``) by the rule in ``moebal.expert_paths``.
"""
from __future__ import annotations

import torch

from moebal.plan import DispatchPlan
from moebal.workspace import empty_buffer

__all__ = ["loop_experts", "host_bounds"]

_GATED = ("swiglu", "geglu")  # moebal.experts.GATED_ACTIVATIONS (that module imports this one)


def _gelu_kind(activation: str) -> str:
    return "tanh" if activation in ("gelu_tanh", "geglu") else "none"


def _split_used(buf: torch.Tensor, sizes: list[int], dim: int = 0) -> list[torch.Tensor]:
    """Views of each expert's rows in use, from one ``split`` (cheaper than E slices)."""
    if not _has_pad(sizes):  # dropless: no empty pad pieces to create (split cost grows per piece)
        return list(buf.split(sizes[0::2], dim=dim))
    return list(buf.split(sizes, dim=dim)[0::2])


def _has_pad(sizes: list[int]) -> bool:
    return any(sizes[1::2])


def _zero_pad_rows(buf: torch.Tensor, sizes: list[int]) -> None:
    if _has_pad(sizes):
        for pad in buf.split(sizes)[1::2]:
            if pad.shape[0]:
                pad.zero_()


# The activation runs once per block of consecutive experts whose rows in use touch (no
# capacity padding between them), about this many bytes of h per block: small experts
# share one elementwise op, while a block stays small enough that its h is still in the
# L2 cache from its first GEMM. Measured on the experts alone, fwd+bwd, one thread: at
# config C in bf16 (256 KiB of h per expert) 512 KiB blocks run 2-3 % faster than 128 KiB
# ones (one expert per block); fp32 at C and both dtypes at A change by less than the noise.
_BLOCK_BYTES = 1 << 19


def _row_blocks(bounds, row_bytes: int) -> list[tuple[int, int, int, int]]:
    """``(first expert, end expert, first row, end row)`` blocks of adjacent rows in use."""
    blocks, e0 = [], 0
    for e, (s, n, end) in enumerate(bounds):
        r0 = bounds[e0][0]
        if end > s + n or (s + n - r0) * row_bytes >= _BLOCK_BYTES or e == len(bounds) - 1:
            blocks.append((e0, e + 1, r0, s + n))
            e0 = e + 1
    return blocks


def _linear_into(x_nA, w_AB, b_EB, e: int, out_nB) -> None:
    """``out = x @ w (+ b[e])`` written into ``out``."""
    if b_EB is None:
        torch.mm(x_nA, w_AB, out=out_nB)
    else:
        torch.addmm(b_EB[e], x_nA, w_AB, out=out_nB)


def _act_forward(h_nH, s_nF, a_nF, activation: str) -> None:
    """``a = act(gate) * up`` keeping ``s = act(gate)`` (gated, h = [gate | up]), or ``a = act(h)``."""
    if activation in _GATED:
        F_ = a_nF.shape[1]
        if activation == "swiglu":
            torch.ops.aten.silu.out(h_nH[:, :F_], out=s_nF)
        else:
            torch.ops.aten.gelu.out(h_nH[:, :F_], approximate="tanh", out=s_nF)
        torch.mul(s_nF, h_nH[:, F_:], out=a_nF)
    elif activation == "relu":
        torch.clamp_min(h_nH, 0, out=a_nF)
    else:
        torch.ops.aten.gelu.out(h_nH, approximate=_gelu_kind(activation), out=a_nF)


def _act_backward(grad_a_nF, h_nH, s_nF, grad_h_nH, tmp_nF, activation: str) -> None:
    """``grad_h`` from ``grad_a``: d up = grad_a * act(gate), d gate = act'(gate) * grad_a * up."""
    if activation in _GATED:
        F_ = grad_a_nF.shape[1]
        gate = h_nH[:, :F_]
        torch.mul(grad_a_nF, s_nF, out=grad_h_nH[:, F_:])
        torch.mul(grad_a_nF, h_nH[:, F_:], out=tmp_nF)
        if activation == "swiglu":
            torch.ops.aten.silu_backward.grad_input(tmp_nF, gate, grad_input=grad_h_nH[:, :F_])
        else:
            torch.ops.aten.gelu_backward.grad_input(tmp_nF, gate, approximate="tanh", grad_input=grad_h_nH[:, :F_])
    elif activation == "relu":  # F.relu's gradient: zero where h <= 0
        torch.ops.aten.threshold_backward.grad_input(grad_a_nF, h_nH, 0, grad_input=grad_h_nH)
    else:
        torch.ops.aten.gelu_backward.grad_input(grad_a_nF, h_nH, approximate=_gelu_kind(activation),
                                                grad_input=grad_h_nH)


class _LoopExperts(torch.autograd.Function):
    """``ys[rows e] = act(xs[rows e] @ W_in[e] + b_in[e]) @ W_out[e] + b_out[e]`` per expert.

    ``bounds`` holds per expert ``(first row, rows in use, end of its block)``; rows of a
    block past the rows in use (capacity padding) and rows past the last block come out
    zero, with zero gradient. A gated activation saves ``act(gate)`` so the backward needs no exp.
    """

    @staticmethod
    def forward(ctx, xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation):
        R, D = xs_RD.shape
        H, F_ = w_in_EDH.shape[2], w_out_EFD.shape[1]
        dtype, device = xs_RD.dtype, xs_RD.device
        gated = activation in _GATED
        sizes = _split_sizes(bounds, R)
        h_RH = empty_buffer((R, H), dtype, device)
        a_RF = empty_buffer((R, F_), dtype, device)
        s_RF = empty_buffer((R, F_), dtype, device) if gated else None  # act(gate)
        ys_RD = empty_buffer((R, D), dtype, device)
        xs_p, h_p, a_p, ys_p = (_split_used(t, sizes) for t in (xs_RD, h_RH, a_RF, ys_RD))
        w_in, w_out = w_in_EDH.unbind(0), w_out_EFD.unbind(0)
        for e0, e1, r0, r1 in _row_blocks(bounds, H * xs_RD.element_size()):
            if r1 == r0:
                continue
            for e in range(e0, e1):
                if xs_p[e].shape[0]:
                    _linear_into(xs_p[e], w_in[e], b_in_EH, e, h_p[e])
            _act_forward(h_RH[r0:r1], s_RF[r0:r1] if gated else None, a_RF[r0:r1], activation)
            for e in range(e0, e1):
                if xs_p[e].shape[0]:
                    _linear_into(a_p[e], w_out[e], b_out_ED, e, ys_p[e])
        _zero_pad_rows(ys_RD, sizes)
        ctx.bounds, ctx.activation = bounds, activation
        ctx.has_b_in, ctx.has_b_out = b_in_EH is not None, b_out_ED is not None
        ctx.save_for_backward(xs_RD, w_in_EDH, w_out_EFD, h_RH, a_RF, s_RF)
        return ys_RD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys_RD):
        xs_RD, w_in_EDH, w_out_EFD, h_RH, a_RF, s_RF = ctx.saved_tensors
        grad_ys_RD = grad_ys_RD.contiguous()
        R, D = xs_RD.shape
        E, H, F_ = w_in_EDH.shape[0], w_in_EDH.shape[2], w_out_EFD.shape[1]
        dtype, device = xs_RD.dtype, xs_RD.device
        gated = ctx.activation in _GATED
        need_xs, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:5]
        need_b_in, need_b_out = need_b_in and ctx.has_b_in, need_b_out and ctx.has_b_out
        need_h = need_xs or need_w_in or need_b_in
        sizes = _split_sizes(ctx.bounds, R)
        blocks = _row_blocks(ctx.bounds, H * xs_RD.element_size())
        grad_xs = empty_buffer((R, D), dtype, device) if need_xs else None
        grad_w_in = empty_buffer((E, D, H), dtype, device) if need_w_in else None
        grad_w_out = empty_buffer((E, F_, D), dtype, device) if need_w_out else None
        grad_b_in = torch.zeros((E, H), dtype=dtype, device=device) if need_b_in else None
        grad_b_out = torch.zeros((E, D), dtype=dtype, device=device) if need_b_out else None
        max_rows = max((r1 - r0 for _, _, r0, r1 in blocks), default=0)
        grad_a_all = empty_buffer((max_rows, F_), dtype, device)
        grad_h_all = empty_buffer((max_rows, H), dtype, device)
        tmp_all = empty_buffer((max_rows, F_), dtype, device) if gated else None
        g_ys_p = _split_used(grad_ys_RD, sizes)
        xs_t_p = _split_used(xs_RD.t(), sizes, dim=1)  # [D, n] views
        a_t_p = _split_used(a_RF.t(), sizes, dim=1)  # [F, n] views
        gx_p = _split_used(grad_xs, sizes) if grad_xs is not None else None
        w_out_t = w_out_EFD.transpose(1, 2).unbind(0)  # [D, F] views
        w_in_t = w_in_EDH.transpose(1, 2).unbind(0)  # [H, D] views
        gw_out = grad_w_out.unbind(0) if grad_w_out is not None else None
        gw_in = grad_w_in.unbind(0) if grad_w_in is not None else None
        for e in range(E):
            if g_ys_p[e].shape[0] == 0:  # an empty expert: its weight gradients are zero
                for g in (gw_in, gw_out):
                    if g is not None:
                        g[e].zero_()
        for e0, e1, r0, r1 in blocks:
            if r1 == r0:
                continue
            offsets = [ctx.bounds[e][0] - r0 for e in range(e0, e1)]
            for e, off in zip(range(e0, e1), offsets):
                g_ys = g_ys_p[e]
                n = g_ys.shape[0]
                if n == 0:
                    continue
                if gw_out is not None:
                    torch.mm(a_t_p[e], g_ys, out=gw_out[e])
                if grad_b_out is not None:
                    torch.sum(g_ys, dim=0, out=grad_b_out[e])
                if need_h:
                    torch.mm(g_ys, w_out_t[e], out=grad_a_all[off:off + n])
            if not need_h:
                continue
            rows = r1 - r0
            grad_h = grad_h_all[:rows]
            _act_backward(grad_a_all[:rows], h_RH[r0:r1], s_RF[r0:r1] if gated else None, grad_h,
                          tmp_all[:rows] if gated else None, ctx.activation)
            for e, off in zip(range(e0, e1), offsets):
                n = g_ys_p[e].shape[0]
                if n == 0:
                    continue
                grad_h_e = grad_h[off:off + n]
                if grad_b_in is not None:
                    torch.sum(grad_h_e, dim=0, out=grad_b_in[e])
                if gw_in is not None:
                    torch.mm(xs_t_p[e], grad_h_e, out=gw_in[e])
                if grad_xs is not None:
                    torch.mm(grad_h_e, w_in_t[e], out=gx_p[e])
        if grad_xs is not None:
            _zero_pad_rows(grad_xs, sizes)
        return grad_xs, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None


def _split_sizes(bounds, num_rows: int) -> list[int]:
    """``[used_0, pad_0, used_1, pad_1, ..., used_E-1, pad_E-1 + tail]`` row counts."""
    sizes, prev_end = [], 0
    for s, n, end in bounds:
        if s != prev_end or not 0 <= n <= end - s:
            raise ValueError(f"expert blocks must tile the rows in order, got {bounds}")
        sizes += [n, end - s - n]
        prev_end = end
    if sizes:
        sizes[-1] += num_rows - _covered(bounds)
    return sizes


def _covered(bounds) -> int:
    return max((end for _, _, end in bounds), default=0)


def host_bounds(plan: DispatchPlan) -> list[tuple[int, int, int]]:
    """Per expert ``(first row, rows in use, end of its block)``, read on the host (or the plan's own)."""
    if plan.host_bounds is not None:
        return plan.host_bounds
    return list(zip(plan.starts_E.tolist(), plan.kept_E.tolist(), plan.group_ends_E.tolist()))




def loop_experts(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation) -> torch.Tensor:
    """``ys [R, D]`` by per-expert GEMMs (differentiable once); ``bounds`` from ``host_bounds``."""
    return _LoopExperts.apply(xs_RD.contiguous(), w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation)
