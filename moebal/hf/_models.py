"""Finding decoder layers and their FFNs by structure, and the report of what was replaced.

Nothing here imports transformers at module import time; classes it needs (``Conv1D``,
the activation modules) are looked up lazily, so ``import moebal`` works without it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

__all__ = ["Replacement", "SwapReport", "find_layer_lists", "set_submodule", "activation_name"]


@dataclass(frozen=True)
class Replacement:
    """One module swapped: where, from what, to what."""

    layer: int  # index of the decoder layer in its layer list
    path: str  # qualified name of the replaced module, e.g. "model.layers.3.mlp"
    old_class: str
    new_class: str
    upcycled: bool = False
    # what the reverse conversion needs (HF MoE blocks only); not shown in the report
    old_type: type | None = field(default=None, repr=False, compare=False)
    old_config: object | None = field(default=None, repr=False, compare=False)


@dataclass
class SwapReport:
    """What a swap replaced, and each layer it left alone with the reason."""

    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (layer, path, reason)

    def __len__(self) -> int:
        return len(self.replaced)

    def __iter__(self) -> Iterator[Replacement]:
        return iter(self.replaced)

    def __str__(self) -> str:
        lines = [f"{'layer':>5}  {'module':<32} {'old class':<28} new class"]
        for r in self.replaced:
            extra = "  (upcycled)" if r.upcycled else ""
            lines.append(f"{r.layer:>5}  {r.path:<32} {r.old_class:<28} {r.new_class}{extra}")
        for layer, path, reason in self.skipped:
            lines.append(f"{layer:>5}  {path:<32} skipped: {reason}")
        return "\n".join(lines)


def find_layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ``nn.ModuleList`` whose entries are all of one class (the decoder layer stacks)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and not isinstance(module[0], nn.ModuleList):
                found.append((name, module))
    return found


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def activation_name(act: nn.Module) -> str | None:
    """moebal's name for a transformers/torch activation module, or None when moebal has none.

    ``"silu"`` (the gate of SwiGLU MLPs), ``"gelu"`` (exact erf), ``"gelu_tanh"`` (also the
    gate of GeGLU MLPs) or ``"relu"``. GPT-2's ``gelu_new``, ``gelu_fast`` and Bloom's GELU
    are the tanh formula written out in Python (Bloom's with sqrt(2/pi) rounded to
    0.79788456, a relative 1e-9 off); moebal computes it with ``F.gelu(approximate="tanh")``,
    equal to them within a few fp32 ulps (not bit-exact).
    """
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    try:
        from transformers import activations as A
    except ImportError:  # pragma: no cover - only HF modules reach here
        return None
    if isinstance(act, A.SiLUActivation):
        return "silu"
    if isinstance(act, A.GELUActivation):
        return "gelu"
    if isinstance(act, (A.NewGELUActivation, A.GELUTanh, A.FastGELUActivation)):
        return "gelu_tanh"
    bloom = sys.modules.get("transformers.models.bloom.modeling_bloom")  # loaded if a BloomGelu exists
    if bloom is not None and isinstance(act, bloom.BloomGelu):
        return "gelu_tanh"
    return None
