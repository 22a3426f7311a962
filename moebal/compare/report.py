"""Tables, JSON and plots of ``moebal compare`` results (plots read the saved results).

``format_table`` returns the text table printed on stdout (mean ± sd over the seeds when
there are several); ``write_results`` writes ``results.json``; ``plot_maxvio``,
``plot_load_heatmap`` and ``plot_frontier`` draw PNGs from a results
dict (as loaded from ``results.json``), so a figure can always be redrawn from the file.
Every file is written to a temporary name in its directory and renamed into place, so a
reader never sees a half-written file and a failed write leaves the old one intact.
``check_out_dir`` checks an output directory before any training starts.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Callable

__all__ = [
    "format_table", "format_markdown_table", "check_out_dir", "write_results", "plot_maxvio",
    "plot_load_heatmap", "plot_frontier", "within_spread", "frontier", "reading", "format_report", "write_report",
    "write_all",
]

_COLUMNS = (
    ("policy", "name", "{}"),
    ("val bpb", "val_bpb", "{:.4f}"),
    ("bpb_in", "val_in_bpb", "{:.4f}"),
    ("MaxVio_global", "maxvio_global", "{:.3f}"),
    ("MaxVio_in", "maxvio_global_in", "{:.3f}"),
    ("MaxVio_train", "maxvio_global_train_last", "{:.3f}"),
    ("MaxVio_batch", "maxvio_batch", "{:.3f}"),
    ("dropped %", "dropped_frac", "{:.2%}"),
    ("over cap@1.0 %", "overflow_frac_cf1", "{:.2%}"),
    ("experts/tok", "val_experts_per_token", "{:.2f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
)


def _cells(policy: dict) -> list[str]:
    cells = []
    for _, key, fmt in _COLUMNS:
        value = policy.get(key)
        cells.append("-" if value is None else fmt.format(value).replace("%", ""))
    return cells


def _summary_cells(summary: dict) -> list[str]:
    """``mean ± sd`` over the seeds for each column (sd: sample standard deviation)."""
    cells = [summary["name"]]
    for _, key, fmt in _COLUMNS[1:]:
        st = summary.get(key)
        cells.append("-" if st is None else f"{fmt.format(st['mean'])} ± {fmt.format(st['sd'])}".replace("%", ""))
    return cells


def _rows(results: dict) -> list[list[str]]:
    if results.get("summary"):
        return [_summary_cells(s) for s in results["summary"]]
    return [_cells(p) for p in results["policies"]]


def within_spread(results: dict, key: str = "val_bpb") -> list[tuple[str, str]]:
    """Pairs of policies whose ``key`` means differ by no more than the larger of their
    seed spreads (max - min over the seeds): the seeds cannot tell them apart."""
    summary = results.get("summary") or []
    pairs = []
    for i, a in enumerate(summary):
        for b in summary[i + 1:]:
            if key in a and key in b:
                spread = max(a[key]["max"] - a[key]["min"], b[key]["max"] - b[key]["min"])
                if abs(a[key]["mean"] - b[key]["mean"]) <= spread:
                    pairs.append((a["name"], b["name"]))
    return pairs


def _seed_note(results: dict) -> str:
    seeds = results.get("seeds") or []
    if len(seeds) < 2:
        return ""
    close = within_spread(results)
    listed = "; ".join(f"{a} ~ {b}" for a, b in close) if close else "none"
    return (
        f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± sample sd. Val bpb within the seed spread "
        f"of each other (|difference of means| <= the larger max - min): {listed}"
    )


def format_table(results: dict) -> str:
    """A fixed-width text table, one row per policy, plus a line saying what was measured."""
    header = [title for title, _, _ in _COLUMNS]
    rows = _rows(results)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(_footnote(results) + _seed_note(results))
    return "\n".join(out)


def format_markdown_table(results: dict) -> str:
    header = [title for title, _, _ in _COLUMNS]
    rows = _rows(results)
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    out = ["| " + " | ".join(header) + " |", rule]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _footnote(results: dict) -> str:
    cfg = results["config"]
    m = cfg["model"]
    cap = "dropless" if m.get("capacity_factor") is None else f"capacity factor {m['capacity_factor']}"
    return (
        f"{cfg['steps']} steps x {cfg['batch']}x{cfg['seq_len']} bytes; {m['layers']} layers, d_model {m['d_model']}, "
        f"{m['num_experts']} experts (hidden {m['expert_hidden']}), top-{m['top_k']}, {cap}; "
        f"val bpb and MaxVio_global over {results['policies'][0].get('val_tokens', '?')} bytes of the held-out "
        f"files, bpb_in and MaxVio_in over as many bytes of held-out chunks of the training files (eval mode); "
        f"MaxVio_train (summed counts) and MaxVio_batch (mean per step) over the last "
        f"{round(cfg['last_frac'] * 100)} % of training steps; device {results['device']['device']}, "
        f"{results['device'].get('threads', '?')} thread(s)"
    )


def check_out_dir(path: str | Path) -> Path:
    """Make sure ``path`` is a directory this process can create files in, creating it if needed.

    Raises ``ValueError`` saying why it cannot hold results: an existing non-directory, a
    directory that cannot be created, or one that refuses a new file (checked by creating
    and removing one, which is what counts: ``os.access`` says yes to root on read-only mounts).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create directory {str(path)!r}: {err.strerror or err}") from None
    probe = path / f".moebal-probe-{secrets.token_hex(4)}"
    try:
        with open(probe, "xb"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write in directory {str(path)!r}: {err.strerror or err}") from None
    probe.unlink()
    return path


def _write_atomic(path: str | Path, write: Callable[[object], None]) -> Path:
    """``write(file)`` into a temporary file beside ``path``, then rename it onto ``path``.

    The temporary file is opened like any new file (mode from the umask); on any error it
    is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _save_figure(plt, fig, path: str | Path) -> Path:
    """Save and close ``fig``; the format follows the file's suffix (PNG when it has none)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        return _write_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=110))
    finally:
        plt.close(fig)


def write_results(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, allow_nan=False) + "\n"
    return _write_atomic(path, lambda f: f.write(text.encode()))


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("plots need matplotlib: pip install 'moebal[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_maxvio(results: dict, path: str | Path) -> Path:
    """MaxVio_batch (mean over layers) against the training step, one line per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = results["config"]["steps"]
    window = max(1, steps // 50)
    for p in results["policies"]:
        series = p["history"]["maxvio_batch"]
        ax.plot(range(1, len(series) + 1), _smooth(series, window), label=p["name"], linewidth=1.5)
    last_start = steps - max(1, round(results["config"]["last_frac"] * steps))
    ax.axvspan(last_start, steps, color="0.9", zorder=0, label="MaxVio_batch window")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"MaxVio_batch (mean over layers, {window}-step average)")
    top = ax.get_ylim()[1]
    ax.set_ylim(-0.02 * top, top)  # keeps a policy sitting at exactly 0 (BASE) visible
    ax.set_title("Per-batch load imbalance during training")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def plot_load_heatmap(results: dict, path: str | Path) -> Path:
    """Per-layer x per-expert validation load / mean load, one panel per policy."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    policies = results["policies"]
    rel = []
    for p in policies:
        rows = []
        for load in p["val_load"]:
            mean = sum(load) / len(load)
            rows.append([x / mean if mean else 0.0 for x in load])
        rel.append(rows)
    vmax = max(2.0, max(max(max(r) for r in rows) for rows in rel))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    n = len(policies)
    cols = min(n, 2)
    nrows = math.ceil(n / cols)
    panel_height = 1.3 + 0.3 * len(rel[0])
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 0.6 + panel_height * nrows), squeeze=False,
                             layout="constrained")
    image = None
    for ax, p, rows in zip(axes.flat, policies, rel):
        image = ax.imshow(rows, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(f"{p['name']}  (MaxVio_global {p['maxvio_global']:.2f})", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(rows)))
        if len(rows[0]) <= 32:
            ax.set_xticks(range(len(rows[0])))
            ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="validation load / mean load")
    fig.suptitle("Expert load on the validation set (eval mode)")
    return _save_figure(plt, fig, path)


def plot_frontier(results: dict, path: str | Path) -> Path:
    """Validation bpb against MaxVio_global (on the held-out training chunks when the run
    has them, as the loss-free paper measures it), one point per policy (the
    quality-vs-balance frontier: down and left is better); with several seeds the point is the mean and the
    bars span min to max over the seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    summary = results.get("summary")
    key = _balance_key(results)
    points = []
    if summary:
        for st in summary:
            x, y = st[key], st["val_bpb"]
            points.append((st["name"], x["mean"], y["mean"], (x["mean"] - x["min"], x["max"] - x["mean"]),
                           (y["mean"] - y["min"], y["max"] - y["mean"])))
    else:
        points = [(p["name"], p[key], p["val_bpb"], (0.0, 0.0), (0.0, 0.0)) for p in results["policies"]]
    for name, x, y, xerr, yerr in points:
        ax.errorbar([x], [y], xerr=[[xerr[0]], [xerr[1]]], yerr=[[yerr[0]], [yerr[1]]], fmt="o", capsize=3, label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    seeds = results.get("seeds") or [results["config"].get("seed")]
    ax.set_xlabel("MaxVio_in (held-out training chunks, eval mode)" if key == "maxvio_global_in"
                  else "MaxVio_global (held-out files, eval mode)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"Quality vs balance ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
                 + (": mean, min-max bars)" if len(seeds) > 1 else ")"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def _balance_key(results: dict) -> str:
    """The balance measure of the frontier: MaxVio_global on held-out chunks of the training
    files (where the loss-free paper measures it) when the run has them, else on the
    held-out files."""
    return "maxvio_global_in" if results["policies"][0].get("maxvio_global_in") is not None else "maxvio_global"


def _points(results: dict) -> list[tuple[str, float, float]]:
    """(policy, val bpb, MaxVio): seed means when there are several seeds."""
    key = _balance_key(results)
    if results.get("summary"):
        return [(st["name"], st["val_bpb"]["mean"], st[key]["mean"]) for st in results["summary"]]
    return [(p["name"], p["val_bpb"], p[key]) for p in results["policies"]]


def frontier(results: dict) -> list[str]:
    """The policies no other policy beats on both validation bpb and MaxVio_global (lower
    is better on both): the quality-vs-balance frontier, best bpb first."""
    pts = _points(results)
    keep = [
        (name, bpb, vio) for name, bpb, vio in pts
        if not any(b2 <= bpb and v2 <= vio and (b2 < bpb or v2 < vio) for _, b2, v2 in pts)
    ]
    return [name for name, _, _ in sorted(keep, key=lambda t: t[1])]


def reading(results: dict) -> str:
    """A one-paragraph reading of a run, generated from its numbers."""
    pts = {name: (bpb, vio) for name, bpb, vio in _points(results)}
    seeds = results.get("seeds") or [results["config"].get("seed")]
    best_bpb = min(pts, key=lambda n: pts[n][0])
    best_vio = min(pts, key=lambda n: pts[n][1])
    front = frontier(results)
    label = "MaxVio_in" if _balance_key(results) == "maxvio_global_in" else "MaxVio_global"
    parts = [
        f"On the quality-vs-balance frontier (no policy has both lower validation bpb and lower {label}): "
        f"{', '.join(front)}.",
        f"Lowest validation loss: {best_bpb} ({pts[best_bpb][0]:.4f} bpb); best balanced: "
        f"{best_vio} ({label} {pts[best_vio][1]:.3f}).",
    ]
    if len(seeds) > 1:
        close = within_spread(results)
        parts.append(
            f"Over {len(seeds)} seeds, these pairs differ in validation bpb by less than their seed spread and "
            f"cannot be told apart: {'; '.join(f'{a} ~ {b}' for a, b in close) if close else 'none'}."
        )
    else:
        parts.append("One seed: no spread was measured, so small bpb differences may be noise (run --seeds 3).")
    free = [n for n in pts if n.startswith("loss-free")]
    aux = [n for n in pts if n.startswith("aux-")]
    if free and aux:
        wins = [
            (f, a) for f in free for a in aux
            if pts[f][1] < pts[a][1] and (pts[f][0] <= pts[a][0] or (f, a) in within_spread(results)
                                          or (a, f) in within_spread(results))
        ]
        if wins:
            parts.append(
                f"The loss-free paper's direction (lower {label} at equal or better bpb) appears for: "
                + "; ".join(f"{f} vs {a}" for f, a in wins) + "."
            )
        else:
            parts.append(f"The loss-free paper's direction (lower {label} at equal or better bpb than the aux "
                         "loss) does not appear in this run.")
    return " ".join(parts)


def format_report(results: dict) -> str:
    """``report.md``: the table, what was measured, the pictures and the reading."""
    cfg = results["config"]
    lines = [
        f"# moebal compare: {len(results['policies'])} policies, {cfg['steps']} steps, "
        f"{len(results.get('seeds') or [cfg.get('seed')])} seed(s)",
        "",
        format_markdown_table(results),
        "",
        _footnote(results) + _seed_note(results).replace("\n", " "),
        "",
        reading(results),
        "",
        "![quality vs balance](frontier.png)",
        "![MaxVio_batch over training steps](maxvio_batch.png)",
        "![per-layer validation load](load_heatmap.png)",
        "",
        f"Total time: {results.get('total_seconds', 0):.0f} s. Numbers: results.json (redraw with "
        "`moebal compare --plot results.json`).",
        "",
    ]
    return "\n".join(lines)


def write_report(results: dict, path: str | Path) -> Path:
    text = format_report(results)
    return _write_atomic(Path(path), lambda f: f.write(text.encode()))


# (key, file name, drawing function) of each figure ``write_all`` draws
PLOTS = (
    ("maxvio", "maxvio_batch.png", plot_maxvio),
    ("heatmap", "load_heatmap.png", plot_load_heatmap),
    ("frontier", "frontier.png", plot_frontier),
)


def write_all(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json, then the PNGs drawn from what was written."""
    out_dir = Path(out_dir)
    json_path = write_results(results, out_dir / "results.json")
    saved = json.loads(json_path.read_text())
    paths = {"json": json_path, "report": write_report(saved, out_dir / "report.md")}
    for key, name, plot in PLOTS:
        paths[key] = plot(saved, out_dir / name)
    return paths
