"""Balancing policies that ``moebal compare`` can train, by name.

Names (``POLICY_NAMES`` lists them with one line each, as ``moebal info`` prints them):
- ``aux-<alpha>``: softmax router + Switch auxiliary loss with coefficient alpha
  (``aux-1e-2``, ``aux-1e-3``).
- ``loss-free`` or ``loss-free-<rate>``: sigmoid router + loss-free bias, sign step of
  size u (default 1e-3, as in Wang et al. 2024).
- ``loss-free-prop`` or ``loss-free-prop-<rate>``: the proportional step (LongCat-Flash),
  ``u * (mean(c) - c) / sum(c)``, default u = 0.3.
- ``loss-free-center``: the sign step, centred (torchtitan).
- ``loss-free+seq``: DeepSeek-V3's recipe, loss-free bias (1e-3) plus the sequence-wise
  aux loss (alpha 1e-4).
- ``limoe``: LIMoE's local and global entropy losses (thresholded) on top of V-MoE's
  importance loss.
- ``vmoe``: V-MoE's importance loss and noisy-top-k load loss.
- ``hash`` or ``hash-<n>gram``: Hash Layers, a balanced table fitted on the training
  split's (n-gram) bucket counts, unit weights, no router GEMM.
- ``null-<Z>``: Z zero null experts beside the real ones, Switch aux loss 1e-2 over all.
- ``base``: softmax router + BASE balanced assignment in training, greedy top-k at eval.
- ``none``: softmax router, no balancing at all (a reference point, not in the default set).
- ``top-p`` or ``top-p-<p>``: dynamic k (Huang et al. 2024): the smallest prefix of the sorted
  softmax probabilities reaching p (default 0.4), 1 to 2*top_k experts, unrenormalised
  weights, entropy regulariser 1e-4 and the Switch aux loss 1e-2.
- ``remoe``: ReMoE's ReLU router (unrenormalised ReLU weights, up to every expert) with the
  adaptive load-balanced L1 penalty aiming at top_k experts per token (lambda0 1e-8, alpha 1.2).
- ``expert-choice`` (shown as ``expert-choice-leaks-future``): Zhou et al.'s expert choice
  over the whole batch, capacity factor 1. Not causal: each output depends on later tokens,
  so its training and held-out loss are too good; it is run only to show that leak next to
  its causal variants.
- ``expert-choice-pos``: expert choice among the batch's tokens at the same position (causal).
- ``expert-threshold``: Expert-Threshold routing, per-expert EMA thresholds (decay 0.99) of
  expert choice's batch quantile (causal, batch-independent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import moebal

__all__ = ["Policy", "parse_policy", "parse_policies", "DEFAULT_POLICIES", "ALL_POLICIES", "POLICY_NAMES"]

# the default run answers "which balancing policy should I use" within 5 minutes: the
# standard aux loss, the loss-free paper's setting (u = 1e-3, a long-run setting), the
# loss-free step that catches up in a short run, and V-MoE's losses (the best learned
# policy in bpb at this length, seeds 0 and 1)
DEFAULT_POLICIES = ("aux-1e-2", "loss-free", "loss-free-prop", "vmoe")
# ``--policies all``: every family, each at its default setting
ALL_POLICIES = (
    "aux-1e-2", "aux-1e-3", "loss-free", "loss-free-prop", "loss-free-center", "loss-free+seq", "limoe", "vmoe",
    "hash", "hash-4gram", "null-4", "base", "none", "top-p", "remoe",
    "expert-threshold", "expert-choice-pos", "expert-choice",
)
POLICY_NAMES = {
    "aux-<alpha>": "softmax + Switch aux loss (aux-1e-2, aux-1e-3)",
    "loss-free[-<rate>]": "sigmoid + loss-free bias, sign step (default rate 1e-3)",
    "loss-free-prop[-<rate>]": "sigmoid + loss-free bias, proportional step (default rate 0.3)",
    "loss-free-center": "sigmoid + loss-free bias, sign step, centred",
    "loss-free+seq": "DeepSeek-V3: loss-free bias 1e-3 + sequence aux loss 1e-4",
    "limoe": "LIMoE: local/global entropy (threshold) + importance loss",
    "vmoe": "V-MoE: importance + noisy top-k load losses",
    "hash[-<n>gram]": "Hash Layers: balanced table of (n-gram) buckets, unit weights",
    "null-<Z>": "Z zero null experts + Switch aux loss 1e-2",
    "base": "BASE balanced assignment (training), greedy top-k (eval)",
    "none": "softmax top-k, no balancing",
    "top-p[-<p>]": "dynamic k: smallest prefix of sorted probs reaching p (0.4), <= 2*top_k, entropy 1e-4 + aux 1e-2",
    "remoe": "ReMoE: ReLU router, adaptive L1 toward top_k experts per token (up to all)",
    "expert-choice": "expert choice over the batch, capacity 1 -- LEAKS FUTURE TOKENS (loss too good)",
    "expert-choice-pos": "expert choice among the same position of the batch's sequences (causal)",
    "expert-threshold": "Expert-Threshold: EMA of expert choice's quantile per expert (causal)",
}
NAMES_HELP = ", ".join(POLICY_NAMES) + "; or all"
HASH_BUCKETS = 1 << 16  # n-gram buckets (unigram: the 256 byte values)


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str  # "aux" | "loss_free" | "loss_free_prop" | "loss_free_center" | "loss_free_seq" | "limoe" | "vmoe" | "hash" | "null" | "base" | "none" | "top_p" | "remoe" | "expert_choice" | "expert_choice_pos" | "expert_threshold"
    score: str  # "softmax" | "sigmoid"
    coefficient: float | None = None  # alpha for aux, rate u for loss-free, n for hash, Z for null, p for top-p

    @property
    def num_null_experts(self) -> int:
        return int(self.coefficient) if self.kind == "null" else 0

    def layer_top_k(self, top_k: int, num_experts: int) -> int:
        """The layer's K: ``top_k``, but the most experts a token may take for dynamic k
        (top-p: 2*top_k; ReMoE: every expert, so its routing is never cut)."""
        if self.kind == "top_p":
            return min(num_experts, 2 * top_k)
        return num_experts if self.kind == "remoe" else top_k

    def make_router(self, d_model: int, num_experts: int, top_k: int, train_tokens: torch.Tensor | None = None,
                    seq_len: int | None = None) -> moebal.Router:
        """The router of one layer; hash tables are fitted on ``train_tokens`` (the training split).
        ``top_k`` is the model's; the router's is ``layer_top_k(top_k, num_experts)``."""
        c, kind = self.coefficient, self.kind
        if kind == "aux":
            balancer = moebal.AuxLoss(c)
        elif kind == "loss_free":
            balancer = moebal.LossFree(c)
        elif kind == "loss_free_prop":
            balancer = moebal.LossFree(c, rule="proportional")
        elif kind == "loss_free_center":
            balancer = moebal.LossFree(c, center=True)
        elif kind == "loss_free_seq":
            balancer = (moebal.LossFree(1e-3), moebal.AuxLoss(1e-4, "sequence"))
        elif kind == "limoe":
            # the global term acts while the marginal's entropy is below 90 % of log E
            balancer = (moebal.ImportanceLoss(1e-2), moebal.EntropyLoss(1e-2, 1e-2, threshold=0.9 * math.log(num_experts)))
        elif kind == "vmoe":
            balancer = (moebal.ImportanceLoss(5e-3), moebal.LoadLoss(5e-3))
        elif kind == "hash":
            balancer = _hash_policy(int(c), train_tokens, seq_len)
        elif kind == "null":
            balancer = moebal.AuxLoss(1e-2)
        elif kind == "base":
            balancer = moebal.LinearAssignment()
        elif kind == "top_p":
            balancer = (moebal.TopP(c, entropy=1e-4), moebal.AuxLoss(1e-2))
        elif kind == "remoe":  # aims at the model's top_k experts per token
            balancer = moebal.ReMoE(k=float(top_k))
        elif kind == "expert_choice":  # allow_future: the leak is what this row shows
            balancer = moebal.ExpertChoice(1.0, allow_future=True)
        elif kind == "expert_choice_pos":
            balancer = moebal.ExpertChoice(1.0, group="position")
        elif kind == "expert_threshold":
            balancer = moebal.ExpertThreshold(1.0)
        else:
            balancer = None
        renormalize = False if kind in ("top_p", "remoe") else None  # the papers' weights
        return moebal.Router(d_model, num_experts, self.layer_top_k(top_k, num_experts), score=self.score,
                             balancer=balancer, num_null_experts=self.num_null_experts, renormalize=renormalize)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "score": self.score, "coefficient": self.coefficient}


def _hash_policy(ngram: int, train_tokens: torch.Tensor | None, seq_len: int | None):
    from moebal.hash_table import bucket_counts
    from moebal.policies.hashing import HashRouting

    if train_tokens is None:
        raise ValueError("a hash policy needs the training tokens to fit its balanced table")
    buckets = 256 if ngram == 1 else HASH_BUCKETS
    counts = bucket_counts(train_tokens.long(), ngram, buckets, seq_len=seq_len)
    return HashRouting("balanced", counts=counts, ngram=ngram)


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"policy {name!r}: {text!r} is not a non-negative number")
    return value


def _count(text: str, name: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"policy {name!r}: {what} must be a positive integer, got {text!r}")
    return int(text)


def parse_policy(name: str) -> Policy:
    """The policy called ``name``; ValueError naming the accepted forms otherwise."""
    text = name.strip().lower()
    fixed = {
        "base": ("base", "softmax", None), "none": ("none", "softmax", None),
        "loss-free": ("loss_free", "sigmoid", 1e-3), "loss-free-prop": ("loss_free_prop", "sigmoid", 0.3),
        "loss-free-center": ("loss_free_center", "sigmoid", 1e-3), "loss-free+seq": ("loss_free_seq", "sigmoid", None),
        "limoe": ("limoe", "softmax", None), "vmoe": ("vmoe", "softmax", None), "hash": ("hash", "softmax", 1.0),
    }
    if text in fixed:
        return Policy(text, *fixed[text])
    if text == "top-p":
        return Policy(text, "top_p", "softmax", 0.4)
    if text.startswith("top-p-"):
        value = _number(text[len("top-p-"):], name)
        if not 0 < value <= 1:
            raise ValueError(f"policy {name!r}: p must be in (0, 1], got {value!r}")
        return Policy(text, "top_p", "softmax", value)
    if text == "remoe":
        return Policy(text, "remoe", "softmax", None)
    if text in ("expert-choice", "expert-choice-leaks-future"):  # the name in tables says what it does
        return Policy("expert-choice-leaks-future", "expert_choice", "softmax", None)
    if text in ("expert-choice-pos", "expert-threshold"):
        return Policy(text, text.replace("-", "_"), "softmax", None)
    if text.startswith("loss-free-prop-"):
        return Policy(text, "loss_free_prop", "sigmoid", _number(text[len("loss-free-prop-"):], name))
    if text.startswith("loss-free-"):
        return Policy(text, "loss_free", "sigmoid", _number(text[len("loss-free-"):], name))
    if text.startswith("aux-"):
        return Policy(text, "aux", "softmax", _number(text[len("aux-"):], name))
    if text.startswith("hash-") and text.endswith("gram"):
        return Policy(text, "hash", "softmax", float(_count(text[len("hash-"):-len("gram")], name, "n")))
    if text.startswith("null-"):
        return Policy(text, "null", "softmax", float(_count(text[len("null-"):], name, "the null expert count")))
    raise ValueError(f"unknown policy {name!r}; known: {NAMES_HELP}")


def parse_policies(text: str) -> list[Policy]:
    """Parse a comma list of policy names; rejects empty lists and duplicates."""
    if text.strip().lower() == "all":
        return [parse_policy(n) for n in ALL_POLICIES]
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
