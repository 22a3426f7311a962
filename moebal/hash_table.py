"""Hash Layers' balanced token-id -> experts table (Roller et al. 2021), as a pure function.

Shape legend: V ids (vocabulary), E experts, K experts per id.
"""
from __future__ import annotations

import heapq

import torch

__all__ = ["balanced_hash_table"]


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
