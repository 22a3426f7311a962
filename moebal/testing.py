"""Assertions for users' own unit tests."""
from __future__ import annotations

import math

import torch
from torch import nn

from moebal import stats as _stats
from moebal.stats import BalanceStats

__all__ = ["assert_balanced", "balance_table"]


def balance_table(load: torch.Tensor, limit: int = 8) -> str:
    """A readable table of the most over- and under-loaded experts, with the loads as given
    (integer counts as integers, float loads unrounded) and any non-finite load listed."""
    load = load.detach().cpu()
    values = load.tolist()
    finite = [e for e, v in enumerate(values) if math.isfinite(v)]
    mean = sum(values[e] for e in finite) / len(finite) if finite else math.nan
    order = sorted(finite, key=lambda e: -values[e])  # stable: equal loads keep expert order
    fmt = "d" if not load.is_floating_point() else ".6g"
    rows = [f"{'expert':>6} {'load':>10} {'vs mean':>9}"]

    def row(e):
        v = values[e]
        rel = (v - mean) / mean if mean > 0 else 0.0
        return f"{e:>6} {v:>10{fmt}} {rel:>+9.1%}" if math.isfinite(v) else f"{e:>6} {v:>10}"

    over = [e for e in order if values[e] > mean][:limit]
    under = [e for e in reversed(order) if values[e] < mean][:limit]
    rows.append("over-loaded:" if over else "over-loaded: none")
    rows += [row(e) for e in over]
    rows.append("under-loaded:" if under else "under-loaded: none")
    rows += [row(e) for e in under]
    bad = [e for e, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        rows.append("not finite:")
        rows += [row(e) for e in bad[:limit]]
    rows.append(f"mean load {mean:.2f} over {load.numel()} experts" + (" (finite loads only)" if bad else ""))
    return "\n".join(rows)


def _loads(load_or_model) -> list[tuple[str, torch.Tensor]]:
    if isinstance(load_or_model, torch.Tensor):
        return [("load", load_or_model)]
    if isinstance(load_or_model, BalanceStats):
        return [("stats", load_or_model.load)]
    if isinstance(load_or_model, nn.Module):
        found = [
            (name or type(m).__name__, m.last_stats.load)
            for name, m in load_or_model.named_modules()
            if isinstance(getattr(m, "last_stats", None), BalanceStats)
        ]
        if not found:
            raise ValueError("assert_balanced: the model has no MoE layer with statistics; run a forward pass first")
        return found
    raise TypeError(f"assert_balanced takes a load tensor, BalanceStats or nn.Module, got {type(load_or_model).__name__}")


def assert_balanced(load_or_model, max_violation: float = 0.1) -> None:
    """Fail with a table of over/under-loaded experts when any layer's MaxVio exceeds the bound.

    Fails closed: a load holding NaN or inf fails whatever the bound (its MaxVio is NaN).
    An empty load (all zeros) has MaxVio 0 and passes.
    """
    limit = max_violation
    failures = []
    for name, load in _loads(load_or_model):
        if not bool(torch.isfinite(load).all()):
            failures.append(f"{name}: load is not finite\n{balance_table(load)}")
            continue
        vio = float(_stats.max_violation(load))
        if not vio <= limit:  # NaN fails too
            failures.append(f"{name}: MaxVio {vio:.4f} > {limit}\n{balance_table(load)}")
    if failures:
        raise AssertionError("experts are not balanced\n" + "\n\n".join(failures))

