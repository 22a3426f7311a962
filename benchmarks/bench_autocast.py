"""moebal.MoE under ``torch.autocast``: fp32 master weights in a bf16 region vs bf16 weights.

    python benchmarks/bench_autocast.py [--configs C,A] [--repeats 7] [--threads 1] [--json PATH]

Per config, forward+backward of the same layer three ways, measured round-robin in one
process (each round runs every variant once, back to back):

- ``autocast``: fp32 weights and fp32 input inside ``torch.autocast(cpu, bfloat16)`` (the
  backward runs outside the region, as in a training loop);
- ``bf16``: a bf16 copy of the layer on bf16 input (the speed autocast should reach);
- ``fp32``: the fp32 layer without autocast.

It prints the paired ratio (median over rounds of time / the bf16 time of the same round)
and the fastest-time ratio. The target: autocast within 15 % of bf16 weights.

``cast floor``: autocast over fp32 master weights must cast every weight to bf16 in each
forward and every weight gradient back to fp32 in each backward (``nn.Linear`` under
autocast does the same). Each round also times exactly those casts of this layer's
weights alone; ``(bf16 + casts) / bf16`` is the ratio no autocast layer can beat.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform

import torch
from torch import nn

import moebal
from moebal.bench.configs import CONFIGS
from moebal.bench.timing import paired_ratio, run_once
from moebal.workspace import pooled_cast


class _WeightCasts(nn.Module):
    """Only the casts autocast adds: every weight to bf16 and a bf16 gradient back to fp32."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        total = x.new_zeros(())
        for name, w in self.layer.named_parameters():
            if name.startswith("router."):  # the router runs fp32 under autocast: no cast
                continue
            total = total + pooled_cast(w, torch.bfloat16).view(-1)[0].float()
        return total.expand_as(x).to(torch.bfloat16)  # the backward sends one bf16 gradient per weight


class _Autocast(nn.Module):
    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(x)


class _CastInput(nn.Module):
    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        return self.inner(x.to(self.dtype))


def measure(name: str, repeats: int) -> dict:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    layer = moebal.MoE(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, router="aux_loss")
    mods = {
        "autocast": _Autocast(layer, torch.bfloat16),
        "bf16": _CastInput(copy.deepcopy(layer).to(torch.bfloat16), torch.bfloat16),
        "fp32": layer,
        "casts": _WeightCasts(layer),
    }
    x = torch.randn(cfg.tokens, cfg.d_model, requires_grad=True)
    grads = {n: torch.randn(cfg.tokens, cfg.d_model, generator=torch.Generator().manual_seed(1)) for n in mods}
    for n in ("autocast", "bf16", "casts"):  # their outputs are bf16, and so is the gradient that reaches them
        grads[n] = grads[n].to(torch.bfloat16)
    rounds = {n: [] for n in mods}
    names = list(mods)
    for r in range(repeats + 1):  # round 0 warms up; the order rotates every round
        for n in names[r % len(names):] + names[: r % len(names)]:
            t = run_once(mods[n], x, grads[n], "fwd+bwd", timer="cpu")
            if r:
                rounds[n].append(t)
    out = {"config": name, "tokens": cfg.tokens, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
           "num_experts": cfg.num_experts, "top_k": cfg.top_k, "times_s": rounds}
    rounds["bf16+casts"] = [b + c for b, c in zip(rounds["bf16"], rounds.pop("casts"))]
    out["paired_ratio_vs_bf16"] = {n: paired_ratio(rounds[n], rounds["bf16"]) for n in rounds}
    out["fastest_ratio_vs_bf16"] = {n: min(rounds[n]) / min(rounds["bf16"]) for n in rounds}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="C,A")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"device": platform.processor() or platform.machine(), "threads": args.threads,
               "torch": torch.__version__, "timer": "cpu (process time)", "configs": []}
    print("config  autocast/bf16 (paired, fastest)  cast floor (bf16+casts)/bf16  fp32/bf16 (paired, fastest)")
    for name in args.configs.split(","):
        r = measure(name, args.repeats)
        results["configs"].append(r)
        p, f = r["paired_ratio_vs_bf16"], r["fastest_ratio_vs_bf16"]
        print(f"{name:6s}  {p['autocast']:.3f}, {f['autocast']:.3f}                    "
              f"{p['bf16+casts']:.3f}, {f['bf16+casts']:.3f}                  "
              f"{p['fp32']:.3f}, {f['fp32']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
