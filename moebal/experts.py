"""Grouped experts: E feed-forward networks with stacked weights, run over ``xs``.

Shape legend: R rows of xs, D model dim, F expert hidden, E experts.

The experts see only the expert-contiguous rows and the plan's group boundaries, so any
router plugs in without touching them. Weights are stacked ``[E, ...]`` and laid out
for ``x @ W`` (``w_in_EDH`` with H = 2F for SwiGLU/GeGLU, gate then up; ``w_out_EFD``).
Optional per-expert biases ``b_in_EH`` / ``b_out_ED`` (GPT-2-style FFNs) are added to
each row of its own expert's group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moebal.decode import bmm_experts, decode_pack, gemv_experts, onednn_experts
from moebal.expert_paths import choose_path
from moebal.experts_loop import host_bounds, loop_experts
from moebal.plan import DispatchPlan
from moebal.workspace import pooled_cast

__all__ = ["GroupedExperts", "ACTIVATIONS", "GATED_ACTIVATIONS", "EXPERT_PATHS", "activate", "hidden_width",
           "expert_ffn", "grouped_matmul"]

# "loop": per-expert GEMMs into reused buffers (moebal.experts_loop); "grouped": grouped_mm
# (bmm with a capacity; static shapes, compiles); "bmm": padded bmm per run of adjacent
# touched experts, "gemv": matrix-vector calls per touched expert and "onednn" (no gradient):
# oneDNN's linear per touched expert on weights reordered once (moebal.decode);
# "auto": the measured rule of moebal.expert_paths; "fused_gather" (GroupedExperts / MoE
# only, Triton backend): the first GEMM reads the token rows by index
# (moebal.triton_ops.triton_gather_grouped_mm), so xs is never written
EXPERT_PATHS = ("auto", "loop", "grouped", "bmm", "gemv", "onednn", "fused_gather")

# "gelu" is the exact erf GELU; "gelu_tanh" its tanh approximation (GPT-2's gelu_new);
# "relu" (OPT). The gated ones split h [..., 2F] into gate then up: "swiglu" is
# silu(gate) * up (Llama), "geglu" is gelu_tanh(gate) * up (Gemma's gelu_pytorch_tanh).
ACTIVATIONS = ("swiglu", "geglu", "gelu", "gelu_tanh", "relu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The FFN nonlinearity: the gated ones (SwiGLU, GeGLU) split ``h [..., 2F]`` into gate then up."""
    if activation in GATED_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) if activation == "swiglu" else F.gelu(gate, approximate="tanh")) * up
    if activation == "relu":
        return F.relu(h)
    return F.gelu(h, approximate=_gelu_kind(activation))


def hidden_width(d_ff: int, activation: str) -> int:
    """Width H of the first projection's output: 2F (gate then up) for a gated activation, else F."""
    return 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff


# torch's fake (meta) kernel of grouped_mm accepts only bf16 (it mirrors the CUDA checks),
# while the CPU kernel also runs fp32/fp16, and operands it cannot take at all (float64,
# rows not a multiple of 16 bytes) need the per-expert loop, which reads the group ends on
# the host: under torch.compile all of these go through this opaque op, whose backward is
# the same two grouped GEMMs torch's own autograd uses.
@torch.library.custom_op("moebal::grouped_mm", mutates_args=())
def _grouped_mm_op(x_RD: torch.Tensor, w_EDH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return _grouped_mm(x_RD, w_EDH, offs_E)


@_grouped_mm_op.register_fake
def _(x_RD, w_EDH, offs_E):
    return x_RD.new_empty(x_RD.shape[0], w_EDH.shape[-1])


@torch.library.custom_op("moebal::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(x_RD: torch.Tensor, grad_RH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    if _grouped_mm_fits(x_RD, grad_RH):
        return F.grouped_mm(x_RD.t(), grad_RH, offs=offs_E)
    spans = _spans(offs_E)
    return torch.stack([x_RD[s:e].t() @ grad_RH[s:e] for s, e in spans])


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


def _grouped_mm_fits(x_RD: torch.Tensor, w_EDH: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: its device, dtype and 16-byte strides."""
    if not (_HAS_GROUPED_MM and x_RD.device.type in ("cpu", "cuda") and x_RD.dtype in _GROUPED_MM_DTYPES):
        return False
    size = x_RD.element_size()
    return (x_RD.shape[1] * size) % 16 == 0 and (w_EDH.shape[-1] * size) % 16 == 0


def grouped_matmul(x_RD: torch.Tensor, w_EDH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``out[r] = x[r] @ w[e(r)]`` where e(r) is the expert owning row r.

    With a capacity every expert owns a fixed block of C rows, so this is one ``bmm``;
    dropless it is ``F.grouped_mm`` with the plan's int32 group ends, or, where that op
    is missing or cannot take the operands (float64, rows not a multiple of 16 bytes), a
    per-expert loop (that fallback reads the group sizes on the host; under torch.compile
    it runs inside the opaque ``moebal::grouped_mm`` op, so the graph keeps static shapes).
    """
    E = w_EDH.shape[0]
    if plan.capacity is not None:
        C = plan.capacity
        return torch.bmm(x_RD.view(E, C, -1), w_EDH).view(E * C, -1)
    if torch.compiler.is_compiling() and not (x_RD.dtype == torch.bfloat16 and _grouped_mm_fits(x_RD, w_EDH)):
        return _grouped_mm_op(x_RD, w_EDH, plan.group_ends_E)
    return _grouped_mm(x_RD, w_EDH, plan.group_ends_E)


def _grouped_mm(x_RD: torch.Tensor, w_EDH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm`` where it takes the operands, else one GEMM per expert."""
    if _grouped_mm_fits(x_RD, w_EDH):
        return F.grouped_mm(x_RD, w_EDH, offs=offs_E)
    return torch.cat([x_RD[s:e] @ w_EDH[i] for i, (s, e) in enumerate(_spans(offs_E))], dim=0)


def _spans(offs_E: torch.Tensor) -> list[tuple[int, int]]:
    """Per expert ``(first row, end row)`` from the group ends, read on the host."""
    ends = offs_E.tolist()
    return list(zip([0] + ends[:-1], ends))


def _gelu_kind(activation: str) -> str:
    return "tanh" if activation in ("gelu_tanh", "geglu") else "none"


def _grouped_ffn(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, plan, activation):
    h_RH = grouped_matmul(xs_RD, w_in_EDH, plan)
    if b_in_EH is not None:
        h_RH = h_RH + _rows_of(b_in_EH, plan, xs_RD.shape[0])
    y_RD = grouped_matmul(activate(h_RH, activation), w_out_EFD, plan)
    if b_out_ED is not None:
        y_RD = y_RD + _rows_of(b_out_ED, plan, xs_RD.shape[0])
    return y_RD


def expert_ffn(
    xs_RD: torch.Tensor,
    w_in_EDH: torch.Tensor,
    w_out_EFD: torch.Tensor,
    plan: DispatchPlan,
    activation: str = "swiglu",
    b_in_EH: torch.Tensor | None = None,
    b_out_ED: torch.Tensor | None = None,
    path: str = "auto",
    pack=None,
    training: bool = False,
) -> torch.Tensor:
    """The E expert FFNs over the plan's expert-contiguous rows: ``ys [R, D]``.

    Args:
        xs_RD: ``[R, D]`` rows in the plan's layout (the dispatch output).
        w_in_EDH: ``[E, D, H]``, H = 2F for SwiGLU/GeGLU (gate then up), F otherwise.
        w_out_EFD: ``[E, F, D]``.
        plan: the DispatchPlan that laid out ``xs``.
        activation: one of ``ACTIVATIONS``.
        b_in_EH, b_out_ED: optional per-expert biases ``[E, H]``, ``[E, D]``.
        path: one of ``EXPERT_PATHS``. ``"loop"``, ``"bmm"``, ``"gemv"`` and ``"onednn"`` (no
            gradient) read the group sizes on the host (free on CPU, a sync on GPU);
            ``"grouped"`` has static shapes and compiles; ``"auto"`` asks
            ``moebal.expert_paths.choose_path``.
        pack: the decode layout (``moebal.decode.decode_pack``) for ``"gemv"``, ``"bmm"``,
            ``"onednn"`` and ``"grouped"`` (read through transposed views), or None; used only
            when no weight needs a gradient.

    Capacity padding rows are never read by ``combine``; the loop path returns them as
    zeros and computes nothing for them.
    """
    if path not in EXPERT_PATHS:
        raise ValueError(f"path must be one of {EXPERT_PATHS}, got {path!r}")
    if path == "fused_gather":
        raise ValueError(
            "path='fused_gather' reads the token rows, not xs: call GroupedExperts.forward_tokens(x_TD, plan) "
            "(moebal.MoE does when experts.path is 'fused_gather')"
        )
    bounds = None
    if path == "auto":
        if xs_RD.device.type == "cpu" and not torch.compiler.is_compiling():
            # the rule needs only the counts; bounds only the paths that loop
            kept = plan.kept_E.tolist() if plan.host_bounds is None else [n for _, n, _ in plan.host_bounds]
            touched = len(kept) - kept.count(0)
            rows = sum(kept) / max(touched, 1)
            need = any(t is not None and t.requires_grad for t in (w_in_EDH, w_out_EFD, b_in_EH, b_out_ED))
            path = choose_path(xs_RD, need, rows, packed=pack is not None, training=training)
            if not path.endswith("_packed"):
                pack = None
            path = path.removesuffix("_packed")
        else:
            path = "grouped"
    if path == "grouped":
        if pack is not None and not (torch.is_grad_enabled() and (w_in_EDH.requires_grad or w_out_EFD.requires_grad)):
            w_in_EDH, w_out_EFD = pack.w_in_EHD.transpose(1, 2), pack.w_out_EDF.transpose(1, 2)
        return _grouped_ffn(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, plan, activation)
    mixed = [t.dtype for t in (w_in_EDH, w_out_EFD, b_in_EH, b_out_ED) if t is not None and t.dtype != xs_RD.dtype]
    if mixed:
        raise TypeError(f"expert weights must have the dtype of xs ({xs_RD.dtype}), got {mixed}")
    bounds = bounds if bounds is not None else host_bounds(plan)
    if path == "loop":
        return loop_experts(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation)
    if path == "bmm":
        return bmm_experts(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation, pack)
    if path == "onednn":
        return onednn_experts(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation, pack)
    return gemv_experts(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation, pack)


class GroupedExperts(nn.Module):
    """E experts, gated (SwiGLU ``silu(x W_gate) * (x W_up) W_out``, GeGLU with a tanh-GELU gate)
    or not (``act(x W_in) W_out`` with GELU, tanh GELU or ReLU).

    ``bias=True`` adds ``b_in_EH`` after the first GEMM and ``b_out_ED`` after the second.
    ``path`` picks the GEMM strategy (see ``expert_ffn``); a plain attribute, settable.
    ``device``/``dtype`` are factory kwargs, as ``nn.Linear`` takes them (``device="meta"``
    allocates nothing; ``to_empty()`` then ``reset_parameters()`` makes a usable module).
    """

    def __init__(
        self, d_model: int, d_ff: int, num_experts: int, activation: str = "swiglu", bias: bool = False,
        path: str = "auto", device=None, dtype=None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if path not in EXPERT_PATHS:
            raise ValueError(f"path must be one of {EXPERT_PATHS}, got {path!r}")
        self.path = path
        self._decode_pack = None  # moebal.decode.prepare_decode's layout, never saved
        self.d_model, self.d_ff, self.num_experts, self.activation = d_model, d_ff, num_experts, activation
        hidden = hidden_width(d_ff, activation)
        factory = dict(device=device, dtype=dtype)
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, d_model, hidden, **factory))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        if bias:
            self.b_in_EH = nn.Parameter(torch.empty(num_experts, hidden, **factory))
            self.b_out_ED = nn.Parameter(torch.empty(num_experts, d_model, **factory))
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
        b_in = self.b_in_EH.to(dtype) if self.b_in_EH is not None else None
        b_out = self.b_out_ED.to(dtype) if self.b_out_ED is not None else None
        # a training step, also where no gradient is taken now (a reentrant checkpoint's first forward)
        step = self.training and self.w_in_EDH.requires_grad
        training = step or (torch.is_grad_enabled() and self.w_in_EDH.requires_grad)
        wants_pack = self.path in ("auto", "gemv", "bmm", "grouped", "onednn") and not torch.compiler.is_compiling()
        pack = decode_pack(self, dtype) if wants_pack and not training else None  # compiled: the stored weights
        return expert_ffn(
            xs_RD, pooled_cast(self.w_in_EDH, dtype), pooled_cast(self.w_out_EFD, dtype), plan, self.activation,
            b_in, b_out, self.path, pack, training=step,
        )

    def forward_tokens(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The experts over the plan's rows, read straight from the tokens: ``ys [R, D]``.

        Equal to ``self(dispatch_rows(x_TD, plan), plan)``, but the first GEMM gathers each
        row of x by index inside the Triton kernel (``triton_gather_grouped_mm``), so the
        dispatched ``xs [R, D]`` is never written or read back. Needs tensors the Triton
        kernels can run on (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
        """
        from moebal.triton_ops import triton_gather_grouped_mm

        dtype = x_TD.dtype
        h_RH = triton_gather_grouped_mm(x_TD, self.w_in_EDH.to(dtype), plan)
        R = h_RH.shape[0]
        if self.b_in_EH is not None:
            h_RH = h_RH + _rows_of(self.b_in_EH.to(dtype), plan, R)
        ys_RD = grouped_matmul(activate(h_RH, self.activation), self.w_out_EFD.to(dtype), plan)
        if self.b_out_ED is not None:
            ys_RD = ys_RD + _rows_of(self.b_out_ED.to(dtype), plan, R)
        return ys_RD

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
