"""Exact balanced assignment (BASE layers' linear assignment, generalised to top-k).

Shape legend: T tokens, E experts, K top-k, C = T*K/E tokens per expert.
"""
from __future__ import annotations

import math

import torch

__all__ = ["balanced_assignment"]


def _check(scores_TE, top_k) -> tuple[int, int, int]:
    if not isinstance(scores_TE, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores_TE).__name__}")
    if scores_TE.dim() != 2:
        raise ValueError(f"scores must have shape [T, E], got {tuple(scores_TE.shape)}")
    if not scores_TE.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores_TE.dtype}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    T, E = scores_TE.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, num_experts={E}], got {top_k}")
    if (T * top_k) % E:
        step = E // math.gcd(top_k, E)
        raise ValueError(
            f"T*top_k = {T}*{top_k} is not a multiple of num_experts={E}: "
            f"pad the batch to a multiple of {step} tokens"
        )
    if not bool(torch.isfinite(scores_TE).all()):
        raise ValueError("scores contain NaN or Inf")
    return T, E, T * top_k // E


def _cost_matrix(v_TE, idx_TK, member_TE):
    """R[i, j] = min over tokens t on i, not on j, of v[t, i] - v[t, j]  (inf if none)."""
    T, E = v_TE.shape
    cost_TKE = v_TE.gather(1, idx_TK).unsqueeze(2) - v_TE.unsqueeze(1)
    cost_TKE = cost_TKE.masked_fill(member_TE.unsqueeze(1), math.inf)
    R_EE = torch.full((E, E), math.inf, dtype=v_TE.dtype, device=v_TE.device)
    R_EE.scatter_reduce_(0, idx_TK.reshape(-1, 1).expand(-1, E), cost_TKE.reshape(-1, E), "amin")
    return R_EE


def _bellman_ford(R_EE, dist_E, tol, max_iters):
    """Relax dist over R until no entry improves by more than tol; returns (dist, parent, converged)."""
    E = R_EE.shape[0]
    parent_E = torch.full((E,), -1, dtype=torch.long, device=R_EE.device)
    for _ in range(max_iters):
        cand_EE = dist_E.unsqueeze(1) + R_EE
        best_E, arg_E = cand_EE.min(0)
        better_E = best_E < dist_E - tol
        if not bool(better_E.any()):
            return dist_E, parent_E, True
        dist_E = torch.where(better_E, best_E, dist_E)
        parent_E = torch.where(better_E, arg_E, parent_E)
    return dist_E, parent_E, False


def _move(v_TE, idx_TK, member_TE, i: int, j: int) -> None:
    """Move the cheapest token on expert i (not on j) to expert j, in place."""
    K = idx_TK.shape[1]
    cost_TK = v_TE.gather(1, idx_TK) - v_TE[:, j : j + 1]
    ok_TK = (idx_TK == i) & ~member_TE[:, j : j + 1]
    flat = int(torch.where(ok_TK, cost_TK, math.inf).reshape(-1).argmin())
    t, slot = divmod(flat, K)
    idx_TK[t, slot] = j
    member_TE[t, i] = False
    member_TE[t, j] = True


def _path(parent_E, end: int, E: int) -> list[int]:
    nodes = [end]
    parent = parent_E.tolist()
    while parent[nodes[-1]] >= 0:
        nodes.append(parent[nodes[-1]])
        if len(nodes) > E + 1:
            raise RuntimeError("balanced_assignment: parent pointers form a cycle")
    return nodes[::-1]


def _find_cycle(parent_E) -> list[int] | None:
    """A cycle of the parent pointers, in edge order, or None."""
    parent = parent_E.tolist()
    for start in range(len(parent)):
        seen = {}
        node = start
        while node >= 0 and node not in seen:
            seen[node] = len(seen)
            node = parent[node]
        if node >= 0:
            cycle = [node]
            while parent[cycle[-1]] != node:
                cycle.append(parent[cycle[-1]])
            return cycle[::-1]
    return None


@torch.no_grad()
def balanced_assignment(scores_TE: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """Exact balanced top-k assignment maximising the total score.

    Returns ``indices_TK`` (int64, same device): each expert appears exactly T*K/E times,
    each token's K experts are distinct, and the summed score is the optimum of the
    transportation LP. Per token, experts are ordered by descending score, ties toward
    the lower expert index.
    """
    T, E, C = _check(scores_TE, top_k)
    K = top_k
    s_TE = scores_TE.detach().to(torch.float64)
    scale = float((s_TE.max() - s_TE.min()).abs()) if T else 0.0
    tol = 1e-12 * max(scale, 1e-300)
    idx_TK = torch.sort(s_TE, dim=1, descending=True, stable=True).indices[:, :K].contiguous()
    member_TE = torch.zeros(T, E, dtype=torch.bool, device=s_TE.device)
    member_TE.scatter_(1, idx_TK, True)
    # successive shortest paths from overloaded to underloaded experts
    while True:
        load_E = member_TE.sum(0)
        over_E = load_E > C
        if not bool(over_E.any()):
            break
        R_EE = _cost_matrix(s_TE, idx_TK, member_TE)
        dist0_E = torch.where(over_E, 0.0, math.inf).to(s_TE)
        dist_E, parent_E, _ = _bellman_ford(R_EE, dist0_E, tol, E + 1)
        under_E = load_E < C
        sink = int(torch.where(under_E, dist_E, math.inf).argmin())
        nodes = _path(parent_E, sink, E)
        for a, b in zip(nodes[:-1], nodes[1:]):
            _move(s_TE, idx_TK, member_TE, a, b)
    # certificate: no negative cycle in the E x E move graph, else cancel it
    while True:
        R_EE = _cost_matrix(s_TE, idx_TK, member_TE)
        zero_E = torch.zeros(E, dtype=s_TE.dtype, device=s_TE.device)
        dist_E, parent_E, ok = _bellman_ford(R_EE, zero_E, tol, E + 1)
        if ok:
            break
        cyc = _find_cycle(parent_E)
        if cyc is None:
            raise RuntimeError("balanced_assignment: no cycle found after Bellman-Ford failed")
        for a, b in zip(cyc, cyc[1:] + cyc[:1]):
            _move(s_TE, idx_TK, member_TE, a, b)
    order_TK = torch.sort(s_TE.gather(1, idx_TK), dim=1, descending=True, stable=True).indices
    return idx_TK.gather(1, order_TK)
