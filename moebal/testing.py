"""Assertions for users' own unit tests."""
from __future__ import annotations

import math

import torch
from torch import nn

from moebal import stats as _stats
from moebal.stats import BalanceStats

__all__ = ["assert_balanced", "balance_table", "assert_multitask"]


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



def _bound(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number or None, got {value!r}")
    return float(value)


def assert_multitask(
    stats_or_model,
    *,
    max_shared_occupancy: float | None = None,
    min_own_use: float | None = None,
    max_dead_ratio: float | None = None,
    min_output_rms: float | None = None,
) -> None:
    """Fail with a per-expert table when a multi-gate MoE shows the failures HoME names.

    ``stats_or_model``: a ``MultiGateMoE`` (its ``last_stats``, every level), a list of
    ``MultiGateStats`` (one per level, e.g. ``MultiTaskMeter.mean()``) or one of them.
    Bounds left None are not checked:

    - ``max_shared_occupancy``: expert degradation, a shared expert occupied by one task
      (occupancy ``max_k W[k,e] / sum_k W[k,e]`` above the bound);
    - ``min_own_use``: expert underfitting, a task ignoring its own experts (given a
      model, checked for the tasks that own experts; given statistics, for every task);
    - ``max_dead_ratio``: expert collapse, the share of an expert's hidden units that are
      never positive;
    - ``min_output_rms``: an expert whose output has (almost) vanished.

    A NaN statistic fails the bound it is checked against.
    """
    from moebal.multitask_stats import MultiGateStats, stats_table

    bounds = {
        "max_shared_occupancy": _bound("max_shared_occupancy", max_shared_occupancy),
        "min_own_use": _bound("min_own_use", min_own_use),
        "max_dead_ratio": _bound("max_dead_ratio", max_dead_ratio),
        "min_output_rms": _bound("min_output_rms", min_output_rms),
    }
    owner = None
    if isinstance(stats_or_model, MultiGateStats):
        levels = [stats_or_model]
    elif isinstance(stats_or_model, (list, tuple)) and stats_or_model and all(
        isinstance(s, MultiGateStats) for s in stats_or_model
    ):
        levels = list(stats_or_model)
    elif isinstance(stats_or_model, nn.Module) and hasattr(stats_or_model, "owner"):
        if not stats_or_model.last_stats:
            raise ValueError("assert_multitask: the model has no statistics; build it with track_stats=True "
                             "and run a forward pass first")
        levels, owner = stats_or_model.last_stats, stats_or_model.owner
    else:
        raise TypeError("assert_multitask takes a MultiGateMoE, a MultiGateStats or a list of them, "
                        f"got {type(stats_or_model).__name__}")
    failures = []
    for level, st in enumerate(levels):
        problems = []
        occ = st.occupancy_E
        b = bounds["max_shared_occupancy"]
        if b is not None:
            for e in st.shared_E.nonzero().flatten().tolist():
                if not float(occ[e]) <= b:
                    problems.append(f"shared expert {e}: occupancy {float(occ[e]):.3f} > {b}")
        b = bounds["min_own_use"]
        if b is not None:
            for k in range(st.own_use_K.shape[0]):
                if owner is not None and k not in owner:
                    continue  # task k has no own experts
                if not float(st.own_use_K[k]) >= b:
                    problems.append(f"task {k}: own-expert use {float(st.own_use_K[k]):.3f} < {b}")
        b = bounds["max_dead_ratio"]
        if b is not None:
            for e, v in enumerate(st.dead_ratio_E.tolist()):
                if not v <= b:
                    problems.append(f"expert {e}: dead-unit ratio {v:.1%} > {b:.1%}")
        b = bounds["min_output_rms"]
        if b is not None:
            for e, v in enumerate(st.output_rms_E.tolist()):
                if not v >= b:
                    problems.append(f"expert {e}: output RMS {v:.3g} < {b}")
        if problems:
            failures.append(f"level {level}:\n  " + "\n  ".join(problems) + "\n" + stats_table(st, owner))
    if failures:
        raise AssertionError("multi-task experts fail their bounds\n" + "\n\n".join(failures))
