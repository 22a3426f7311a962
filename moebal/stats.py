"""Balance statistics: expert load, MaxVio, CV, entropy, drops — and a meter over steps.

All functions take the int64 load ``[E]`` (routed (token, slot) pairs per expert) and
return 0-d float tensors, so they can be logged without a host sync until printed.

Degenerate loads: an empty load (all zeros, e.g. a batch of zero tokens) reads as
perfectly balanced (MaxVio 0, CV 0, entropy 1, nothing dropped). A load holding NaN or
inf gives NaN from every statistic, so a NaN never reads as balanced (the float loads of
custom code can hold one; the int64 loads moebal counts cannot).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "expert_load",
    "max_violation",
    "coefficient_of_variation",
    "load_entropy",
    "dropped_fraction",
    "experts_per_token",
    "ExpertsPerToken",
    "BalanceStats",
    "BalanceMeter",
]


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[E]`` count of routed (token, slot) pairs per expert; -1 (no expert) is skipped."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    flat = indices.reshape(-1).long()
    load = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return load.scatter_add_(0, flat.clamp(min=0), (flat >= 0).long())


def _as_load(load: torch.Tensor) -> torch.Tensor:
    if not isinstance(load, torch.Tensor) or load.dim() != 1 or load.numel() == 0:
        raise ValueError(f"load must be a non-empty 1-D tensor [E], got {load!r}")
    return load.double()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (an empty load); NaN stays NaN."""
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1.0, den))


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max - mean) / mean; 0 means perfectly balanced.

    0 for an empty load (all zeros); NaN when the load holds NaN or inf.
    """
    l = _as_load(load)
    mean = l.mean()
    return _ratio(l.max() - mean, mean)


def coefficient_of_variation(load: torch.Tensor) -> torch.Tensor:
    """Population standard deviation / mean of the load (0 for an empty load, NaN for NaN/inf)."""
    l = _as_load(load)
    return _ratio(l.std(correction=0), l.mean())


def load_entropy(load: torch.Tensor) -> torch.Tensor:
    """Entropy of the load distribution normalised by log E: 1 = uniform, 0 = one expert.

    An empty load (all zeros) counts as uniform (1); NaN for a load holding NaN or inf.
    """
    l = _as_load(load)
    total = l.sum()
    p = l / torch.where(total == 0, 1.0, total)
    h = -torch.xlogy(p, p).sum()  # 0 log 0 = 0; NaN stays NaN
    E = l.numel()
    uniform = torch.where(h.isnan(), h, torch.ones_like(h))
    return uniform if E == 1 else torch.where(total == 0, uniform, h / math.log(E))


def dropped_fraction(load: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Fraction of routed pairs that the capacity dropped: (sum(load) - sum(kept)) / sum(load).

    0 when nothing was routed; NaN when either load holds NaN.
    """
    l, k = _as_load(load), _as_load(kept)
    total = l.sum()
    return _ratio(total - k.sum(), total)


@dataclass(frozen=True)
class ExpertsPerToken:
    """How many experts the real tokens got (0-d tensors): expert choice and thresholds give
    a token 0..E, top-k exactly K (fewer with null experts or drops not counted here)."""

    min: torch.Tensor  # int64
    max: torch.Tensor  # int64
    mean: torch.Tensor  # float64
    zero_share: torch.Tensor  # float64: share of real tokens with no expert at all


def experts_per_token(indices: torch.Tensor, token_mask: torch.Tensor | None = None) -> ExpertsPerToken:
    """Statistics of the experts per token from routed indices ``[T, W]`` (-1 = no expert).

    ``token_mask`` (bool [T], True = a real token) leaves padding out. No real token gives
    zeros everywhere (never NaN).
    """
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError(f"indices must be a [T, W] tensor, got {indices!r}")
    count_T = (indices >= 0).sum(dim=1)
    real_T = torch.ones_like(count_T, dtype=torch.bool) if token_mask is None else token_mask.reshape(-1)
    if real_T.shape != count_T.shape:
        raise ValueError(f"token_mask must have one entry per token ({count_T.shape[0]}), got {tuple(token_mask.shape)}")
    n = real_T.sum()
    big = torch.iinfo(torch.int64).max
    lo = torch.where(real_T, count_T, big).min() if count_T.numel() else torch.zeros((), dtype=torch.int64)
    hi = torch.where(real_T, count_T, -1).max() if count_T.numel() else torch.zeros((), dtype=torch.int64)
    den = n.double().clamp(min=1)
    return ExpertsPerToken(
        min=torch.where(n > 0, lo, 0),
        max=torch.where(n > 0, hi, 0),
        mean=torch.where(real_T, count_T, 0).sum().double() / den,
        zero_share=(real_T & (count_T == 0)).sum().double() / den,
    )


@dataclass
class BalanceStats:
    """Balance of one forward pass. ``load`` is the int64 ``[E]`` routed-pair count."""

    load: torch.Tensor
    kept: torch.Tensor
    num_tokens: int
    top_k: int
    nonfinite_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    masked_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))  # token_mask False
    null_pairs: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))  # picks of null experts
    indices: torch.Tensor | None = None  # int64 [T, W] dispatched experts per token (-1 none), for experts_per_token
    token_mask: torch.Tensor | None = None  # bool [T], True = a real token

    @property
    def experts_per_token(self) -> ExpertsPerToken | None:
        """Min, max, mean and zero share of the real tokens' expert counts (None without indices)."""
        return None if self.indices is None else experts_per_token(self.indices, self.token_mask)

    @property
    def null_fraction(self) -> torch.Tensor:
        """Share of the real tokens' K picks that went to null experts (0 without any)."""
        picks = (self.num_tokens - self.masked_tokens) * self.top_k
        return self.null_pairs.double() / torch.as_tensor(picks).double().clamp(min=1)

    @property
    def max_violation(self) -> torch.Tensor:
        return max_violation(self.load)

    @property
    def cv(self) -> torch.Tensor:
        return coefficient_of_variation(self.load)

    @property
    def entropy(self) -> torch.Tensor:
        return load_entropy(self.load)

    @property
    def dropped_fraction(self) -> torch.Tensor:
        return dropped_fraction(self.load, self.kept)

    def to_dict(self) -> dict:
        """Plain Python numbers, ready for a logger (this syncs with the device)."""
        return {
            "max_violation": float(self.max_violation),
            "cv": float(self.cv),
            "entropy": float(self.entropy),
            "dropped_fraction": float(self.dropped_fraction),
            "nonfinite_tokens": int(self.nonfinite_tokens),
            "masked_tokens": int(self.masked_tokens),
            "null_fraction": float(self.null_fraction),
            **self._per_token_dict(),
            "num_tokens": self.num_tokens,
            "load": self.load.tolist(),
        }


    def _per_token_dict(self) -> dict:
        ept = self.experts_per_token
        if ept is None:
            return {}
        return {"experts_per_token_min": int(ept.min), "experts_per_token_max": int(ept.max),
                "experts_per_token_mean": float(ept.mean), "zero_expert_share": float(ept.zero_share)}


class BalanceMeter:
    """Accumulates per-layer balance over steps.

    ``maxvio_global`` is the MaxVio of the counts summed over every step seen;
    ``maxvio_batch`` is the mean of the per-step MaxVio. Both per layer name.
    """

    def __init__(self):
        self._sum: dict[str, torch.Tensor] = {}
        self._batch: dict[str, list[float]] = {}

    def update(self, name: str, load: torch.Tensor) -> None:
        """Add one step's load of layer ``name``; ValueError for a load that is not a count
        (NaN, inf, a fraction or a negative entry), which int64 sums could not hold."""
        load = _as_load(load.detach()).cpu()
        if not bool(((load >= 0) & (load == load.round()) & load.isfinite()).all()):
            raise ValueError(f"layer {name!r}: load must hold non-negative integer counts, got {load.tolist()}")
        load = load.to(torch.int64)
        if name in self._sum:
            if self._sum[name].shape != load.shape:
                raise ValueError(f"layer {name!r}: load shape {tuple(load.shape)} != {tuple(self._sum[name].shape)}")
            self._sum[name] += load
        else:
            self._sum[name] = load.clone()
            self._batch[name] = []
        self._batch[name].append(float(max_violation(load)))

    def update_model(self, model: torch.nn.Module) -> None:
        """Record ``last_stats.load`` of every MoE layer of ``model`` (by module name)."""
        for name, module in model.named_modules():
            stats = getattr(module, "last_stats", None)
            if isinstance(stats, BalanceStats):
                self.update(name, stats.load)

    @property
    def layers(self) -> list[str]:
        return list(self._sum)

    def summed_load(self, name: str) -> torch.Tensor:
        return self._sum[name].clone()

    def maxvio_global(self, name: str | None = None) -> float:
        """MaxVio of summed counts for one layer, or the mean over layers when name is None."""
        names = [name] if name is not None else self.layers
        if not names:
            raise ValueError("BalanceMeter has no data yet")
        return sum(float(max_violation(self._sum[n])) for n in names) / len(names)

    def maxvio_batch(self, name: str | None = None, last: int | None = None) -> float:
        """Mean per-step MaxVio, per layer or averaged over layers.

        ``last``: a positive int averages only the layer's last ``last`` steps (all of them
        when it has fewer); None averages every step.
        """
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
            raise ValueError(f"last must be a positive int or None, got {last!r}")
        names = [name] if name is not None else self.layers
        if not names:
            raise ValueError("BalanceMeter has no data yet")
        vals = []
        for n in names:
            steps = self._batch[n] if last is None else self._batch[n][-last:]
            vals.append(sum(steps) / len(steps))
        return sum(vals) / len(vals)

    def reset(self) -> None:
        self._sum.clear()
        self._batch.clear()
