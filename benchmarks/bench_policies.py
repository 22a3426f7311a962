"""Router v2 policies: the MoE layer's CPU fwd+bwd time per balancing policy, as a ratio
to plain top-k (no balancing) measured side by side in one process.

Usage: python benchmarks/bench_policies.py [--configs A C] [--repeats 7] [--out FILE.json]

Every layer has the same gate and expert weights; each round runs every policy once, back
to back, and the ratio is the median over rounds of (policy time / top-k time of the same
round), as ``moebal bench`` pairs its ratios. Two timings: the whole layer's fwd+bwd
(the experts dominate it), and the router's forward alone (where the policies differ). The balancing loss is part of the timed
backward (the output gets ``+ aux_loss``). Hash routing gets token ids drawn from a Zipf
distribution over a 32k vocabulary, its balanced table fitted on those ids' counts.
"""
from __future__ import annotations


import torch
from torch import nn

import moebal
from moebal.bench.configs import CONFIGS
from moebal.bench.timing import _time_round_robin, paired_ratio, ratio_bench_main

VOCAB = 32768
SEQUENCES = 4  # the T tokens form 4 sequences


class _Layer(nn.Module):
    """``x -> moe(x, token_ids=ids) + aux_loss``, so the timed backward includes the loss."""

    def __init__(self, moe: moebal.MoE, ids: torch.Tensor | None):
        super().__init__()
        self.moe, self.ids = moe, ids

    def forward(self, x_TD):
        x = x_TD.view(SEQUENCES, -1, x_TD.shape[-1])  # [B, S, D]: the sequence aux loss needs sequences
        ids = None if self.ids is None else self.ids.view(SEQUENCES, -1)
        y = self.moe(x, token_ids=ids) if ids is not None else self.moe(x)
        return (y + self.moe.aux_loss.to(y.dtype)).view_as(x_TD)


class _RouterOnly(nn.Module):
    """``x -> the router's weights``: the routing step alone, forward only."""

    def __init__(self, layer: _Layer):
        super().__init__()
        self.router, self.ids = layer.moe.router, layer.ids

    def forward(self, x_TD):
        with torch.no_grad():
            routing = self.router(x_TD, seq_len=x_TD.shape[0] // SEQUENCES, token_ids=self.ids)
        return routing.weights


def _policies(E: int, K: int, ids: torch.Tensor) -> dict:
    from moebal.policies.hashing import HashRouting
    from moebal.hash_table import bucket_counts

    counts = bucket_counts(ids, 1, VOCAB)
    return {
        "topk": dict(score="softmax", balancer=None),
        "topk-again": dict(score="softmax", balancer=None),  # a second copy: the noise floor of a ratio
        "aux-1e-2": dict(score="softmax", balancer=moebal.AuxLoss(1e-2)),
        "loss-free": dict(score="sigmoid", balancer=moebal.LossFree(1e-3)),
        "loss-free-prop": dict(score="sigmoid", balancer=moebal.LossFree(rule="proportional")),
        "loss-free+seq": dict(score="sigmoid", balancer=(moebal.LossFree(1e-3), moebal.AuxLoss(1e-4, "sequence"))),
        "limoe": dict(score="softmax", balancer=(moebal.ImportanceLoss(5e-3), moebal.EntropyLoss(1e-2, 1e-2, threshold=2.0))),
        "vmoe": dict(score="softmax", balancer=(moebal.ImportanceLoss(5e-3), moebal.LoadLoss(5e-3))),
        "hash": dict(score="softmax", balancer=HashRouting("balanced", counts=counts)),
        "hash-router": dict(score="softmax", balancer=HashRouting("balanced", counts=counts, weights="router")),
        "null-4": dict(score="softmax", balancer=moebal.AuxLoss(1e-2), num_null_experts=4),
        "base": dict(score="softmax", balancer=moebal.LinearAssignment()),
    }


def bench(config: str, repeats: int, warmup: int) -> dict:
    cfg = CONFIGS[config]
    T, D, F, E, K = cfg.tokens, cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k
    gen = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    ids = torch.multinomial(zipf / zipf.sum(), T, replacement=True, generator=gen)
    torch.manual_seed(0)
    ref = moebal.MoE(D, F, E, K, backend="torch")
    layers = {}
    for name, spec in _policies(E, K, ids).items():
        Z = spec.pop("num_null_experts", 0)
        router = moebal.Router(D, E, K, num_null_experts=Z, **spec)
        with torch.no_grad():
            router.gate.weight[:E].copy_(ref.router.gate.weight)
        moe = moebal.MoE(D, F, E, K, router=router, backend="torch")
        moe.experts.load_state_dict(ref.experts.state_dict())
        layers[name] = _Layer(moe, ids if name.startswith("hash") else None).train()
    x = torch.randn(T, D, generator=gen).requires_grad_(True)
    g = torch.randn(T, D, generator=gen)
    timer = "cpu" if torch.get_num_threads() == 1 else "wall"
    times = _time_round_robin(layers, x, g, "fwd+bwd", repeats, warmup, timer)
    routers = {name: _RouterOnly(layer) for name, layer in layers.items()}
    router_times = _time_round_robin(routers, x, g, "fwd", 3 * repeats, warmup, timer)
    return {
        name: {
            "best_s": min(t), "ratio_to_topk": paired_ratio(t, times["topk"]),
            "router_fwd_best_s": min(router_times[name]),
            "router_fwd_ratio_to_topk": paired_ratio(router_times[name], router_times["topk"]),
        }
        for name, t in times.items()
    }


def _config(c: str, repeats: int, warmup: int) -> dict:
    res = bench(c, repeats, warmup)
    print(f"config {c} ({CONFIGS[c]}): ratio to plain top-k (median of paired rounds)")
    print(f"  {'policy':16s} {'layer fwd+bwd':>14s} {'best ms':>9s} {'router fwd':>11s} {'best ms':>8s}")
    for name, r in res.items():
        print(f"  {name:16s} {r['ratio_to_topk']:14.3f} {r['best_s'] * 1e3:9.1f} "
              f"{r['router_fwd_ratio_to_topk']:11.3f} {r['router_fwd_best_s'] * 1e3:8.2f}")
    return res


def main() -> None:
    ratio_bench_main(__doc__, _config)


if __name__ == "__main__":
    main()
