"""Reporting: the plain-text ratio table, the JSON file and the bar-chart plot of a saved run."""
from __future__ import annotations

import json
from pathlib import Path

from moebal.bench.timing import paired_ratio


def format_table(result: dict) -> str:
    """A plain-text table: per threads and dtype, rows config x mode, columns ratio to dense."""
    lines = []
    dev = result.get("device", {})
    vers = result.get("versions", {})
    lines.append(f"device: {dev.get('name')} ({dev.get('cpu_capability')}); torch {vers.get('torch')}"
                 + (f", transformers {vers['transformers']}" if "transformers" in vers else ""))
    groups: dict[tuple, list] = {}
    for run in result["runs"]:
        groups.setdefault((run["threads"], run["dtype"]), []).append(run)
    for (n_threads, dname), runs in groups.items():
        names = []
        for run in runs:
            names += [n for n in run["impls"] if n != "dense" and n not in names]
        header = ["config", "mode", "dense ms", "dense GF/s"] + names
        rows = [header]
        for run in runs:
            d = run["impls"].get("dense", {})
            row = [run["config"]["name"], run["mode"], f"{d.get('best_s', float('nan')) * 1e3:.1f}",
                   f"{run.get('dense_gflops_per_s') or float('nan'):.0f}"]
            for n in names:
                v = run["impls"].get(n)
                row.append(f"{v['ratio_to_dense']:.2f} ({_paired(v, d):.2f})" if v and v["ratio_to_dense"] else "-")
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        timer = runs[0].get("timer", "wall")
        lines.append(f"\nthreads={n_threads} dtype={dname}  ({timer} time / dense-equivalent {timer} time; lower is "
                     "better): fastest / fastest (median over rounds of the same round's ratio)")
        for r in rows:
            lines.append("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if result.get("stages"):
        lines.append("\nmoebal stages (ms, fastest round): forward | backward")
        for st in result["stages"]:
            fwd = " ".join(f"{k} {v * 1e3:.1f}" for k, v in st["fwd_s"].items())
            bwd = " ".join(f"{k} {v * 1e3:.1f}" for k, v in st["bwd_s"].items())
            lines.append(f"  {st['config']} {st['dtype']} t={st['threads']}: {fwd} | {bwd}")
    if result.get("gemm_floor"):
        lines.append("\nGEMM floor (the six GEMMs alone, every expert T*K/E rows): per-expert / dense"
                     " [same calls, every expert on expert 0's weights, i.e. weights in cache]")
        for fl in result["gemm_floor"]:
            cached = fl.get("cached_ratio")
            lines.append(f"  {fl['config']} {fl['dtype']} t={fl['threads']}: {fl['ratio']:.3f} "
                         f"({fl['per_expert_gemms_s'] * 1e3:.1f} ms vs {fl['dense_gemms_s'] * 1e3:.1f} ms)"
                         + (f" [{cached:.3f}]" if cached is not None else ""))
    if result.get("skipped_peers"):
        lines.append("\nskipped peers: " + "; ".join(f"{k}: {v}" for k, v in result["skipped_peers"].items()))
    return "\n".join(lines)


def _paired(impl: dict, dense: dict) -> float:
    """The impl's ``paired_ratio_to_dense``, computed from the round times when a saved run lacks it."""
    if impl.get("paired_ratio_to_dense") is not None:
        return impl["paired_ratio_to_dense"]
    if not dense.get("times_s"):
        return float("nan")
    return paired_ratio(impl["times_s"], dense["times_s"])


def save_json(result: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def plot(json_path, png_path) -> None:
    """Bar chart of time / dense time per config, one panel per (threads, dtype, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    result = json.loads(Path(json_path).read_text())
    panels: dict[tuple, list] = {}
    for run in result["runs"]:
        panels.setdefault((run["threads"], run["dtype"], run["mode"]), []).append(run)
    keys = sorted(panels)
    ncols = 2
    nrows = max(1, (len(keys) + ncols - 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        runs = panels[key]
        configs = [r["config"]["name"] for r in runs]
        names = []
        for r in runs:
            names += [n for n in r["impls"] if n != "dense" and n not in names]
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            vals = [(r["impls"].get(n) or {}).get("ratio_to_dense") or 0.0 for r in runs]
            pos = [c + (i - (len(names) - 1) / 2) * width for c in range(len(configs))]
            bars = ax.bar(pos, vals, width, label=n)
            for b, v in zip(bars, vals):
                if v:
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.set_xticks(range(len(configs)), configs)
        ax.set_ylabel("time / dense-equivalent")
        threads, dname, mode = key
        ax.set_title(f"{mode}, {dname}, {threads} thread(s), {runs[0].get('timer', 'wall')} time")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    dev = result.get("device", {}).get("name", "")
    fig.suptitle(f"MoE layer vs dense SwiGLU FFN of equal active FLOPs ({dev}, torch {result['versions']['torch']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
