"""Train shared-bottom, MMoE, CGC, PLE, HoME and MMoEEx side by side at equal parameter count.

Every model is a ``MultiGateMoE`` (shared-bottom is MMoE with a single expert, so its gate
is the constant 1) followed by one small tower per task. Each model's expert width is
chosen so that its parameter count, towers included, is the closest to a common budget.
Losses: the sum over tasks of the mean squared error over the batch's labelled examples
(the sparse task has about 1 % of them). Quality: R^2 on the fully labelled test set.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from moebal.compare.train import versions
from moebal.multitask import MultiGateMoE, MultiTaskMeter
from moebal.multitask_bench.data import TASK_NAMES, make_tasks

__all__ = ["BenchConfig", "MODELS", "build_model", "param_table", "run_benchmark", "train_one"]

K = len(TASK_NAMES)
TOWER_HIDDEN = 16

# name -> MultiGateMoE keyword arguments (besides the sizes); the expert width is solved for
MODELS: dict[str, dict] = {
    "shared-bottom": {"mode": "mmoe", "num_shared": 1},
    "mmoe": {"mode": "mmoe", "num_shared": 8},
    "cgc": {"mode": "cgc", "num_shared": 2, "num_task_experts": 2},
    "ple": {"mode": "ple", "num_shared": 2, "num_task_experts": 2, "levels": 2},
    "home": {"mode": "home", "num_shared": 2, "num_task_experts": 2, "task_groups": [[0, 1], [2]],
             "num_group_experts": 1, "expert_norm": True, "feature_gates": True, "self_gates": True},
    "mmoeex": {"mode": "mmoeex", "num_shared": 8, "exclusivity": 0.5},
}


@dataclass
class BenchConfig:
    correlations: tuple[float, ...] = (1.0, 0.8, 0.5, 0.0)
    models: tuple[str, ...] = tuple(MODELS)
    seeds: int = 1
    steps: int = 1500
    batch: int = 256
    lr: float = 3e-3
    d_in: int = 64
    d_out: int = 16  # MoE output = tower input
    param_budget: int = 40000
    n_train: int = 65536  # the sparse task gets about 1 % of these labelled
    n_test: int = 4096
    sparse_fraction: float = 0.01
    threads: int = 1  # CPU threads (0: torch default); small models run best on one

    def __post_init__(self) -> None:
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise ValueError(f"models must be a non-empty list among {', '.join(MODELS)}, got {self.models!r}")
        if not self.correlations or any(not -1.0 <= c <= 1.0 for c in self.correlations):
            raise ValueError(f"correlations must be numbers in [-1, 1], got {self.correlations!r}")
        for name in ("seeds", "steps", "batch", "d_in", "d_out", "param_budget", "n_train", "n_test"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


class MultiTaskNet(nn.Module):
    """A ``MultiGateMoE`` and one tower (Linear -> ReLU -> Linear -> 1) per task."""

    def __init__(self, moe: MultiGateMoE) -> None:
        super().__init__()
        self.moe = moe
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(moe.d_out, TOWER_HIDDEN), nn.ReLU(), nn.Linear(TOWER_HIDDEN, 1))
            for _ in range(moe.num_tasks)
        )

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        outs = self.moe(x_BD)
        return torch.cat([t(o) for t, o in zip(self.towers, outs)], dim=1)  # [B, K]


def _make(name: str, cfg: BenchConfig, hidden: int) -> MultiTaskNet:
    kw = dict(MODELS[name])
    levels = kw.get("levels", 1)
    if levels > 1:
        kw["d_expert"] = cfg.d_out
    moe = MultiGateMoE(cfg.d_in, cfg.d_out, K, d_hidden=hidden, track_stats=True, **kw)
    return MultiTaskNet(moe)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, cfg: BenchConfig) -> tuple[MultiTaskNet, int]:
    """The model with the expert width whose parameter count is closest to the budget."""
    with torch.device("meta"):
        p1, p2 = _count(_make(name, cfg, 1)), _count(_make(name, cfg, 2))
    per_unit = p2 - p1  # parameters are affine in the expert width
    hidden = max(1, round((cfg.param_budget - (p1 - per_unit)) / per_unit))
    return _make(name, cfg, hidden), hidden


def _r2(pred_BK: torch.Tensor, y_BK: torch.Tensor) -> list[float]:
    resid = (pred_BK - y_BK).pow(2).mean(0)
    var = (y_BK - y_BK.mean(0)).pow(2).mean(0)
    return (1 - resid / var).tolist()


def _stats_json(levels) -> list[dict]:
    out = []
    for st in levels:
        d = {k: v.tolist() for k, v in asdict(st).items()}
        out.append(d)
    return out


def train_one(name: str, correlation: float, seed: int, cfg: BenchConfig, data=None) -> dict:
    """Train one model on one problem; returns its quality and statistics."""
    data = data if data is not None else make_tasks(
        correlation, seed=seed, d_in=cfg.d_in, n_train=cfg.n_train, n_test=cfg.n_test,
        sparse_fraction=cfg.sparse_fraction,
    )
    torch.manual_seed(1000 + seed)
    model, hidden = build_model(name, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    start = time.perf_counter()
    model.train()
    model.moe.track_stats = False
    for step in range(cfg.steps):
        idx = torch.randint(n, (cfg.batch,), generator=g)
        x, y, lab = data.x_train[idx], data.y_train[idx], data.labelled_train[idx]
        pred = model(x)
        sq = (pred - y).pow(2) * lab
        loss = (sq.sum(0) / lab.sum(0).clamp(min=1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - start
    model.eval()
    model.moe.track_stats = True
    meter = MultiTaskMeter()
    with torch.no_grad():
        pred = model(data.x_test)
        meter.update(model.moe.last_stats)
    levels = meter.mean()
    r2 = _r2(pred, data.y_test)
    last = levels[-1]
    shared = last.shared_occupancy
    return {
        "model": name, "correlation": correlation, "seed": seed, "params": _count(model), "expert_hidden": hidden,
        "num_experts": model.moe.num_experts, "owner": list(model.moe.owner),
        "r2": dict(zip(TASK_NAMES, r2)), "label_corr": data.label_corr, "train_s": train_s,
        "shared_occupancy": float(shared.nanmean()) if shared.numel() else None,
        "own_use": dict(zip(TASK_NAMES, last.own_use_K.tolist())),
        "dead_ratio": float(torch.cat([s.dead_ratio_E for s in levels]).mean()),
        "output_rms": [float(torch.cat([s.output_rms_E for s in levels]).min()),
                       float(torch.cat([s.output_rms_E for s in levels]).max())],
        "entropy": dict(zip(TASK_NAMES, last.entropy_K.tolist())),
        "levels": _stats_json(levels),
    }


def run_benchmark(cfg: BenchConfig, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Every model x correlation x seed; the same data for every model of a (correlation, seed)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runs = []
    total = len(cfg.correlations) * cfg.seeds * len(cfg.models)
    start = time.perf_counter()
    for correlation in cfg.correlations:
        for seed in range(cfg.seeds):
            data = make_tasks(correlation, seed=seed, d_in=cfg.d_in, n_train=cfg.n_train, n_test=cfg.n_test,
                              sparse_fraction=cfg.sparse_fraction)
            for name in cfg.models:
                r = train_one(name, correlation, seed, cfg, data)
                runs.append(r)
                r2 = " ".join(f"{t}={v:.3f}" for t, v in r["r2"].items())
                progress(f"[{len(runs)}/{total}] corr={correlation:g} seed={seed} {name:<13} R2 {r2}  "
                         f"({r['train_s']:.1f} s; {time.perf_counter() - start:.0f} s so far)")
    return {"config": asdict(cfg), "task_names": list(TASK_NAMES), "runs": _finite_or_none(runs),
            "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(), "versions": versions()}


def _finite_or_none(obj):
    """NaN (an expert no task uses has no occupancy) becomes None, so the JSON stays strict."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def param_table(cfg: BenchConfig) -> dict[str, tuple[int, int]]:
    """Each model's (parameters, expert width) at the budget."""
    out = {}
    for name in cfg.models:
        with torch.device("meta"):
            model, hidden = build_model(name, cfg)
        out[name] = (_count(model), hidden)
    return out



