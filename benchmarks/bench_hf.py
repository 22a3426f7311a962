"""Tokens/s of a tiny transformers Llama before and after ``moebal.swap_ffn``, on CPU.

    python benchmarks/bench_hf.py                     # prints a table
    python benchmarks/bench_hf.py --json hf.json      # and saves the numbers

Three models with the same attention and embeddings, timed in one process, round-robin
(each repeat times every variant once, so drift in machine load hits all of them alike):

- ``dense``: the original Llama.
- ``upcycled``: every MLP swapped for an MoE of E copies of it, top-k (sparse upcycling).
  Each token runs k full-size experts, so its FFN costs k times the dense FFN.
- ``iso_flop``: fresh experts of width d_ff / k, so each token's FFN FLOPs equal the dense
  model's; the gap to ``dense`` is what routing, dispatch and combine cost.

``fwd`` is an eval-mode forward under ``torch.no_grad()``; ``fwd_bwd`` a training-mode
forward plus backward of the LM loss (and ``moebal.aux_loss``). tokens/s = B*S / seconds
per iteration, taking the fastest of ``--repeats`` timed blocks (the least disturbed by
other load on the machine; the median and every block are saved too). One thread by
default. The JSON holds the device, library versions and thread count.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

import moebal

SCHEMA = "moebal.bench.hf/1"


def build(variant: str, cfg: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["d_model"], intermediate_size=cfg["d_ff"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["seq_len"],
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    E, K = cfg["experts"], cfg["top_k"]
    if variant == "upcycled":
        moebal.swap_ffn(model, E, K, router="aux_loss", backend="torch")
    elif variant == "iso_flop":
        moebal.swap_ffn(model, E, K, router="aux_loss", upcycle=False, d_ff=cfg["d_ff"] // K, backend="torch")
    elif variant != "dense":
        raise ValueError(f"unknown variant {variant!r}")
    return model


def _step(model, ids, mode: str) -> None:
    if mode == "fwd":
        with torch.no_grad():
            model(ids)
        return
    loss = model(ids, labels=ids).loss
    if any(isinstance(m, moebal.MoE) for m in model.modules()):
        loss = loss + moebal.aux_loss(model)
    loss.backward()
    model.zero_grad(set_to_none=True)


def measure(cfg: dict, iters: int, warmup: int, repeats: int) -> dict:
    variants = ("dense", "upcycled", "iso_flop")
    models = {v: build(v, cfg) for v in variants}
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq_len"]), generator=torch.Generator().manual_seed(0))
    tokens = cfg["batch"] * cfg["seq_len"]
    results = {v: {} for v in variants}
    for mode in ("fwd", "fwd_bwd"):
        for v in variants:
            models[v].train(mode == "fwd_bwd")
            for _ in range(warmup):
                _step(models[v], ids, mode)
        per_iter = {v: [] for v in variants}
        for _ in range(repeats):
            for v in variants:
                start = time.perf_counter()
                for _ in range(iters):
                    _step(models[v], ids, mode)
                per_iter[v].append((time.perf_counter() - start) / iters)
        for v in variants:
            best, median = min(per_iter[v]), statistics.median(per_iter[v])
            results[v][mode] = {"tokens_per_s": tokens / best, "ms_per_iter": 1e3 * best,
                                "tokens_per_s_median": tokens / median,
                                "ms_per_iter_all": [1e3 * s for s in per_iter[v]]}
    for v in variants:
        for mode in ("fwd", "fwd_bwd"):
            results[v][mode]["vs_dense"] = results[v][mode]["tokens_per_s"] / results["dense"][mode]["tokens_per_s"]
    return results


def environment() -> dict:
    import transformers

    return {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "moebal": moebal.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = {k: getattr(args, k) for k in ("d_model", "d_ff", "layers", "heads", "vocab", "experts", "top_k",
                                         "batch", "seq_len")}
    results = measure(cfg, args.iters, args.warmup, args.repeats)
    out = {"schema": SCHEMA, "environment": environment(), "config": cfg,
           "timing": {"iters": args.iters, "warmup": args.warmup, "repeats": args.repeats,
                      "statistic": "min over repeats"},
           "results": results}
    print(f"tiny Llama d={cfg['d_model']} d_ff={cfg['d_ff']} L={cfg['layers']}, E={cfg['experts']} k={cfg['top_k']}, "
          f"{cfg['batch']}x{cfg['seq_len']} tokens, {out['environment']['threads']} threads")
    print(f"{'variant':<10} {'fwd tok/s':>11} {'vs dense':>9} {'fwd+bwd tok/s':>14} {'vs dense':>9}")
    for v, r in results.items():
        print(f"{v:<10} {r['fwd']['tokens_per_s']:>11.0f} {r['fwd']['vs_dense']:>9.2f} "
              f"{r['fwd_bwd']['tokens_per_s']:>14.0f} {r['fwd_bwd']['vs_dense']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
