"""Tables, a generated reading, pictures and files for ``moebal multitask``."""
from __future__ import annotations

import math
from pathlib import Path
from statistics import mean

from moebal.compare.report import _pyplot, _save_figure, _write_atomic, check_out_dir, write_results

__all__ = ["format_tables", "reading", "plot_quality", "plot_gate_mass", "write_all", "check_out_dir"]


def _runs(results: dict, model: str, correlation: float | None = None) -> list[dict]:
    return [r for r in results["runs"] if r["model"] == model and (correlation is None or r["correlation"] == correlation)]


def _avg(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return mean(values) if values else math.nan


def dense_r2(r: dict) -> float:
    names = [n for n in r["r2"] if n != "sparse"]
    return mean(r["r2"][n] for n in names)


def _models(results: dict) -> list[str]:
    return list(results["config"]["models"])


def _corrs(results: dict) -> list[float]:
    return list(results["config"]["correlations"])


def _fmt(v: float, spec: str = ".3f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_tables(results: dict) -> str:
    """Quality per correlation, then the statistics averaged over correlations and seeds."""
    models, corrs = _models(results), _corrs(results)
    width = max(len(m) for m in models) + 1
    seeds = results["config"]["seeds"]
    lines = [f"test R^2 (dense = mean of the two dense tasks; sparse = the ~1 %-labelled task"
             + (f"; mean of {seeds} seeds" if seeds > 1 else "") + ")"]
    head = f"{'model':<{width}} {'params':>7}" + "".join(f" | corr {c:<4g} dense sparse" for c in corrs)
    lines.append(head)
    lines.append("-" * len(head))
    for m in models:
        runs = _runs(results, m)
        cells = "".join(
            f" | {'':9}{_avg(dense_r2(r) for r in _runs(results, m, c)):>6.3f} {_avg(r['r2']['sparse'] for r in _runs(results, m, c)):>6.3f}"
            for c in corrs
        )
        lines.append(f"{m:<{width}} {runs[0]['params']:>7}{cells}")
    lines.append("")
    lines.append("statistics on the test set, final level, mean over correlations and seeds")
    head = (f"{'model':<{width}} {'experts':>7} {'shared occ.':>11} {'own use dense':>13} {'own use sparse':>14} "
            f"{'dead units':>10} {'out rms min':>11} {'entropy sparse':>14}")
    lines.append(head)
    lines.append("-" * len(head))
    for m in models:
        runs = _runs(results, m)
        occ = _avg(r["shared_occupancy"] for r in runs)
        own_dense = _avg(mean(v for k, v in r["own_use"].items() if k != "sparse") for r in runs)
        lines.append(
            f"{m:<{width}} {runs[0]['num_experts']:>7} {_fmt(occ):>11} {_fmt(own_dense):>13} "
            f"{_fmt(_avg(r['own_use']['sparse'] for r in runs)):>14} {_fmt(_avg(r['dead_ratio'] for r in runs), '.1%'):>10} "
            f"{_fmt(_avg(r['output_rms'][0] for r in runs), '.3g'):>11} {_fmt(_avg(r['entropy']['sparse'] for r in runs)):>14}"
        )
    k = len(results["task_names"])
    lines.append(f"shared occ.: max_k W[k,e] / sum_k W[k,e] over shared experts (1/K = {1 / k:.3f} even, 1 = one task "
                 "captured it); own use: gate mass on the task's own experts")
    return "\n".join(lines)


def reading(results: dict) -> str:
    """What the numbers say on the issue's three questions, generated from the results."""
    models, corrs = _models(results), sorted(_corrs(results), reverse=True)
    out = []
    if "shared-bottom" in models and "mmoe" in models:
        gaps = [(c, _avg(dense_r2(r) for r in _runs(results, "mmoe", c)) - _avg(dense_r2(r) for r in _runs(results, "shared-bottom", c)))
                for c in corrs]
        text = ", ".join(f"{g:+.3f} at {c:g}" for c, g in gaps)
        trend = ""
        if len(gaps) > 1:
            first, last = gaps[0][1], gaps[-1][1]
            trend = (" — the gap grows as the correlation falls" if last > first
                     else " — the gap does not grow as the correlation falls")
        out.append(f"MMoE minus shared-bottom, dense-task R^2: {text}{trend}.")
    occ = {m: _avg(r["shared_occupancy"] for r in _runs(results, m)) for m in models if m != "shared-bottom"}
    occ = {m: v for m, v in occ.items() if not math.isnan(v)}
    if "mmoe" in occ and len(occ) > 1:
        parts = [f"{m} {v:.3f} ({'lower' if v < occ['mmoe'] else 'not lower'} than MMoE)" for m, v in occ.items() if m != "mmoe"]
        out.append(f"Shared-expert occupancy: MMoE {occ['mmoe']:.3f}; " + "; ".join(parts) + ".")
    own = {m: _avg(r["own_use"]["sparse"] for r in _runs(results, m)) for m in models}
    own = {m: v for m, v in own.items() if v > 0}
    if own:
        best = max(own, key=own.get)
        out.append("Sparse task's gate mass on its own experts: " + ", ".join(f"{m} {v:.3f}" for m, v in own.items())
                   + f" (highest: {best}).")
    sparse = {m: _avg(r["r2"]["sparse"] for r in _runs(results, m)) for m in models}
    best = max(sparse, key=sparse.get)
    out.append("Sparse-task R^2 (mean over correlations): " + ", ".join(f"{m} {v:.3f}" for m, v in sparse.items())
               + f" (best: {best}).")
    return "\n".join(out)


def plot_quality(results: dict, path: str | Path) -> Path:
    """Dense-task and sparse-task R^2 against the dense tasks' correlation, one line per model."""
    plt = _pyplot()
    corrs = sorted(_corrs(results))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in _models(results):
        axes[0].plot(corrs, [_avg(dense_r2(r) for r in _runs(results, m, c)) for c in corrs], marker="o", label=m)
        axes[1].plot(corrs, [_avg(r["r2"]["sparse"] for r in _runs(results, m, c)) for c in corrs], marker="o", label=m)
    for ax, title in zip(axes, ("dense tasks (mean R^2)", "sparse task (R^2, ~1 % labels)")):
        ax.set_xlabel("correlation of the dense tasks' weight vectors")
        ax.set_ylabel("test R^2")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def plot_gate_mass(results: dict, path: str | Path, correlation: float | None = None) -> Path:
    """Gate-mass heatmaps ``W[task, expert]`` (final level, seed 0), one panel per model."""
    plt = _pyplot()
    corr = min(_corrs(results)) if correlation is None else correlation
    runs = [r for m in _models(results) for r in _runs(results, m, corr) if r["seed"] == 0]
    names = results["task_names"]
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 2.4 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, r in zip(axes.flat, runs):
        W = r["levels"][-1]["gate_mass_KE"]
        image = ax.imshow(W, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        labels = ["S" if o == -1 else (f"G{-(o + 2)}" if o <= -2 else f"T{o}") for o in r["owner"]]
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.set_title(f"{r['model']} (R^2 sparse {r['r2']['sparse']:.2f})", fontsize=10)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="mean gate weight")
    fig.suptitle(f"gate mass W[task, expert] at correlation {corr:g} (S shared, G group, T task experts)", fontsize=10)
    return _save_figure(plt, fig, path)


def write_all(results: dict, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """results.json, report.md and (with plots) quality.png and gate_mass.png."""
    out = Path(out_dir)
    paths = {"results": write_results(results, out / "results.json")}
    text = "# moebal multitask\n\n```\n" + format_tables(results) + "\n```\n\n" + reading(results) + "\n"
    paths["report"] = _write_atomic(out / "report.md", lambda f: f.write(text.encode()))
    if plots:
        paths["quality"] = plot_quality(results, out / "quality.png")
        paths["gate_mass"] = plot_gate_mass(results, out / "gate_mass.png")
    return paths
