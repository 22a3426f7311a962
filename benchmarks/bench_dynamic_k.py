"""Dynamic k (top-p, ReMoE) and Soft MoE: the layer's CPU fwd+bwd time as a ratio to plain
top-k, measured side by side in one process, with the experts per token each gives.

Usage: python benchmarks/bench_dynamic_k.py [--configs A C] [--repeats 7] [--out FILE.json]

Every MoE layer has the same gate and expert weights; each round runs every layer once,
back to back, and the ratio is the median over rounds of (layer time / top-k time of the
same round). The timed backward includes the balancing loss. A second top-k copy shows
the noise floor of a ratio.

Dynamic k's cost follows its experts per token, which depends on the router's state:

- top-p (p = 0.4) at a fresh gate: the softmax is nearly flat, so almost every token takes
  k_max experts; timed with k_max = K (at most top-k's pairs) and k_max = 2K.
- ReMoE at a fresh gate activates about half of the experts (a ReLU of zero-mean logits).
  Trained, lambda holds about K active on average. Both are timed: "init" (exact ReMoE,
  k_max = E, about E/2 experts per token) and "steady" (the tokens carry a common
  direction whose gate weight is set so that on average K of the E ReLU outputs are
  positive, as a trained gate's would be; k_max = E, and k_max = 2K, which keeps the 2K
  largest). Every layer sees those same tokens.
- Soft MoE (``moebal.SoftMoE``): the T tokens as 4 groups, slots per expert chosen so that
  the experts process T*K rows in all, top-k's number of pairs; its extra cost is the
  [T/4, E*S] dispatch and combine mixes.
"""
from __future__ import annotations

from statistics import NormalDist

import torch
from torch import nn

import moebal
from moebal.bench.configs import CONFIGS
from moebal.bench.timing import _time_round_robin, paired_ratio, ratio_bench_main

SEQUENCES = 4


class _Layer(nn.Module):
    """``x -> layer(x [4, T/4, D]) + aux_loss``, so the timed backward includes the loss."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x_TD):
        y = self.moe(x_TD.view(SEQUENCES, -1, x_TD.shape[-1]))
        return (y + self.moe.aux_loss.to(y.dtype)).view_as(x_TD)


def _routers(D: int, E: int, K: int) -> dict:
    no_renorm = dict(renormalize=False)
    return {
        "topk": lambda: moebal.Router(D, E, K),
        "topk-again": lambda: moebal.Router(D, E, K),
        "aux-1e-2": lambda: moebal.Router(D, E, K, balancer=moebal.AuxLoss(1e-2)),
        "top-p kmax=K": lambda: moebal.Router(D, E, K, balancer=(moebal.TopP(0.4), moebal.AuxLoss(1e-2)), **no_renorm),
        "top-p kmax=2K": lambda: moebal.Router(D, E, min(E, 2 * K), balancer=(moebal.TopP(0.4), moebal.AuxLoss(1e-2)),
                                               **no_renorm),
        "remoe init": lambda: moebal.Router(D, E, E, balancer=moebal.ReMoE(k=float(K)), **no_renorm),
        "remoe steady": lambda: moebal.Router(D, E, E, balancer=moebal.ReMoE(k=float(K)), **no_renorm),
        "remoe steady kmax=2K": lambda: moebal.Router(D, E, min(E, 2 * K), balancer=moebal.ReMoE(k=float(K)),
                                                      **no_renorm),
    }


def bench(config: str, repeats: int, warmup: int) -> dict:
    cfg = CONFIGS[config]
    T, D, F, E, K = cfg.tokens, cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = moebal.MoE(D, F, E, K, backend="torch")
    # tokens: noise in D-1 dims plus a constant last feature 1 (a trained gate's bias direction)
    x = torch.randn(T, D, generator=gen)
    x[:, -1] = 1.0
    x.requires_grad_(True)
    g = torch.randn(T, D, generator=gen)
    w = ref.router.gate.weight.detach().clone()
    w[:, -1] = 0.0
    sigma = float((x.detach()[:, :-1] @ w[:, :-1].T).std())
    steady_bias = sigma * NormalDist().inv_cdf(K / E)  # P(noise + bias > 0) = K/E
    layers, per_token = {}, {}
    for name, make in _routers(D, E, K).items():
        router = make()
        with torch.no_grad():
            router.gate.weight.copy_(w)
            if name.startswith("remoe steady"):
                router.gate.weight[:, -1] = steady_bias
        moe = moebal.MoE(D, F, E, router.top_k, router=router, backend="torch")
        moe.experts.load_state_dict(ref.experts.state_dict())
        layers[name] = _Layer(moe).train()
    slots = max(1, T * K // (E * SEQUENCES))
    soft = moebal.SoftMoE(D, F, E, slots)
    soft.experts.load_state_dict(ref.experts.state_dict())
    layers[f"soft-moe S={slots}"] = _Layer(soft).train()
    for name, layer in layers.items():
        layer(x).backward(g)
        stats = layer.moe.last_stats
        per_token[name] = float(stats.load.sum()) / T if isinstance(stats, moebal.BalanceStats) else None
    timer = "cpu" if torch.get_num_threads() == 1 else "wall"
    times = _time_round_robin(layers, x, g, "fwd+bwd", repeats, warmup, timer)
    return {
        name: {"best_s": min(t), "ratio_to_topk": paired_ratio(t, times["topk"]), "experts_per_token": per_token[name]}
        for name, t in times.items()
    }


def _config(c: str, repeats: int, warmup: int) -> dict:
    res = bench(c, repeats, warmup)
    print(f"config {c} ({CONFIGS[c]}): layer fwd+bwd, ratio to plain top-k (median of paired rounds)")
    print(f"  {'layer':18s} {'ratio':>6s} {'best ms':>8s} {'exp/tok':>7s}")
    for name, r in res.items():
        ept = "-" if r["experts_per_token"] is None else f"{r['experts_per_token']:.2f}"
        print(f"  {name:18s} {r['ratio_to_topk']:6.3f} {r['best_s'] * 1e3:8.1f} {ept:>7s}")
    return res


def main() -> None:
    ratio_bench_main(__doc__, _config)


if __name__ == "__main__":
    main()
