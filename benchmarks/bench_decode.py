"""Inference speed on CPU: decode-sized MoE layers, the expert-path grid, and generate() tokens/s.

    python benchmarks/bench_decode.py --json benchmarks/results/decode_cpu_<cpu>.json
    python benchmarks/bench_decode.py --paths --threads 1 2 --json benchmarks/results/expert_paths_<cpu>.json

Default run, all side by side in one process, one thread:

- ``layer``: ``moebal.bench.decode.run_decode_bench`` (``moebal bench --decode``): the MoE
  layer's forward under ``inference_mode`` at T = 1, 8, 64 tokens (d=1024, f=384, E=64,
  K=8) in fp32 and bf16, moebal next to HF's eager and ``grouped_mm`` experts, with the
  touched expert weight bytes, GB/s and the fraction of the read bandwidth measured here.
- ``generate``: greedy ``generate()`` with the KV cache of two small Llamas (``GEN_CONFIGS``:
  ``tiny``, and ``fine`` with the decode shape's experts) swapped to moebal MoE layers (``moebal.swap_ffn``, fresh experts), the same model with the decode
  layout (``moebal.prepare_decode``), and the same model exported to HF's native Mixtral
  block (``moebal.hf.to_native``), batch 1 and 8: new tokens/s, interleaved rounds,
  median. The three produce the same tokens (checked).

``--paths``: ``run_path_grid``, the measurements behind ``moebal.expert_paths.CPU_TABLES`` (one per CPU kind);
it prints the table to paste.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time

import torch

import moebal
from moebal.bench import decode, save_json
from moebal.bench.run import environment

# "tiny": a tiny Llama whose per-token work is small (the layers' fixed costs show); "fine": two layers of
# the decode shape's fine-grained experts (d=1024, f=384, E=64, K=8), where expert weight reads dominate
GEN_CONFIGS = {
    "tiny": dict(vocab=512, d_model=256, expert_d_ff=256, layers=4, heads=4, experts=16, top_k=2, prompt=16,
                 new_tokens=32),
    "fine": dict(vocab=512, d_model=1024, expert_d_ff=384, layers=2, heads=8, experts=64, top_k=8, prompt=16,
                 new_tokens=16),
}


def _tiny_llama(cfg: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["d_model"], intermediate_size=2 * cfg["expert_d_ff"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"], max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config)
    moebal.swap_ffn(model, cfg["experts"], cfg["top_k"], router="aux_loss", upcycle=False, d_ff=cfg["expert_d_ff"])
    return model.eval()


def run_generate(cfg: dict = GEN_CONFIGS["tiny"], batches=(1, 8), dtypes=("fp32", "bf16"), repeats: int = 5, seed: int = 0,
                 progress=print) -> list[dict]:
    """New tokens/s of greedy generate() for the swapped model, with the decode layout, and its native export."""
    from moebal.hf import to_native

    base = _tiny_llama(cfg, seed)
    out = []
    for dname in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        models = {"moebal": copy.deepcopy(base).to(dtype)}
        models["moebal_decode"] = copy.deepcopy(models["moebal"])
        moebal.prepare_decode(models["moebal_decode"])
        models["hf_native"] = to_native(base).to(dtype).eval()
        for B in batches:
            ids = torch.randint(1, cfg["vocab"], (B, cfg["prompt"]), generator=torch.Generator().manual_seed(seed))
            kw = dict(max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"], do_sample=False,
                      use_cache=True, attention_mask=torch.ones_like(ids))
            times = {n: [] for n in models}
            with torch.inference_mode():
                toks = {n: m.generate(ids, **kw) for n, m in models.items()}  # warm-up and same-tokens check
                same = {n: bool((t == toks["hf_native"]).all()) for n, t in toks.items()}
                for r in range(repeats):
                    names = list(models)[r % len(models):] + list(models)[:r % len(models)]
                    for n in names:
                        t0 = time.process_time()
                        models[n].generate(ids, **kw)
                        times[n].append(time.process_time() - t0)
            new = B * cfg["new_tokens"]
            row = {"dtype": dname, "batch": B, "new_tokens": new, "same_tokens_as_native": same,
                   "impls": {n: {"times_s": ts, "median_s": statistics.median(ts),
                                 "tokens_per_s": new / statistics.median(ts)} for n, ts in times.items()}}
            nat = row["impls"]["hf_native"]["median_s"]
            for v in row["impls"].values():
                v["ratio_to_native"] = v["median_s"] / nat
            out.append(row)
            progress(f"generate {dname} B={B}: " + ", ".join(
                f"{n} {v['tokens_per_s']:.0f} tok/s ({v['ratio_to_native']:.2f}x native time)"
                for n, v in row["impls"].items()) + f"; same tokens: {same}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", action="store_true", help="the path grid instead")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="--paths: the thread counts to measure (wall time above one thread)")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    if args.paths:
        before = load()
        grid = decode.run_path_grid(repeats=args.repeats, threads=tuple(args.threads), progress=print)
        grid.update(environment(list(args.threads)), load_before=before, load_after=load())
        print(decode.table_from_grid(grid))
        if args.json:
            save_json(grid, args.json)
        return 0
    before = load()
    print("load before:", before)
    result = decode.run_decode_bench(repeats=args.repeats, progress=print)
    result["load_before"] = before
    print(decode.format_decode_table(result))
    if not args.no_generate:
        result["generate"] = {name: {"config": cfg, "rows": run_generate(cfg, progress=print)}
                              for name, cfg in GEN_CONFIGS.items()}
    result["load_after"] = load()
    print("load after:", result["load_after"])
    if args.json:
        save_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
