"""Hash Layers (Roller et al. 2021) as pure functions: the balanced token-id -> experts table,
and the n-gram bucket of each token.

Shape legend: V buckets (ids, or hashed n-grams), E experts, K experts per bucket, T tokens,
B sequences, S tokens per sequence.
"""
from __future__ import annotations

import heapq

import torch

__all__ = ["balanced_hash_table", "ngram_buckets", "bucket_counts"]


def balanced_hash_table(counts_V: torch.Tensor, num_experts: int, top_k: int = 1) -> torch.Tensor:
    """``[V, K]`` int64: K distinct experts per id, placed so the bucket loads are even.

    Longest-processing-time greedy (Graham's LPT): ids in decreasing frequency (ties: the
    lower id first), each onto the K currently least-loaded experts (ties: the lower
    expert), which then carry its count. For K = 1 the heaviest bucket is at most
    ``4/3 - 1/(3E)`` times the best possible. ``counts_V`` holds each id's frequency
    (any non-negative numbers, e.g. counted on a sample of the training data).
    """
    if not isinstance(counts_V, torch.Tensor) or counts_V.dim() != 1:
        raise ValueError(f"counts must be a 1-d tensor [V], got {getattr(counts_V, 'shape', counts_V)!r}")
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
    counts = counts_V.detach().double().cpu()
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("counts must be finite and >= 0")
    order = torch.sort(-counts, stable=True).indices.tolist()  # decreasing, ties -> lower id
    values = counts.tolist()
    heap = [(0.0, e) for e in range(num_experts)]  # (load, expert): ties -> lower expert
    table = [[0] * top_k for _ in values]
    for v in order:
        chosen = [heapq.heappop(heap) for _ in range(top_k)]
        table[v] = sorted(e for _, e in chosen)
        for load, e in chosen:
            heapq.heappush(heap, (load + values[v], e))
    return torch.tensor(table, dtype=torch.int64).reshape(len(values), top_k)


# --- token ids -> buckets ------------------------------------------------------------------

HASH_PRIME = 2_147_483_647  # 2^31 - 1: every residue < 2^31, so h * HASH_BASE + v < 2^62 in int64
HASH_BASE = 1_000_003  # a prime < 2^31
PAD = 0  # the value of a position before the sequence start (a token's value is id % (P - 1) + 1 >= 1)


def ngram_buckets(
    token_ids: torch.Tensor,
    ngram: int,
    num_buckets: int,
    seq_len: int | None = None,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64, ``token_ids``' shape: each token's bucket in ``[0, num_buckets)``.

    ``ngram = 1``: the bucket is the id itself (ids must lie in ``[0, num_buckets)``).
    ``ngram = n > 1``: the token and the n - 1 before it in its sequence, oldest first,
    each mapped to ``v = id % (P - 1) + 1`` (a position before the sequence start, or a
    masked token, is ``PAD = 0``), hashed as ``h = (h * HASH_BASE + v) % P`` from ``h = 0``
    with ``P = 2^31 - 1`` (int64 arithmetic, never overflows), then ``h % num_buckets``.

    Args:
        token_ids: int ``[T]`` (rows laid out as flattened ``[B, S]``) or ``[..., S]``
            (the last dim is the sequence); ids >= 0.
        seq_len: S for a flat ``[T]`` input (None: one sequence, or the last dim of a
            multi-dim input, which it must equal when given).
        token_mask: bool, ``token_ids``' shape, True = a real token: a masked token's id is
            not checked, acts as ``PAD`` in its successors' contexts, and gets bucket 0.

    Outside torch.compile, an id outside the range raises ``ValueError`` naming it (one
    host read); compiled, ids are not checked.
    """
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"ngram must be an int >= 1, got {ngram!r}")
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets must be an int >= 1, got {num_buckets!r}")
    if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.is_complex() \
            or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {getattr(token_ids, 'dtype', type(token_ids))}")
    if token_mask is not None and (token_mask.dtype != torch.bool or token_mask.shape != token_ids.shape):
        raise ValueError(f"token_mask must be a bool tensor of token_ids' shape {tuple(token_ids.shape)}")
    shape = token_ids.shape
    if token_ids.dim() > 1:
        if seq_len is not None and seq_len != shape[-1]:
            raise ValueError(f"seq_len={seq_len} but token_ids has shape {tuple(shape)} (sequence = last dim)")
        seq_len = shape[-1]
    ids_T = token_ids.reshape(-1).long()
    mask_T = None if token_mask is None else token_mask.reshape(-1)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be None or an int >= 1, got {seq_len!r}")
    if not torch.compiler.is_compiling():
        T = ids_T.shape[0]
        if seq_len is not None and T % seq_len:
            raise ValueError(f"{T} tokens are not whole sequences of seq_len={seq_len}")
        _check_ids(ids_T, mask_T, num_buckets if ngram == 1 else None)
    if ngram == 1:
        return (ids_T if mask_T is None else torch.where(mask_T, ids_T, 0)).reshape(shape)
    value_T = ids_T % (HASH_PRIME - 1) + 1
    if mask_T is not None:
        value_T = torch.where(mask_T, value_T, PAD)
    value_BS = value_T.view(1, -1) if seq_len is None else value_T.view(-1, seq_len)
    padded_BP = torch.cat([value_BS.new_full((value_BS.shape[0], ngram - 1), PAD), value_BS], dim=1)
    S = value_BS.shape[1]
    h_BS = torch.zeros_like(value_BS)
    for lag in range(ngram):  # oldest first: window position lag reads the token ngram-1-lag back
        h_BS = (h_BS * HASH_BASE + padded_BP[:, lag:lag + S]) % HASH_PRIME
    bucket_T = h_BS.reshape(-1) % num_buckets
    if mask_T is not None:
        bucket_T = torch.where(mask_T, bucket_T, 0)
    return bucket_T.reshape(shape)


def _check_ids(ids_T: torch.Tensor, mask_T: torch.Tensor | None, high: int | None) -> None:
    if ids_T.numel() == 0:
        return
    real_T = ids_T if mask_T is None else torch.where(mask_T, ids_T, 0)
    low_id, high_id = (int(v) for v in torch.stack(torch.aminmax(real_T)).tolist())
    if low_id < 0:
        raise ValueError(f"token ids must be >= 0, got {low_id}")
    if high is not None and high_id >= high:
        raise ValueError(f"token ids must be < num_buckets={high} for ngram=1 (the bucket is the id), got {high_id}")


def bucket_counts(
    token_ids: torch.Tensor,
    ngram: int,
    num_buckets: int,
    seq_len: int | None = None,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 ``[num_buckets]``: how many (real) tokens fall in each bucket of ``ngram_buckets``;
    the ``counts`` of ``HashRouting(table="balanced")``, counted on a sample of the data."""
    bucket_T = ngram_buckets(token_ids, ngram, num_buckets, seq_len, token_mask).reshape(-1)
    if token_mask is not None:
        bucket_T = bucket_T[token_mask.reshape(-1)]
    return torch.bincount(bucket_T, minlength=num_buckets)
