"""State-dict translation that accounts for every key.

A conversion is a list of :class:`Rule` s, each turning a few source tensors into a few
target tensors. :func:`translate` checks that the rules consume every source key exactly
once, produce every target key exactly once (except those the caller declares ``fresh``:
keys the target keeps from its own initialisation, such as a new router), and that each
produced tensor has the target's shape — then loads the result with ``strict=True``.
Any mismatch raises :class:`ConversionError` listing the missing, unexpected and
mis-shaped keys together, so nothing is skipped or padded silently. The target is always
a module the converter just built, so each filled tensor takes its source's dtype: the
copy is bit-exact, never rounded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["ConversionError", "Rule", "translate", "same", "transpose_last2"]


class ConversionError(ValueError):
    """A module cannot be converted without loss (keys, shapes or unsupported semantics)."""


@dataclass(frozen=True)
class Rule:
    """``dst tensors = fn(*src tensors)``; ``fn`` returns one tensor or a tuple."""

    src: tuple[str, ...]
    dst: tuple[str, ...]
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def same(x: torch.Tensor) -> torch.Tensor:
    return x


def transpose_last2(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


def _fmt(keys) -> str:
    return ", ".join(sorted(keys)) if keys else "-"


def translate(
    src: nn.Module,
    dst: nn.Module,
    rules: Sequence[Rule],
    fresh: Sequence[str] = (),
    what: str = "conversion",
) -> None:
    """Fill the freshly built ``dst`` from ``src`` through ``rules`` (bit-exact, source dtypes)."""
    src_sd = src.state_dict()
    dst_sd = dst.state_dict()
    consumed = [k for r in rules for k in r.src]
    produced = [k for r in rules for k in r.dst] + list(fresh)
    missing_src = sorted(set(consumed) - set(src_sd))
    unexpected_src = sorted(set(src_sd) - set(consumed))
    missing_dst = sorted(set(dst_sd) - set(produced))
    unexpected_dst = sorted(set(produced) - set(dst_sd))
    twice = sorted({k for k in consumed if consumed.count(k) > 1} | {k for k in produced if produced.count(k) > 1})
    problems = []
    if missing_src:
        problems.append(f"source keys the rules need but {type(src).__name__} lacks: {_fmt(missing_src)}")
    if unexpected_src:
        problems.append(f"source keys no rule converts: {_fmt(unexpected_src)}")
    if missing_dst:
        problems.append(f"target keys nothing fills: {_fmt(missing_dst)}")
    if unexpected_dst:
        problems.append(f"keys produced that {type(dst).__name__} does not have: {_fmt(unexpected_dst)}")
    if twice:
        problems.append(f"keys used more than once: {_fmt(twice)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))

    out = {k: dst_sd[k] for k in fresh}
    bad_shapes = []
    for rule in rules:
        values = rule.fn(*(src_sd[k] for k in rule.src))
        values = values if isinstance(values, tuple) else (values,)
        if len(values) != len(rule.dst):
            raise ConversionError(f"{what}: rule {rule.src} -> {rule.dst} returned {len(values)} tensors")
        for key, value in zip(rule.dst, values):
            if tuple(value.shape) != tuple(dst_sd[key].shape):
                bad_shapes.append(f"{key}: got {tuple(value.shape)}, expected {tuple(dst_sd[key].shape)}")
            if value.dtype != dst_sd[key].dtype:
                if value.is_floating_point() != dst_sd[key].is_floating_point():
                    bad_shapes.append(f"{key}: got dtype {value.dtype}, expected {dst_sd[key].dtype}")
                _adopt_dtype(dst, key, value.dtype)
            out[key] = value.contiguous()
    if bad_shapes:
        raise ConversionError(f"{what}: shape/dtype mismatch: " + "; ".join(bad_shapes))
    dst.load_state_dict(out, strict=True)


def _adopt_dtype(module: nn.Module, key: str, dtype: torch.dtype) -> None:
    """Give the parameter or buffer ``key`` of ``module`` the dtype ``dtype`` (values follow)."""
    owner_path, _, name = key.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if name in owner._parameters:
        owner._parameters[name].data = owner._parameters[name].data.to(dtype)
    else:
        owner._buffers[name] = owner._buffers[name].to(dtype)
