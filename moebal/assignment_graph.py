"""The E x E move graph behind the exact balanced assignment, and its repair steps.

Shape legend: T tokens, E experts, K top-k, N = T*K (token, slot) pairs, L = the most
pairs any expert holds, Q entries of the graph being recomputed.

A pair id ``n = t*K + slot`` names token t's slot; ``idx_N[n]`` is the expert it holds.
The graph entry ``R_EE[i, j]`` is the cheapest reduced-cost move of a pair from expert i
to expert j: min over pairs n on i whose token is not on j of
``(s[t, i] - p[i]) - (s[t, j] - p[j])``, and ``arg_EE[i, j]`` is that pair (the lowest
id among ties; N when there is none, with R = inf).

Both repair steps keep every token on a top-k of ``s - p``: ``shed`` raises one price,
``repair_phase`` lowers prices by shortest-path distances and moves along 0-cost edges.
"""
from __future__ import annotations

import math

import torch


class MoveGraph:
    """Assignment, prices and move graph, kept consistent through price shifts and moves.

    A price shift changes every candidate of entry (i, j) by the same amount, so it shifts
    R and keeps arg. After moves, only entries whose argmin pair left (or, for K > 1,
    whose token joined the target expert) are recomputed, over the pairs now on the
    row's expert; the moved tokens' own new moves are merged in with a min.
    """

    def __init__(self, s_TE: torch.Tensor, p_E: torch.Tensor, idx_TK: torch.Tensor):
        self.s_TE, self.p_E = s_TE, p_E
        self.T, self.E = s_TE.shape
        self.K = idx_TK.shape[1]
        self.N = self.T * self.K
        self.idx_N = idx_TK.reshape(-1).clone()
        dev = s_TE.device
        self.member_TE = None
        if self.K > 1:
            self.member_TE = torch.zeros(self.T, self.E, dtype=torch.bool, device=dev)
            self.member_TE.scatter_(1, idx_TK, True)
        self.load_E = torch.bincount(self.idx_N, minlength=self.E)
        self.rows_E1 = torch.arange(self.E, device=dev).unsqueeze(1)
        self._build()

    def indices(self) -> torch.Tensor:
        return self.idx_N.view(self.T, self.K)

    def _table(self) -> torch.Tensor:
        """Pair ids grouped by expert, ascending: ``[E, L]``, padded with N."""
        order_N = torch.argsort(self.idx_N, stable=True)
        exp_N = self.idx_N[order_N]
        start_E = torch.cumsum(self.load_E, 0) - self.load_E
        slot_N = torch.arange(self.N, device=order_N.device) - start_E[exp_N]
        table_EL = torch.full((self.E, int(self.load_E.max())), self.N, dtype=torch.long, device=order_N.device)
        table_EL[exp_N, slot_N] = order_N
        return table_EL

    def _costs(self, pair_QL, row_Q, col_QM=None):
        """Reduced cost of moving pairs ``pair_QL`` (held by expert ``row_Q``) to experts
        ``col_QM`` (all E when None): ``[Q, L, M]``; inf for padding and, for K > 1,
        for tokens already on the target expert."""
        pad_QL = pair_QL == self.N
        tok_QL = torch.where(pad_QL, 0, pair_QL) // self.K
        s_flat = self.s_TE.view(-1)
        own_QL = s_flat[tok_QL * self.E + row_Q.unsqueeze(1)] - self.p_E[row_Q].unsqueeze(1)
        if col_QM is None:  # whole rows
            v_QLM = self.s_TE[tok_QL] - self.p_E
            member_QLM = self.member_TE[tok_QL] if self.member_TE is not None else None
        else:
            at_QLM = (tok_QL * self.E).unsqueeze(2) + col_QM.unsqueeze(1)
            v_QLM = s_flat[at_QLM] - self.p_E[col_QM].unsqueeze(1)
            member_QLM = self.member_TE.view(-1)[at_QLM] if self.member_TE is not None else None
        cost_QLM = torch.sub(own_QL.unsqueeze(2), v_QLM, out=v_QLM)
        bad_QLM = pad_QL.unsqueeze(2) if member_QLM is None else member_QLM | pad_QL.unsqueeze(2)
        return cost_QLM.masked_fill_(bad_QLM, math.inf)

    def _build(self) -> None:
        table_EL = self._table()
        if table_EL.numel() <= 2 * self.N:  # loads near balance: reduce a padded [E, L, E]
            cost_ELE = self._costs(table_EL, self.rows_E1.squeeze(1))
            self.R_EE, at_EE = cost_ELE.min(1)  # first minimum: the lowest pair id
            self.arg_EE = table_EL.gather(1, at_EE)
        else:  # skewed loads: scatter from the N pairs, no padding
            pair_N = torch.arange(self.N, device=self.idx_N.device)
            cost_NE = self._costs(pair_N.unsqueeze(1), self.idx_N).squeeze(1)
            row_NE = self.idx_N.unsqueeze(1).expand(-1, self.E)
            self.R_EE = torch.full((self.E, self.E), math.inf, dtype=cost_NE.dtype, device=cost_NE.device)
            self.R_EE.scatter_reduce_(0, row_NE, cost_NE, "amin")
            pid_NE = torch.where(cost_NE == self.R_EE[self.idx_N], pair_N.unsqueeze(1), self.N)
            self.arg_EE = torch.full((self.E, self.E), self.N, dtype=torch.long, device=cost_NE.device)
            self.arg_EE.scatter_reduce_(0, row_NE, pid_NE, "amin")
        self.arg_EE.masked_fill_(torch.isinf(self.R_EE), self.N)

    def shift_prices(self, delta_E: torch.Tensor) -> None:
        """p -= delta: every entry R[i, j] grows by delta[i] - delta[j]; arg is unchanged."""
        self.p_E -= delta_E
        self.R_EE += delta_E.unsqueeze(1) - delta_E.unsqueeze(0)

    def move(self, pair: list[int], dst: list[int]) -> None:
        """Move pairs to new experts (each pair at most once) and update the graph.

        1. Entries whose argmin pair is no longer a legal move are recomputed over the
           pairs now on their row's expert: row src's entries that pointed at a moved
           pair and, for K > 1, entries (a, dst) whose pair's token now holds dst.
        2. The moved tokens' moves from every expert they now hold are merged in with a
           min (the only candidates that are new anywhere in the graph).
        """
        dev = self.idx_N.device
        pair_M = torch.tensor(pair, dtype=torch.long, device=dev)
        dst_M = torch.tensor(dst, dtype=torch.long, device=dev)
        src_M = self.idx_N[pair_M]
        self.idx_N[pair_M] = dst_M
        self.load_E.index_add_(0, src_M, torch.full_like(src_M, -1))
        self.load_E.index_add_(0, dst_M, torch.ones_like(dst_M))
        tok = [n // self.K for n in pair]
        tok_M = torch.tensor(tok, dtype=torch.long, device=dev)
        if self.member_TE is not None:
            self.member_TE[tok_M, src_M] = False
            self.member_TE[tok_M, dst_M] = True
        # 1.
        stale_EE = torch.zeros(self.E, self.E, dtype=torch.bool, device=dev)
        hit_M, col_M = (self.arg_EE[src_M] == pair_M.unsqueeze(1)).nonzero(as_tuple=True)
        stale_EE[src_M[hit_M], col_M] = True
        if self.member_TE is not None:
            held_MK = self.idx_N.view(-1, self.K)[tok_M]
            dst_MK = dst_M.unsqueeze(1).expand(-1, self.K)
            arg_MK = self.arg_EE[held_MK, dst_MK]
            hit_MK = (arg_MK < self.N) & (arg_MK // self.K == tok_M.unsqueeze(1))
            stale_EE[held_MK[hit_MK], dst_MK[hit_MK]] = True
        row_Q, col_Q = stale_EE.nonzero(as_tuple=True)
        if row_Q.numel():
            pair_QL = self._table()[row_Q]
            cost_QL = self._costs(pair_QL, row_Q, col_Q.unsqueeze(1)).squeeze(2)
            best_Q, at_Q = cost_QL.min(1)
            self.R_EE[row_Q, col_Q] = best_Q
            arg_Q = pair_QL.gather(1, at_Q.unsqueeze(1)).squeeze(1)
            self.arg_EE[row_Q, col_Q] = arg_Q.masked_fill_(torch.isinf(best_Q), self.N)
        # 2.
        tok_U = tok_M if self.K == 1 else torch.tensor(sorted(set(tok)), dtype=torch.long, device=dev)
        pair_UK = tok_U.unsqueeze(1) * self.K + torch.arange(self.K, device=dev)
        pair_P = pair_UK.reshape(-1)
        row_P = self.idx_N[pair_P]
        cost_PE = self._costs(pair_P.unsqueeze(1), row_P).squeeze(1)
        best_EE = self.R_EE.clone().scatter_reduce_(0, row_P.unsqueeze(1).expand(-1, self.E), cost_PE, "amin")
        better_EE = best_EE < self.R_EE
        hit_PE = (cost_PE == best_EE[row_P]) & better_EE[row_P]
        pid_PE = torch.where(hit_PE, pair_P.unsqueeze(1), self.N)
        new_arg_EE = torch.full_like(self.arg_EE, self.N).scatter_reduce_(
            0, row_P.unsqueeze(1).expand(-1, self.E), pid_PE, "amin")
        self.arg_EE = torch.where(better_EE, new_arg_EE, self.arg_EE)
        self.R_EE = best_EE


def shed(g: MoveGraph, e: int, excess: int) -> None:
    """Raise expert e's price just enough that ``excess`` of its pairs leave, exactly.

    A pair's margin is ``s - p`` on e minus its token's best expert not yet held; the
    ``excess`` smallest-margin pairs move to that expert and p[e] rises by the midpoint
    of the excess-th and (excess+1)-th margins. Every token still holds a top-k of
    ``s - p`` afterwards (movers sit at or below their new expert, stayers above it), so
    the assignment stays optimal for its loads; the excess lands on other experts.
    """
    pair_P = (g.idx_N == e).nonzero().squeeze(1)
    tok_P = pair_P // g.K
    v_PE = g.s_TE[tok_P] - g.p_E
    own_P = v_PE[:, e].clone()
    v_PE[:, e] = -math.inf
    if g.member_TE is not None:
        v_PE.masked_fill_(g.member_TE[tok_P], -math.inf)
    alt_P, to_P = v_PE.max(1)
    margin_P, order_P = torch.sort(own_P - alt_P, stable=True)
    raise_ = 0.5 * (margin_P[excess - 1] + margin_P[excess])
    delta_E = torch.zeros_like(g.p_E)
    delta_E[e] = -raise_
    g.shift_prices(delta_E)
    go_X = order_P[:excess]
    g.move(pair_P[go_X].tolist(), to_P[go_X].tolist())


def shortest_paths(R_EE: torch.Tensor, dist_E: torch.Tensor):
    """Bellman-Ford (Jacobi sweeps) on costs >= 0 from the roots: the nodes given dist 0.

    Returns ``(dist, parent)``, parent -1 at roots and unreachable nodes. Sweeps track
    only values and the sweep at which each distance last improved (its level); at the
    end each node's parent is, among the predecessors that attain its distance, one of
    lowest level: levels strictly fall along parent links, so zero-cost edges cannot
    close a cycle.
    """
    RT_EE = R_EE.t().contiguous()  # RT[j, i] = cost of i -> j: reductions run along rows
    root_E = dist_E == 0
    level_E = torch.zeros_like(dist_E, dtype=torch.long)
    for sweep in range(1, R_EE.shape[0] + 2):
        best_E = (RT_EE + dist_E).amin(1)
        better_E = best_E < dist_E
        if not bool(better_E.any()):
            break
        dist_E = torch.where(better_E, best_E, dist_E)
        level_E = torch.where(better_E, sweep, level_E)
    cand_EE = RT_EE + dist_E
    tight_EE = (cand_EE == dist_E.unsqueeze(1)) & torch.isfinite(cand_EE)
    key_EE = torch.where(tight_EE, level_E, R_EE.shape[0] + 2)
    parent_E = key_EE.argmin(1)
    return dist_E, parent_E.masked_fill_(root_E | torch.isinf(dist_E), -1)


def _tree_path(parent: list[int], node: int) -> list[int]:
    nodes = [node]
    while parent[nodes[-1]] >= 0:
        nodes.append(parent[nodes[-1]])
        if len(nodes) > len(parent):
            raise RuntimeError("balanced_assignment: shortest-path tree has a cycle")
    return nodes[::-1]


def repair_phase(g: MoveGraph, excess: list[int]) -> int:
    """One successive-shortest-path phase: prices and assignment of g change in place.

    Bellman-Ford from every overloaded expert on the reduced costs (>= 0); every price
    drops by its distance (capped at the largest finite one), which keeps all reduced
    costs >= 0 and makes the shortest-path tree's edges cost 0; then pairs move along
    tree paths to underloaded experts, paths sharing no edge and no token. Each path
    moves one unit of excess. Returns the number of pair moves made.
    """
    E, K = g.E, g.K
    over_E = torch.tensor([x > 0 for x in excess], device=g.R_EE.device)
    dist0_E = torch.where(over_E, 0.0, math.inf).to(g.R_EE.dtype)
    dist_E, parent_E = shortest_paths(g.R_EE.clamp(min=0.0), dist0_E)
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
