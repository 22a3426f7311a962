"""Exact balanced assignment (BASE layers' linear assignment, generalised to top-k).

Shape legend: T tokens, E experts, K top-k, C = T*K/E tokens per expert; ``_EE`` is the
small "move one token from expert i to expert j" graph.

The problem is the transportation LP  max sum s*x  s.t. rows sum to K, columns to C,
0 <= x <= 1, whose optima are integral. Its dual has one price per expert: with prices
p, a token that takes its top-k of ``s - p`` is optimal for whatever loads result. The
solver keeps that invariant throughout and only moves loads:

0. ties: a fixed hash perturbation far below the scores' resolution makes the optimum
   unique, so plateaus of equal scores cannot stall the steps below;
1. prices: Jacobi rounds of per-expert quantile updates (``quantile_prices``), stopped
   once the excess left is cheaper to repair than another round;
2. start: each token takes its top-k of ``s - p``; loads are then close to C;
3. repair (``moebal.assignment_graph``): an expert far over C sheds its excess at once
   by a price raise that moves exactly that many tokens to their next-best expert;
   otherwise successive shortest paths with potentials on the E x E graph whose edge
   i -> j costs the cheapest reduced-cost move of a token from i to j (a token already
   on j cannot move there, which keeps experts distinct for K > 1): Bellman-Ford from
   all overloaded experts, each price drops by its distance (reduced costs stay >= 0,
   shortest-path edges become 0), and tokens move along edge-disjoint tree paths to
   underloaded experts; repeat until balanced;
4. certificate: complementary slackness, every token holds a top-k of ``s - p`` within
   tol, so no cycle of moves can gain and the balanced assignment is optimal. If
   rounding ever broke that, negative-cycle cancelling would finish the job.

Everything is torch tensor ops on the scores' device; the loop syncs with the host once
or twice per repair step (a handful to a few dozen steps in practice).
"""
from __future__ import annotations

import math

import torch

from moebal.assignment_graph import MoveGraph, repair_phase, shed
from moebal.assignment_approx import (
    add_tie_breaker,
    check_scores,
    route_nonfinite_rows,
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

_MAX_PRICE_ROUNDS = 8
_SHED_MIN = 4  # experts this far over capacity shed their excess by a price raise
_SHED_MAX = 4  # at most this many per repair step
_ROUND_COST_ELEMENTS = 10_000  # a price round over T*E scores costs about one repair step per this many


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


def _repair(g: MoveGraph, C: int) -> int:
    """Balance g's loads at C while keeping it optimal for its loads; returns the steps."""
    sheds = 0
    for step in range(g.N + 1):
        excess = (g.load_E - C).tolist()
        if max(excess) <= 0:
            return step
        heavy = sorted((x, e) for e, x in enumerate(excess) if x >= _SHED_MIN)[-_SHED_MAX:]
        if heavy and sheds < 2 * g.E:
            # an overloaded expert feeds few disjoint shortest paths: shed its excess at once
            for x, e in reversed(heavy):
                shed(g, e, x)
            sheds += len(heavy)
        elif repair_phase(g, excess) == 0:
            raise RuntimeError("balanced_assignment: no augmenting path found")
    raise RuntimeError("balanced_assignment: repair did not converge")


def _certify(s_TE, p_E, idx_TK, tol: float) -> bool:
    """Complementary slackness: every token holds a top-k of ``s - p`` (within tol).

    Then every move in the E x E graph has reduced cost >= -tol, so no cycle of moves
    gains more than E*tol and the assignment is optimal for its (balanced) loads.
    """
    v_TE = s_TE - p_E
    held_T = v_TE.gather(1, idx_TK).amin(1)
    if idx_TK.shape[1] > 1:
        v_TE.scatter_(1, idx_TK, -math.inf)
    return bool((held_T >= v_TE.amax(1) - tol).all())


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
        the optimum of the transportation LP: exactly for integer-valued scores (when
        ``max|s| * T*K < 2^38``), and within ``T*K * 2^-33 * max|s|`` otherwise (ties
        are broken by a tiny fixed perturbation). Per token, experts are ordered by
        descending score, ties toward the lower expert index. Among several optimal
        assignments the result is deterministic for a given input.

        Non-finite scores: a token whose scores are not all finite (NaN or +-inf) is
        routed to experts ``0..K-1`` (as ``topk_routing`` routes a row of NaNs) and left
        out of the balance: the other T_f tokens get the balanced assignment of those
        tokens alone, ``C = T_f*K/E`` each.

    Raises:
        TypeError / ValueError: see :func:`moebal.assignment_approx.check_scores` (with
        non-finite rows, ``T_f * top_k`` must be a multiple of E).
    """
    checked = check_scores(scores_TE, top_k)
    if checked.finite_T is not None:
        solve = lambda s: balanced_assignment(s, top_k)  # noqa: E731
        return route_nonfinite_rows(solve, scores_TE, top_k, checked.finite_T)
    T, E = scores_TE.shape
    K, C, scale = top_k, checked.capacity, checked.absmax
    dev = scores_TE.device
    s_TE = scores_TE.detach().to(torch.float64).contiguous()
    if T == 0:
        return torch.empty(0, K, dtype=torch.long, device=dev)
    if K == E:  # every token takes every expert
        return _order_by_score(s_TE, torch.arange(E, device=dev).expand(T, E).contiguous())
    # Break ties: optimise s + eps*f with f in [0, 1) a fixed hash of (token, expert) that
    # no row or column shift can cancel. Plateaus of equal scores (constant or coarsely
    # quantised routers) would otherwise stall every part of the solver. The optimum
    # moves by at most T*K*eps <= 1/4 (so integer scores stay exactly optimal) and
    # <= T*K * 2^-33 * max|s| (negligible for float scores).
    scale = scale if scale > 0 else 1.0
    eps = max(min(scale * 2.0**-33, 0.25 / (T * K)), scale * 2.0**-40)
    if s_TE.data_ptr() == scores_TE.data_ptr():
        s_TE = s_TE.clone()  # float64 input: never write into the caller's tensor
    add_tie_breaker(s_TE, eps)
    tol = eps / 64  # the certificate must see the perturbation, not rounding noise
    # price rounds cost ~T*E each, repair phases a roughly fixed overhead: stop the rounds
    # once the excess left is worth fewer phases than another round would cost
    p_E = quantile_prices(
        s_TE.t().contiguous(), K, _MAX_PRICE_ROUNDS,
        stop_excess=T * E // _ROUND_COST_ELEMENTS,
    )
    g = MoveGraph(s_TE, p_E, topk_indices(s_TE - p_E, K))
    _repair(g, C)
    idx_TK = g.indices()
    if not _certify(s_TE, g.p_E, idx_TK, tol):
        member_TE = torch.zeros(T, E, dtype=torch.bool, device=dev).scatter_(1, idx_TK, True)
        _cancel_negative_cycles(s_TE, idx_TK, member_TE, tol)
    return _order_by_score(scores_TE.detach(), idx_TK)


def assign(scores_TE: torch.Tensor, top_k: int = 1, solver: str = "exact", **kwargs) -> torch.Tensor:
    """Dispatch to a balanced-assignment solver by name (one of ``SOLVERS``)."""
    if solver == "exact":
        return balanced_assignment(scores_TE, top_k, **kwargs)
    if solver == "sinkhorn":
        return sinkhorn_assignment(scores_TE, top_k, **kwargs)
    if solver == "quantile":
        return quantile_assignment(scores_TE, top_k, **kwargs)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
