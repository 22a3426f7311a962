"""Seeded, tie-free routing inputs shared by the dispatch/experts tests."""
import torch


def random_routing(T, E, K, seed, skew=None):
    """``(indices [T,K], weights [T,K] float64)``: top-K of seeded random logits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if skew is not None:
        logits = logits + skew
    idx = torch.argsort(logits, dim=-1, descending=True)[:, :K]
    w = torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1
    return idx, w
