"""Per-level statistics of a multi-gate (multi-task) MoE, and a meter over steps.

Legend: K tasks, E experts of one level, B examples, H expert hidden units, F expert output.
All tensors are detached float32 on the layer's device.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["MultiGateStats", "MultiTaskMeter", "multigate_stats", "stats_table"]


@dataclass
class MultiGateStats:
    """Statistics of one level of a ``MultiGateMoE`` forward.

    gate_mass_KE: mean gate weight of task k on expert e over the batch (``W[task, expert]``).
    occupancy_E: ``max_k W[k,e] / sum_k W[k,e]``: 1/K when the tasks share expert e evenly,
        1 when one task captured it; NaN for an expert no task uses (closed or B = 0).
    own_use_K: sum of ``W[k, e]`` over task k's own (task-specific) experts.
    dead_ratio_E: fraction of expert e's hidden units that are <= 0 for the whole batch.
    output_rms_E: root mean square of expert e's output over the batch and features.
    entropy_K: mean over the batch of each task gate's entropy (nats).
    shared_E: bool, which experts are shared by all tasks (owned by no task or group).
    """

    gate_mass_KE: torch.Tensor
    occupancy_E: torch.Tensor
    own_use_K: torch.Tensor
    dead_ratio_E: torch.Tensor
    output_rms_E: torch.Tensor
    entropy_K: torch.Tensor
    shared_E: torch.Tensor

    @property
    def shared_occupancy(self) -> torch.Tensor:
        """Occupancy of the shared experts only ``[E_shared]``."""
        return self.occupancy_E[self.shared_E]


@torch.no_grad()
def multigate_stats(
    weights_KBE: torch.Tensor,
    hidden_EBH: torch.Tensor,
    out_EBF: torch.Tensor,
    own_KE: torch.Tensor,
    shared_E: torch.Tensor,
) -> MultiGateStats:
    """Statistics from the task gates' weights, the experts' hidden units and outputs."""
    w = weights_KBE.detach().float()
    K, B, E = w.shape
    if B == 0:
        gate_mass = w.new_zeros(K, E)
        entropy = w.new_zeros(K)
        dead = w.new_zeros(E)
        rms = w.new_zeros(E)
    else:
        gate_mass = w.mean(1)
        entropy = -torch.special.xlogy(w, w).sum(-1).mean(1)
        dead = (hidden_EBH.detach() <= 0).all(1).float().mean(-1)
        rms = out_EBF.detach().float().pow(2).mean((1, 2)).sqrt()
    total = gate_mass.sum(0)
    occupancy = torch.where(
        total > 0, gate_mass.max(0).values / total.clamp_min(1e-30), torch.full_like(total, float("nan"))
    )
    own_use = (gate_mass * own_KE.float()).sum(1)
    return MultiGateStats(gate_mass, occupancy, own_use, dead, rms, entropy, shared_E.clone())


class MultiTaskMeter:
    """Averages ``MultiGateStats`` (one list per step, one entry per level) over steps.

    NaN entries (an unused expert's occupancy) are averaged over the steps where they are
    defined; an entry never defined stays NaN.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self._sum: list[dict[str, torch.Tensor]] = []
        self._count: list[dict[str, torch.Tensor]] = []
        self._shared: list[torch.Tensor] = []

    def update(self, stats: list[MultiGateStats] | MultiGateStats) -> None:
        if isinstance(stats, MultiGateStats):
            stats = [stats]
        if not isinstance(stats, (list, tuple)) or not all(isinstance(s, MultiGateStats) for s in stats):
            raise TypeError(f"stats must be a MultiGateStats or a list of them, got {type(stats).__name__}")
        if self._sum and len(stats) != len(self._sum):
            raise ValueError(f"stats has {len(stats)} levels, the meter holds {len(self._sum)}")
        if not self._sum:
            self._sum = [{} for _ in stats]
            self._count = [{} for _ in stats]
            self._shared = [s.shared_E.clone() for s in stats]
        for level, s in enumerate(stats):
            for f in fields(s):
                if f.name == "shared_E":
                    continue
                v = getattr(s, f.name).detach().float()
                ok = ~torch.isnan(v)
                acc = self._sum[level].setdefault(f.name, torch.zeros_like(v))
                cnt = self._count[level].setdefault(f.name, torch.zeros_like(v))
                acc += torch.where(ok, v, torch.zeros_like(v))
                cnt += ok.float()
        self.steps += 1

    def mean(self) -> list[MultiGateStats]:
        """The per-level averages, as ``MultiGateStats``."""
        if not self._sum:
            raise ValueError("MultiTaskMeter.mean() called before any update()")
        out = []
        for level, sums in enumerate(self._sum):
            vals = {k: v / self._count[level][k] for k, v in sums.items()}  # 0/0 -> NaN
            out.append(MultiGateStats(shared_E=self._shared[level].clone(), **vals))
        return out


def _owner_label(owner: int) -> str:
    return "shared" if owner == -1 else (f"group{-(owner + 2)}" if owner <= -2 else f"task{owner}")


def stats_table(stats: MultiGateStats, owner: list[int] | None = None, task_names: list[str] | None = None) -> str:
    """A readable table of one level: one row per expert (owner, gate mass per task,
    occupancy, dead-unit ratio, output RMS), then each task's own-expert use and entropy.

    ``owner``: the layer's ``MultiGateMoE.owner`` list (-1 shared, -(2+g) group g, k task k);
    without it experts are labelled only shared / not shared.
    """
    W = stats.gate_mass_KE.cpu()
    K, E = W.shape
    names = list(task_names) if task_names is not None else [f"task{k}" for k in range(K)]
    if len(names) != K:
        raise ValueError(f"task_names has {len(names)} names, the statistics have {K} tasks")
    head = f"{'expert':>6} {'owner':>7} " + " ".join(f"{n[:8]:>8}" for n in names)
    rows = [head + f" {'occup.':>7} {'dead':>6} {'out rms':>8}"]
    for e in range(E):
        who = _owner_label(owner[e]) if owner is not None else ("shared" if bool(stats.shared_E[e]) else "own")
        mass = " ".join(f"{float(W[k, e]):>8.3f}" for k in range(K))
        rows.append(f"{e:>6} {who:>7} {mass} {float(stats.occupancy_E[e]):>7.3f} "
                    f"{float(stats.dead_ratio_E[e]):>6.1%} {float(stats.output_rms_E[e]):>8.3g}")
    for k in range(K):
        rows.append(f"{names[k]}: own-expert use {float(stats.own_use_K[k]):.3f}, "
                    f"gate entropy {float(stats.entropy_K[k]):.3f} nats")
    shared = stats.shared_occupancy
    if shared.numel():
        rows.append(f"shared experts: occupancy mean {float(shared.nanmean()):.3f} (1/K = {1 / K:.3f}; 1 = captured)")
    return "\n".join(rows)
