"""Inference-shaped expert paths and the decode weight layout.

Shape legend: R rows of xs, D model dim, F expert hidden, H first projection's width (2F
gated), E experts, L experts in a run, C rows per expert of a padded run, n rows of one expert.

A decode batch gives each expert a handful of rows, so the expert FFNs are
matrix-vector shaped and bound by reading the touched experts' weights. Three paths,
all reading the group sizes on the host (free on the CPU) and touching no weight of an
expert that got no row; the first two are built from differentiable torch ops (they
train too, gradients tested against float64):

- ``"gemv"``: per touched expert, ``torch.mv`` for one row and ``F.linear`` for more, on
  the decode layout when ``prepare_decode`` made one (below), else on the stored weights.
- ``"bmm"``: one padded ``torch.bmm`` per run of adjacent touched experts (a run of L
  experts is a view ``w[e0:e1]`` of the stacked weights, or of the decode layout:
  nothing is copied), each expert's rows padded to the run's largest count C.
- ``"onednn"`` (inference only): per touched expert, oneDNN's linear on weights it has
  reordered into its own blocked format once (``torch.ops.mkldnn._linear_pointwise`` on
  ``_reorder_linear_weight``'s output, what ``torch.compile``'s CPU freezing uses), so no
  call reorders a weight again. On an AMD EPYC (Zen 4) a one-row bf16 expert GEMM reads
  its weight at 1.5x the rate of ``torch.mm`` on the same layout (``mm`` reorders on every
  call). The reordered weights belong to the decode layout, built on the first call that
  uses them (one more copy of the experts' memory in that dtype); without a decode layout
  the touched experts are reordered on each call.

The decode layout: the stored weights are laid out for ``x @ W`` (``w_in_EDH``,
``w_out_EFD``), and torch's bf16 matrix-vector kernels stream that layout at about half
the rate of the transposed one (``[E, H, D]``, ``[E, D, F]``: every output a contiguous
dot product, HF's own layout). ``prepare_decode(model)`` gives every experts module a
``DecodePack`` in the compute dtype that holds the transposed copy, oneDNN's reordered
copy, or both: the ones the path rule in force runs on, the other made by the first path
that asks for it. Each costs one more copy of the experts' memory; the pack is never
saved (not in ``state_dict``), is rebuilt when the weights change (their version counter
moves) and is dropped by ``release_decode(model)``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["gemv_experts", "bmm_experts", "onednn_experts", "onednn_supports", "prepare_decode", "release_decode",
           "DecodePack", "decode_pack"]


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run oneDNN's prepacked linear in ``dtype`` (probed once on a
    16 x 16 weight: a CPU without bf16 support, or a torch built without oneDNN, says False)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.eye(16, dtype=dtype)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=dtype), _reorder(w), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.equal(y, torch.ones(1, 16, dtype=dtype)))


def _reorder(w_OI: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a linear weight ``[out, in]`` (for one-row batches)."""
    return torch.ops.mkldnn._reorder_linear_weight(w_OI.contiguous(), 1)


class DecodePack:
    """One ``GroupedExperts``' decode layouts in one compute dtype, each made on first use: the
    transposed copies ``w_in_EHD [E, H, D]`` and ``w_out_EDF [E, D, F]``, and oneDNN's reordered
    copy of each expert's weights (``onednn_weights``). ``prepare_decode`` makes the ones this
    CPU's path table runs on; a path that asks for another makes it then.

    ``w_in_EDH``, ``w_out_EFD``: the stored weights (read, never written, when a layout is
    made); ``source``: their ``(data_ptr, _version)`` pairs when the pack was made.
    """

    def __init__(self, w_in_EDH: torch.Tensor, w_out_EFD: torch.Tensor, dtype: torch.dtype, source: tuple = ()):
        self._stored = (w_in_EDH, w_out_EFD)
        self.dtype, self.device, self.source = dtype, w_in_EDH.device, source
        self._transposed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._onednn: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_in_EHD, w_out_EDF)``, made on the first call."""
        if self._transposed is None:
            with torch.no_grad():
                self._transposed = tuple(w.detach().to(self.dtype).transpose(1, 2).contiguous() for w in self._stored)
        return self._transposed

    @property
    def w_in_EHD(self) -> torch.Tensor:
        return self.transposed()[0]

    @property
    def w_out_EDF(self) -> torch.Tensor:
        return self.transposed()[1]

    def onednn_weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per expert oneDNN-reordered ``w_in [H, D]`` and ``w_out [D, F]``, made on the first call
        (from the transposed copy where there is one, else one expert at a time from the stored weights)."""
        if self._onednn is None:
            with torch.no_grad():
                sides = self._transposed or tuple(w.detach().transpose(1, 2) for w in self._stored)
                self._onednn = tuple(tuple(_reorder(w.to(self.dtype)) for w in side.unbind(0)) for side in sides)
        return self._onednn

    @property
    def nbytes(self) -> int:
        """Bytes of the layouts made so far."""
        n = sum(w.nbytes for w in self._transposed) if self._transposed is not None else 0
        if self._onednn is not None:
            n += sum(w.numel() * w.element_size() for side in self._onednn for w in side)
        return n

    def __reduce__(self):  # copies and pickles keep the transposed copy, never the reordered one (no storage)
        return (_restore_pack, (self._stored, self.dtype, self.source, self._transposed))


def _restore_pack(stored, dtype, source, transposed) -> DecodePack:
    pack = DecodePack(*stored, dtype, source)
    pack._transposed = transposed
    return pack


def _source(experts) -> tuple:
    w_in, w_out = experts.w_in_EDH, experts.w_out_EFD
    return (w_in.data_ptr(), w_in._version, w_out.data_ptr(), w_out._version)


def _pack(experts, dtype: torch.dtype) -> DecodePack:
    return DecodePack(experts.w_in_EDH, experts.w_out_EFD, dtype, _source(experts))


def _layouts_in_use(dtype: torch.dtype) -> tuple[bool, bool]:
    """``(transposed, onednn)``: whether this process's path rule runs any cell in ``dtype`` at the
    current thread count on each layout."""
    from moebal.expert_paths import active_rule

    packed = active_rule().packed_paths(dtype, torch.get_num_threads())
    return bool(packed - {"onednn_packed"}), "onednn_packed" in packed and onednn_supports(dtype)


def decode_pack(experts, dtype: torch.dtype) -> DecodePack | None:
    """The experts' decode layout in ``dtype`` when ``prepare_decode`` asked for one, else None.

    Rebuilt here when the weights changed since it was made (an optimizer step, a
    ``load_state_dict``) or the compute dtype differs; never used while the weights need
    gradients (the copy is detached).
    """
    pack = getattr(experts, "_decode_pack", None)
    if pack is None:
        return None
    if pack.dtype != dtype or pack.source != _source(experts) or pack.device != experts.w_in_EDH.device:
        pack = _pack(experts, dtype)
        experts._decode_pack = pack
    return pack


def _grouped_experts(model):
    from moebal.experts import GroupedExperts

    mods = [model] if isinstance(model, GroupedExperts) else [m for m in model.modules() if isinstance(m, GroupedExperts)]
    if not mods:
        raise ValueError(f"model has no moebal experts (GroupedExperts): got {type(model).__name__}")
    return mods


def prepare_decode(model, dtype: torch.dtype | None = None) -> int:
    """Give every ``GroupedExperts`` in ``model`` the decode layout; returns the bytes it takes.

    ``dtype``: the compute dtype (default: the weights' own). The ``"auto"`` expert path
    then runs on it wherever the path rule in force (``moebal.expert_paths.active_rule()``,
    this CPU's measured table unless ``use_rule`` set another) found a path on the decode
    layout fastest (``"onednn"`` for every bf16 batch on an AMD EPYC). It makes the layouts
    that rule runs on in ``dtype`` at the current thread count: the transposed copy,
    oneDNN's reordered copy, or both (one more copy of the experts' memory each); a path
    that asks for one not made here (an explicit ``path``, another rule) makes it on its
    first forward.
    """
    total = 0
    for ex in _grouped_experts(model):
        pack = _pack(ex, dtype or ex.w_in_EDH.dtype)
        transposed, onednn = _layouts_in_use(pack.dtype)
        if transposed:
            pack.transposed()
        if onednn:
            pack.onednn_weights()
        ex._decode_pack = pack
        total += pack.nbytes
    return total


def release_decode(model) -> None:
    """Drop the decode layout of every ``GroupedExperts`` in ``model``."""
    for ex in _grouped_experts(model):
        ex._decode_pack = None


def _pieces_to_rows(pieces: list[torch.Tensor], bounds, num_rows: int, like: torch.Tensor) -> torch.Tensor:
    """Concatenate per-expert outputs (in expert order) with zero rows for padding and empty tails.

    ``like``: an empty ``[0, D]`` tensor of the output's dtype, or, when no expert has a row,
    the whole (zero) output itself.
    """
    if not pieces:  # no expert has a row: all R rows are padding (zero rows of xs); keep the graph to xs
        return like
    out, row = [], 0
    width = like.shape[1]
    it = iter(pieces)
    for s, n, _ in bounds:
        if n == 0:
            continue
        if s > row:
            out.append(like.new_zeros(s - row, width))
        out.append(next(it))
        row = s + n
    if num_rows > row:
        out.append(like.new_zeros(num_rows - row, width))
    return torch.cat(out)


def _ffn_rows(x_nD, w_in, w_out, b_in, b_out, activation, transposed: bool) -> torch.Tensor:
    from moebal.experts import activate

    if transposed:  # w_in [H, D], w_out [D, F]
        h = torch.mv(w_in, x_nD[0]).unsqueeze(0) if x_nD.shape[0] == 1 else F.linear(x_nD, w_in)
    else:  # w_in [D, H], w_out [F, D]
        h = torch.mv(w_in.t(), x_nD[0]).unsqueeze(0) if x_nD.shape[0] == 1 else x_nD @ w_in
    if b_in is not None:
        h = h + b_in
    a = activate(h, activation)
    if transposed:
        y = torch.mv(w_out, a[0]).unsqueeze(0) if a.shape[0] == 1 else F.linear(a, w_out)
    else:
        y = torch.mv(w_out.t(), a[0]).unsqueeze(0) if a.shape[0] == 1 else a @ w_out
    return y + b_out if b_out is not None else y


def gemv_experts(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation, pack: DecodePack | None = None):
    """``ys [R, D]``: each touched expert's rows by matrix-vector-shaped calls; padding rows zero.

    ``bounds``: per expert ``(first row, rows in use, end of its block)`` (``host_bounds``).
    ``pack``: the decode layout (``decode_pack``); used only when no weight needs a gradient.
    """
    use_pack = _usable(pack, w_in_EDH, w_out_EFD)
    w_in, w_out = (pack.w_in_EHD, pack.w_out_EDF) if use_pack else (w_in_EDH, w_out_EFD)
    pieces = [
        _ffn_rows(xs_RD[s:s + n], w_in[e], w_out[e], None if b_in_EH is None else b_in_EH[e],
                  None if b_out_ED is None else b_out_ED[e], activation, use_pack)
        for e, (s, n, _) in enumerate(bounds) if n
    ]
    return _pieces_to_rows(pieces, bounds, xs_RD.shape[0], xs_RD * 0 if not pieces else xs_RD.new_empty(0, w_out_EFD.shape[-1]))


def _runs(bounds) -> list[tuple[int, int]]:
    """``(first, end)`` expert index ranges of adjacent experts that have rows."""
    runs: list[list[int]] = []
    for e, (_, n, _) in enumerate(bounds):
        if n:
            if runs and runs[-1][1] == e:
                runs[-1][1] = e + 1
            else:
                runs.append([e, e + 1])
    return [tuple(r) for r in runs]


def _usable(pack: DecodePack | None, w_in_EDH, w_out_EFD) -> bool:
    """A decode layout serves only a forward that takes no weight gradient (the copy is detached)."""
    return pack is not None and not (torch.is_grad_enabled() and (w_in_EDH.requires_grad or w_out_EFD.requires_grad))


def onednn_experts(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation,
                   pack: DecodePack | None = None):
    """``ys [R, D]``: oneDNN's linear per touched expert on reordered weights; padding rows zero.

    Inference only (the reordered weights carry no gradient): a ValueError where a gradient
    would be taken. ``pack``: the decode layout, whose reordered weights are made once;
    without one the touched experts' weights are reordered on this call.
    """
    from moebal.experts import activate

    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED)):
        raise ValueError("path='onednn' runs without gradients only (inference_mode or no_grad); "
                         "path='auto' picks 'loop' when a gradient will be taken")
    if xs_RD.device.type != "cpu":
        raise ValueError(f"path='onednn' runs on the CPU only, got rows on {xs_RD.device}; use path='auto'")
    if not onednn_supports(xs_RD.dtype):
        raise ValueError(f"path='onednn' needs oneDNN's linear in {xs_RD.dtype} on this CPU and torch build, "
                         "which it does not have; use path='auto'")
    linear = torch.ops.mkldnn._linear_pointwise
    w_in, w_out = pack.onednn_weights() if pack is not None else (None, None)
    pieces = []
    for e, (s, n, _) in enumerate(bounds):
        if n:
            wi = w_in[e] if w_in is not None else _reorder(w_in_EDH[e].t())
            wo = w_out[e] if w_out is not None else _reorder(w_out_EFD[e].t())
            h = linear(xs_RD[s:s + n], wi, None if b_in_EH is None else b_in_EH[e], "none", [], "")
            pieces.append(linear(activate(h, activation), wo, None if b_out_ED is None else b_out_ED[e],
                                 "none", [], ""))
    return _pieces_to_rows(pieces, bounds, xs_RD.shape[0], xs_RD * 0 if not pieces else xs_RD.new_empty(0, w_out_EFD.shape[-1]))


def bmm_experts(xs_RD, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, bounds, activation, pack: DecodePack | None = None):
    """``ys [R, D]``: one padded ``bmm`` per run of adjacent touched experts; padding rows zero.

    ``pack``: the decode layout, read through transposed views (bf16 bmm streams it faster).
    """
    from moebal.experts import activate

    if _usable(pack, w_in_EDH, w_out_EFD):
        w_in_EDH, w_out_EFD = pack.w_in_EHD.transpose(1, 2), pack.w_out_EDF.transpose(1, 2)

    R, D = xs_RD.shape
    zero_1D = xs_RD.new_zeros(1, D)
    x_pad = torch.cat([xs_RD, zero_1D])  # row R is the zero row that pads each expert to C rows
    pieces = []
    for e0, e1 in _runs(bounds):
        counts = [bounds[e][1] for e in range(e0, e1)]
        C, L = max(counts), e1 - e0
        rows_LC = torch.full((L, C), R, dtype=torch.long)
        for i, e in enumerate(range(e0, e1)):
            rows_LC[i, :counts[i]] = torch.arange(bounds[e][0], bounds[e][0] + counts[i])
        x_LCD = x_pad.index_select(0, rows_LC.view(-1)).view(L, C, D)
        h = torch.bmm(x_LCD, w_in_EDH[e0:e1])
        if b_in_EH is not None:
            h = h + b_in_EH[e0:e1].unsqueeze(1)
        y_LCD = torch.bmm(activate(h, activation), w_out_EFD[e0:e1])
        if b_out_ED is not None:
            y_LCD = y_LCD + b_out_ED[e0:e1].unsqueeze(1)
        pieces += [y_LCD[i, :n] for i, n in enumerate(counts)]
    return _pieces_to_rows(pieces, bounds, R, xs_RD * 0 if not pieces else xs_RD.new_empty(0, w_out_EFD.shape[-1]))
