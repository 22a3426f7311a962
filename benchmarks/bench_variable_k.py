"""Variable-k routings (expert choice, its position groups, Expert-Threshold): the MoE
layer's CPU fwd+bwd time as a ratio to plain top-k, measured side by side in one process,
and the experts per token each gives (mean, min, max, share with none).

Usage: python benchmarks/bench_variable_k.py [--configs A C] [--repeats 7] [--out FILE.json]

Every layer has the same gate and expert weights; each round runs every policy once, back
to back, and the ratio is the median over rounds of (policy time / top-k time of the same
round). The T tokens form 4 sequences of T/4 (position groups choose among 4 tokens). The
Expert-Threshold layer is first trained for a few steps on the same input (its thresholds
come from those batches); every timed forward is a training step, so they keep moving.
A second top-k copy shows the noise floor of a ratio.

Also prints the zero-expert share of expert choice at initialisation (capacity factor 1)
for random tokens at each config.
"""
from __future__ import annotations


import torch
from torch import nn

import moebal
from moebal.bench.configs import CONFIGS
from moebal.bench.timing import _time_round_robin, paired_ratio, ratio_bench_main

SEQUENCES = 4


class _Layer(nn.Module):
    def __init__(self, moe: moebal.MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x_TD):
        return self.moe(x_TD.view(SEQUENCES, -1, x_TD.shape[-1])).view_as(x_TD)


def _policies() -> dict:
    return {
        "topk": None,
        "topk-again": None,
        "expert-choice": moebal.ExpertChoice(1.0, allow_future=True),
        "expert-choice-pos": moebal.ExpertChoice(1.0, group="position"),
        "expert-threshold": moebal.ExpertThreshold(1.0, decay=0.9),
    }


def _experts_per_token(moe: moebal.MoE) -> dict:
    ept = moe.last_stats.experts_per_token
    return {"mean": float(ept.mean), "min": int(ept.min), "max": int(ept.max), "zero_share": float(ept.zero_share)}


def bench(config: str, repeats: int, warmup: int) -> dict:
    cfg = CONFIGS[config]
    T, D, F, E, K = cfg.tokens, cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = moebal.MoE(D, F, E, K, backend="torch")
    x = torch.randn(T, D, generator=gen).requires_grad_(True)
    g = torch.randn(T, D, generator=gen)
    layers, per_token = {}, {}
    for name, policy in _policies().items():
        router = moebal.Router(D, E, K, balancer=policy)
        with torch.no_grad():
            router.gate.weight.copy_(ref.router.gate.weight)
        moe = moebal.MoE(D, F, E, K, router=router, backend="torch")
        moe.experts.load_state_dict(ref.experts.state_dict())
        layers[name] = _Layer(moe).train()
        steps = 5 if isinstance(policy, moebal.ExpertThreshold) else 1
        for _ in range(steps):  # thresholds from training batches; the others: one forward for the stats
            layers[name](x).backward(g)
        per_token[name] = _experts_per_token(moe)
    timer = "cpu" if torch.get_num_threads() == 1 else "wall"
    times = _time_round_robin(layers, x, g, "fwd+bwd", repeats, warmup, timer)
    return {
        name: {"best_s": min(t), "ratio_to_topk": paired_ratio(t, times["topk"]),
               "rows": int(layers[name].moe.last_stats.load.sum()), "experts_per_token": per_token[name]}
        for name, t in times.items()
    }


def zero_share_at_init(config: str, top_k: int | None = None, seeds: int = 3) -> float:
    """Share of tokens expert choice (capacity factor 1) gives no expert, random tokens, fresh gate
    (``top_k``: the mean experts per token, the config's own by default)."""
    cfg = CONFIGS[config]
    shares = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        router = moebal.Router(cfg.d_model, cfg.num_experts, top_k or cfg.top_k, balancer=moebal.ExpertChoice(1.0))
        with torch.no_grad():
            routing = router(torch.randn(cfg.tokens, cfg.d_model))
        shares.append(float(moebal.stats.experts_per_token(routing.indices).zero_share))
    return sum(shares) / len(shares)


def _config(c: str, repeats: int, warmup: int) -> dict:
    res = bench(c, repeats, warmup)
    zero, zero_k1 = zero_share_at_init(c), zero_share_at_init(c, top_k=1)
    print(f"config {c} ({CONFIGS[c]}): layer fwd+bwd, ratio to plain top-k (median of paired rounds)")
    print(f"  {'policy':18s} {'ratio':>6s} {'best ms':>8s} {'rows':>6s} {'exp/tok':>7s} {'min':>4s} {'max':>4s} {'none':>6s}")
    for name, r in res.items():
        p = r["experts_per_token"]
        print(f"  {name:18s} {r['ratio_to_topk']:6.3f} {r['best_s'] * 1e3:8.1f} {r['rows']:6d} "
              f"{p['mean']:7.2f} {p['min']:4d} {p['max']:4d} {p['zero_share']:6.3f}")
    print(f"  expert choice at init (capacity 1, random tokens): {zero:.3f} of tokens get no expert "
          f"(K={CONFIGS[c].top_k}); {zero_k1:.3f} with K=1")
    return {"policies": res, "expert_choice_zero_share_at_init": zero, "expert_choice_zero_share_at_init_k1": zero_k1}


def main() -> None:
    ratio_bench_main(__doc__, _config)


if __name__ == "__main__":
    main()
