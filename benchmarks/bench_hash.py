"""Hash routing's balance on byte data: MaxVio of the expert loads a hash table gives.

    python benchmarks/bench_hash.py [--experts 16] [--top-k 1] [--buckets 65536] [--seq-len 128] [--json PATH]

The corpus is ``moebal compare``'s (the running interpreter's standard-library sources as
bytes). Counts are fitted on one stream and the loads measured on another (see ``splits``:
in-sample, even/odd 64 KiB pieces, train/validation files). ``MaxVio = (max - mean) /
mean`` of the per-expert token counts (K slots per token). Tables: unigram (the bucket is the
byte, V = 256) and n-gram (a hash of the last n bytes, V = ``--buckets``), each balanced
(Graham's LPT on the train counts), random and round-robin. Sequences are ``--seq-len``
windows of the stream, as ``moebal compare`` trains on them (0 = the whole stream as one).

For the unigram table the space byte alone bounds MaxVio from below: the expert that holds
it carries at least its share p, so MaxVio >= p * E / K - 1.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

import moebal
from moebal.compare.corpus import load_corpus
from moebal.hash_table import bucket_counts, ngram_buckets
from moebal.policies.hashing import HashRouting


def max_vio(table_VK: torch.Tensor, buckets_T: torch.Tensor, num_experts: int) -> float:
    load_E = torch.bincount(table_VK[buckets_T].reshape(-1), minlength=num_experts).double()
    return ((load_E.max() - load_E.mean()) / load_E.mean()).item()


def windows(data: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, int | None]:
    """The stream cut to whole ``seq_len`` windows (0: one sequence)."""
    if not seq_len:
        return data.long(), None
    return data[: data.numel() // seq_len * seq_len].long(), seq_len


def splits(corpus, chunk: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(fit, evaluate) byte streams: the whole corpus on itself; even ``chunk``-byte pieces
    of it against the odd ones (held-out text from the same files); train -> validation
    (held-out files: the validation split is half ``pydoc_data/topics.py``, prose whose
    space share is far above the train split's)."""
    whole = torch.cat([corpus.train, corpus.val])
    pieces = whole[: whole.numel() // (2 * chunk) * 2 * chunk].view(-1, 2, chunk)
    return {
        "all->all": (whole, whole),
        "even->odd": (pieces[:, 0].reshape(-1), pieces[:, 1].reshape(-1)),
        "train->val": (corpus.train, corpus.val),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--buckets", type=int, default=2**16)
    ap.add_argument("--ngrams", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=2**16, help="bytes per piece of the even/odd split")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    E, K = args.experts, args.top_k
    corpus = load_corpus()
    parts = splits(corpus, args.chunk)
    whole = parts["all->all"][0]
    space = (whole == ord(" ")).double().mean().item()
    print(f"corpus: {corpus.train.numel()} train + {corpus.val.numel()} validation bytes; the space byte is "
          f"{100 * space:.1f} % of all -> a unigram table's MaxVio >= {space * E / K - 1:.2f} (E={E}, K={K})")
    print(f"MaxVio = (max - mean) / mean expert load; counts fitted on the first stream, loads on the second; "
          f"sequences of {args.seq_len or 'the whole stream'}")
    rows = []
    print(f"{'ngram':>5} {'V':>6} {'table':>12} " + " ".join(f"{name:>11}" for name in parts) + f" {'bound':>6}")
    for n in args.ngrams:
        V = 256 if n == 1 else args.buckets
        bucketed = {}
        for name, (fit, evaluate) in parts.items():
            fit_T, fit_S = windows(fit, args.seq_len)
            eval_T, eval_S = windows(evaluate, args.seq_len)
            bucketed[name] = (bucket_counts(fit_T, n, V, fit_S), ngram_buckets(eval_T, n, V, eval_S))
        # what no table can beat in-sample: the heaviest bucket, or the mean
        counts_V = bucketed["all->all"][0].double()
        bound = max(K / E, counts_V.max().item() / counts_V.sum().item()) * E / K - 1
        for kind in ("balanced", "random", "round_robin"):
            row = dict(ngram=n, num_buckets=V, table=kind, bound_all=bound)
            for name, (counts_V, buckets_T) in bucketed.items():
                extra = dict(counts=counts_V) if kind == "balanced" else dict(num_buckets=V)
                table_VK = HashRouting(table=kind, ngram=n, **extra).build_table(E, K)
                row[name] = max_vio(table_VK, buckets_T, E)
            rows.append(row)
            print(f"{n:>5} {V:>6} {kind:>12} " + " ".join(f"{row[name]:>11.3f}" for name in parts) + f" {bound:>6.3f}")
    if args.json:
        meta = dict(experts=E, top_k=K, seq_len=args.seq_len, chunk=args.chunk, space_share=space,
                    corpus=corpus.describe(), python=platform.python_version(), torch=torch.__version__,
                    moebal=moebal.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
