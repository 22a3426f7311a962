"""Balancing policies that ``moebal compare`` can train, by name.

Names:
- ``aux-<alpha>``: softmax router + Switch auxiliary loss with coefficient alpha
  (``aux-1e-2``, ``aux-1e-3``).
- ``loss-free`` or ``loss-free-<rate>``: sigmoid router + loss-free bias, update rate
  ``u`` (default 1e-3, as in Wang et al. 2024).
- ``base``: softmax router + BASE balanced assignment in training, greedy top-k at eval.
- ``none``: softmax router, no balancing at all (a reference point, not in the default set).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import moebal

__all__ = ["Policy", "parse_policy", "parse_policies", "DEFAULT_POLICIES"]

DEFAULT_POLICIES = ("aux-1e-2", "aux-1e-3", "loss-free", "base")
NAMES_HELP = "aux-<alpha> (e.g. aux-1e-2), loss-free[-<rate>] (default rate 1e-3), base, none"


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str  # "aux" | "loss_free" | "base" | "none"
    score: str  # "softmax" | "sigmoid"
    coefficient: float | None = None  # alpha for aux, rate u for loss_free

    def make_router(self, d_model: int, num_experts: int, top_k: int) -> moebal.Router:
        if self.kind == "aux":
            balancer = moebal.AuxLoss(self.coefficient)
        elif self.kind == "loss_free":
            balancer = moebal.LossFree(self.coefficient)
        elif self.kind == "base":
            balancer = moebal.LinearAssignment()
        else:
            balancer = None
        return moebal.Router(d_model, num_experts, top_k, score=self.score, balancer=balancer)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "score": self.score, "coefficient": self.coefficient}


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"policy {name!r}: {text!r} is not a non-negative number")
    return value


def parse_policy(name: str) -> Policy:
    """The policy called ``name``; ValueError naming the accepted forms otherwise."""
    text = name.strip().lower()
    if text == "base":
        return Policy(text, "base", "softmax")
    if text == "none":
        return Policy(text, "none", "softmax")
    if text == "loss-free":
        return Policy(text, "loss_free", "sigmoid", 1e-3)
    if text.startswith("loss-free-"):
        return Policy(text, "loss_free", "sigmoid", _number(text[len("loss-free-"):], name))
    if text.startswith("aux-"):
        return Policy(text, "aux", "softmax", _number(text[len("aux-"):], name))
    raise ValueError(f"unknown policy {name!r}; known: {NAMES_HELP}")


def parse_policies(text: str) -> list[Policy]:
    """Parse a comma list of policy names; rejects empty lists and duplicates."""
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise ValueError(f"no policy given; known: {NAMES_HELP}")
    policies = [parse_policy(n) for n in names]
    seen = set()
    for p in policies:
        if p.name in seen:
            raise ValueError(f"policy {p.name!r} is listed twice")
        seen.add(p.name)
    return policies
