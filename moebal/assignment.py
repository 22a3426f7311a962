"""Exact balanced assignment (BASE layers' linear assignment, generalised to top-k).

Shape legend: T tokens, E experts, K top-k, C = T*K/E tokens per expert; ``_EE`` is the
small "move one token from expert i to expert j" graph.

The problem is the transportation LP  max sum s*x  s.t. rows sum to K, columns to C,
0 <= x <= 1, whose optima are integral. Its dual has one price per expert: with prices
p, a token that takes its top-k of ``s - p`` is optimal for whatever loads result, so
the solver is

1. prices: a few Jacobi rounds of per-expert quantile updates (``quantile_prices``);
2. start: each token takes its top-k of ``s - p``; loads are then close to C;
3. repair (successive shortest paths with potentials): on the E x E graph whose edge
   i -> j costs the cheapest reduced-cost move of a token from i to j (a token already
   on j cannot move there, which is what keeps experts distinct for K > 1), run
   Bellman-Ford from all overloaded experts, lower each price by its distance (all
   reduced costs stay >= 0, shortest-path edges become 0), and move tokens along
   edge-disjoint tree paths to underloaded experts; repeat until balanced;
4. certificate: every reduced cost of the final graph is >= -tol, i.e. no negative
   cycle, i.e. optimal (within T*K*tol; exact on integer scores). If rounding ever
   breaks this, plain negative-cycle cancelling finishes the job.

Everything is torch tensor ops on the scores' device; the loop syncs with the host once
per phase (a handful of phases in practice).
"""
from __future__ import annotations

import math

import torch

from moebal.assignment_approx import (
    check_scores,
    quantile_assignment,
    quantile_prices,
    sinkhorn_assignment,
    topk_indices,
)

__all__ = [
    "balanced_assignment",
    "sinkhorn_assignment",
    "quantile_assignment",
    "assign",
    "SOLVERS",
]

SOLVERS = ("exact", "sinkhorn", "quantile")

_PRICE_ROUNDS = 3
_REL_TOL = 1e-12


def _cost_matrix(v_TE, idx_TK, member_TE):
    """R[i, j] = min over tokens t on i and not on j of v[t, i] - v[t, j]; inf if none."""
    T, E = v_TE.shape
    cost_TKE = v_TE.gather(1, idx_TK).unsqueeze(2) - v_TE.unsqueeze(1)
    cost_TKE.masked_fill_(member_TE.unsqueeze(1), math.inf)
    R_EE = torch.full((E, E), math.inf, dtype=v_TE.dtype, device=v_TE.device)
    R_EE.scatter_reduce_(0, idx_TK.reshape(-1, 1).expand(-1, E), cost_TKE.reshape(-1, E), "amin")
    return R_EE


def _bellman_ford(R_EE, dist_E, tol: float, max_iters: int):
    """Jacobi relaxation until nothing improves by more than tol: (dist, parent, converged)."""
    parent_E = torch.full_like(dist_E, -1, dtype=torch.long)
    for _ in range(max_iters):
        best_E, arg_E = (dist_E.unsqueeze(1) + R_EE).min(0)
        better_E = best_E < dist_E - tol
        if not bool(better_E.any()):
            return dist_E, parent_E, True
        dist_E = torch.where(better_E, best_E, dist_E)
        parent_E = torch.where(better_E, arg_E, parent_E)
    return dist_E, parent_E, False


def _shortest_paths(R_EE, dist_E):
    """Bellman-Ford (Jacobi sweeps) on non-negative costs: (dist, parent), parent -1 at roots."""
    parent_E = torch.full_like(dist_E, -1, dtype=torch.long)
    for _ in range(R_EE.shape[0] + 1):
        best_E, arg_E = (dist_E.unsqueeze(1) + R_EE).min(0)
        better_E = best_E < dist_E
        if not bool(better_E.any()):
            break
        dist_E = torch.minimum(dist_E, best_E)
        parent_E = torch.where(better_E, arg_E, parent_E)
    return dist_E, parent_E


def _edge_tokens(v_TE, idx_TK, member_TE, src: list[int], dst: list[int]):
    """For each edge src[l] -> dst[l], the cheapest token on src not on dst: (token, slot)."""
    T, K = idx_TK.shape
    src_L = torch.tensor(src, dtype=torch.long, device=v_TE.device)
    dst_L = torch.tensor(dst, dtype=torch.long, device=v_TE.device)
    cost_TKL = v_TE.gather(1, idx_TK).unsqueeze(2) - v_TE[:, dst_L].unsqueeze(1)
    bad_TKL = (idx_TK.unsqueeze(2) != src_L) | member_TE[:, dst_L].unsqueeze(1)
    flat_L = cost_TKL.masked_fill_(bad_TKL, math.inf).reshape(T * K, -1).argmin(0)
    return (flat_L // K).tolist(), (flat_L % K).tolist()


def _apply_moves(idx_TK, member_TE, tok, slot, src, dst) -> None:
    dev = idx_TK.device
    t = torch.tensor(tok, dtype=torch.long, device=dev)
    k = torch.tensor(slot, dtype=torch.long, device=dev)
    i = torch.tensor(src, dtype=torch.long, device=dev)
    j = torch.tensor(dst, dtype=torch.long, device=dev)
    idx_TK[t, k] = j
    member_TE[t, i] = False
    member_TE[t, j] = True


def _tree_path(parent: list[int], node: int) -> list[int]:
    nodes = [node]
    while parent[nodes[-1]] >= 0:
        nodes.append(parent[nodes[-1]])
        if len(nodes) > len(parent):
            raise RuntimeError("balanced_assignment: shortest-path tree has a cycle")
    return nodes[::-1]


class _MoveGraph:
    """Assignment, prices and the reduced-cost move graph, updated together.

    ``R_EE[i, j]`` = min over (token t, slot) on i with t not on j of
    ``(s[t,i] - p[i]) - (s[t,j] - p[j])`` and ``arg_EE[i, j]`` the flat pair id
    ``t*K + slot`` that attains it (lowest id among ties; ``T*K`` when there is none).
    Rows are recomputed only for experts whose token sets changed; a price change
    shifts R without changing any argmin.
    """

    def __init__(self, s_TE, p_E, idx_TK):
        self.s_TE, self.p_E = s_TE, p_E
        self.T, self.E = s_TE.shape
        self.K = idx_TK.shape[1]
        self.idx_N = idx_TK.reshape(-1).clone()  # N = T*K (token, slot) pairs
        dev = s_TE.device
        self.member_TE = None
        if self.K > 1:
            self.member_TE = torch.zeros(self.T, self.E, dtype=torch.bool, device=dev)
            self.member_TE.scatter_(1, idx_TK, True)
        self.load_E = torch.bincount(self.idx_N, minlength=self.E)
        self.R_EE = torch.full((self.E, self.E), math.inf, dtype=s_TE.dtype, device=dev)
        self.arg_EE = torch.full((self.E, self.E), self.T * self.K, dtype=torch.long, device=dev)
        self.refresh_rows(None)

    def refresh_rows(self, rows_E) -> None:
        """Recompute R and arg for the experts flagged in rows_E (all when None)."""
        E, K = self.E, self.K
        if rows_E is None:
            pair_P = torch.arange(self.idx_N.numel(), device=self.idx_N.device)
        else:
            pair_P = rows_E[self.idx_N].nonzero().squeeze(1)
            self.R_EE[rows_E] = math.inf
            self.arg_EE[rows_E] = self.T * K
        tok_P, exp_P = pair_P // K, self.idx_N[pair_P]
        v_PE = self.s_TE[tok_P] - self.p_E
        cost_PE = v_PE.gather(1, exp_P.unsqueeze(1)) - v_PE
        if self.member_TE is not None:
            cost_PE.masked_fill_(self.member_TE[tok_P], math.inf)
        row_PE = exp_P.unsqueeze(1).expand(-1, E)
        self.R_EE.scatter_reduce_(0, row_PE, cost_PE, "amin")
        tight_PE = cost_PE == self.R_EE[exp_P]  # inf == inf marks 'no move'; never used
        pid_PE = torch.where(tight_PE, pair_P.unsqueeze(1), self.T * K)
        self.arg_EE.scatter_reduce_(0, row_PE, pid_PE, "amin")

    def shift_prices(self, delta_E) -> None:
        """p -= delta: reduced costs R[i, j] grow by delta[i] - delta[j]."""
        self.p_E -= delta_E
        self.R_EE += delta_E.unsqueeze(1) - delta_E.unsqueeze(0)

    def move(self, pair: list[int], dst: list[int]) -> None:
        """Move each (token, slot) pair to its new expert and refresh the touched rows."""
        dev = self.idx_N.device
        pair_L = torch.tensor(pair, dtype=torch.long, device=dev)
        dst_L = torch.tensor(dst, dtype=torch.long, device=dev)
        src_L = self.idx_N[pair_L]
        self.idx_N[pair_L] = dst_L
        self.load_E.index_add_(0, src_L, torch.full_like(src_L, -1))
        self.load_E.index_add_(0, dst_L, torch.ones_like(dst_L))
        rows_E = torch.zeros(self.E, dtype=torch.bool, device=dev)
        rows_E[src_L] = True
        rows_E[dst_L] = True
        if self.member_TE is not None:
            tok_L = pair_L // self.K
            self.member_TE[tok_L, src_L] = False
            self.member_TE[tok_L, dst_L] = True
            rows_E[self.idx_N.view(-1, self.K)[tok_L].reshape(-1)] = True  # their other experts
        self.refresh_rows(rows_E)

    def indices(self):
        return self.idx_N.view(self.T, self.K)


def _repair_phase(g: _MoveGraph, excess: list[int]) -> int:
    """One successive-shortest-path phase on the move graph g (prices and moves in place).

    Returns the number of augmenting paths applied (each moves one unit of excess).
    """
    E, K = g.E, g.K
    over_E = torch.tensor([x > 0 for x in excess], device=g.R_EE.device)
    dist0_E = torch.where(over_E, 0.0, math.inf).to(g.R_EE.dtype)
    dist_E, parent_E = _shortest_paths(g.R_EE.clamp(min=0.0), dist0_E)
    finite_E = torch.isfinite(dist_E)
    g.shift_prices(torch.where(finite_E, dist_E, dist_E[finite_E].max()))
    dist, parent = dist_E.tolist(), parent_E.tolist()
    supply = [max(x, 0) for x in excess]
    sinks = sorted((dist[e], e) for e in range(E) if excess[e] < 0 and math.isfinite(dist[e]))
    used: set[tuple[int, int]] = set()
    paths = []
    for _, sink in sinks:
        nodes = _tree_path(parent, sink)
        edges = list(zip(nodes[:-1], nodes[1:]))
        if supply[nodes[0]] <= 0 or not edges or any(e in used for e in edges):
            continue
        supply[nodes[0]] -= 1
        used.update(edges)
        paths.append(edges)
    if not paths:
        return 0
    src = [a for edges in paths for a, _ in edges]
    dst = [b for edges in paths for _, b in edges]
    dev = g.arg_EE.device
    pair = g.arg_EE[torch.tensor(src, device=dev), torch.tensor(dst, device=dev)].tolist()
    # a token may leave an expert once and join an expert once per phase
    seen: set[tuple[int, int, int]] = set()
    keep_pair, keep_dst, pos = [], [], 0
    for edges in paths:
        n = len(edges)
        keys = [(0, pair[pos + q] // K, src[pos + q]) for q in range(n)]
        keys += [(1, pair[pos + q] // K, dst[pos + q]) for q in range(n)]
        if not seen.intersection(keys) and len(set(keys)) == len(keys):
            seen.update(keys)
            keep_pair += pair[pos : pos + n]
            keep_dst += dst[pos : pos + n]
        pos += n
    if not keep_pair:
        return 0
    g.move(keep_pair, keep_dst)
    return len(keep_pair)


def _find_cycle(parent: list[int]) -> list[int] | None:
    """A cycle of the parent pointers in edge order (a -> b means b's parent is a)."""
    for start in range(len(parent)):
        seen = set()
        node = start
        while node >= 0 and node not in seen:
            seen.add(node)
            node = parent[node]
        if node >= 0:
            cycle = [node]
            while parent[cycle[-1]] != node:
                cycle.append(parent[cycle[-1]])
            return cycle[::-1]
    return None


def _cancel_negative_cycles(s_TE, idx_TK, member_TE, tol: float) -> None:
    """Fallback: move tokens around negative cycles of the raw move graph until none remain."""
    E = s_TE.shape[1]
    while True:
        R_EE = _cost_matrix(s_TE, idx_TK, member_TE)
        zero_E = torch.zeros(E, dtype=s_TE.dtype, device=s_TE.device)
        _, parent_E, ok = _bellman_ford(R_EE, zero_E, tol, E + 1)
        if ok:
            return
        cycle = _find_cycle(parent_E.tolist())
        if cycle is None:
            raise RuntimeError("balanced_assignment: Bellman-Ford did not converge but found no cycle")
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):  # one at a time: each move sees the last
            tok, slot = _edge_tokens(s_TE, idx_TK, member_TE, [a], [b])
            _apply_moves(idx_TK, member_TE, tok, slot, [a], [b])


def _order_by_score(s_TE, idx_TK):
    """Sort each token's experts by descending score, ties toward the lower index."""
    if idx_TK.shape[1] == 1:
        return idx_TK
    idx_TK = idx_TK.sort(dim=1).values
    order_TK = s_TE.gather(1, idx_TK).sort(dim=1, descending=True, stable=True).indices
    return idx_TK.gather(1, order_TK)


@torch.no_grad()
def balanced_assignment(scores_TE: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """Exact balanced top-k assignment maximising the total score.

    Args:
        scores_TE: ``[T, E]`` float scores (any float dtype, any device; the math runs in
            float64). Not differentiated: only indices come back.
        top_k: experts per token, ``1 <= top_k <= E``; ``T * top_k`` must be a
            multiple of E.

    Returns:
        ``indices_TK`` int64 on the scores' device: every expert appears exactly
        ``C = T*K/E`` times, a token's K experts are distinct, and the total score is
        the optimum of the transportation LP (to ~1e-12 of the score range per token;
        exactly on integer-valued scores). Per token, experts are ordered by descending
        score, ties toward the lower expert index. Among several optimal assignments
        the result is deterministic for a given input and device.

    Raises:
        TypeError / ValueError: see :func:`moebal.assignment_approx.check_scores`.
    """
    T, E, C, scale = check_scores(scores_TE, top_k)
    K = top_k
    dev = scores_TE.device
    s_TE = scores_TE.detach().to(torch.float64).contiguous()
    if T == 0:
        return torch.empty(0, K, dtype=torch.long, device=dev)
    if K == E:  # every token takes every expert
        return _order_by_score(s_TE, torch.arange(E, device=dev).expand(T, E).contiguous())
    tol = _REL_TOL * max(scale, 1e-300)
    p_E = quantile_prices(scores_TE.detach().t().float().contiguous(), K, _PRICE_ROUNDS).double()
    g = _MoveGraph(s_TE, p_E, topk_indices(s_TE - p_E, K))
    for _ in range(T * K + 1):
        excess = (g.load_E - C).tolist()
        if max(excess) <= 0:
            break
        if _repair_phase(g, excess) == 0:
            raise RuntimeError("balanced_assignment: no augmenting path found")
    idx_TK = g.indices()
    member_TE = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, idx_TK, True)
    certified = bool((_cost_matrix(s_TE - g.p_E, idx_TK, member_TE) >= -tol).all())
    if not certified:
        _cancel_negative_cycles(s_TE, idx_TK, member_TE, tol)
    return _order_by_score(s_TE, idx_TK)


def assign(scores_TE: torch.Tensor, top_k: int = 1, solver: str = "exact", **kwargs) -> torch.Tensor:
    """Dispatch to a balanced-assignment solver by name (one of ``SOLVERS``)."""
    if solver == "exact":
        return balanced_assignment(scores_TE, top_k, **kwargs)
    if solver == "sinkhorn":
        return sinkhorn_assignment(scores_TE, top_k, **kwargs)
    if solver == "quantile":
        return quantile_assignment(scores_TE, top_k, **kwargs)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
