"""Approximate balanced assignment: quantile dual prices and Sinkhorn (S-BASE).

Shape legend: T tokens, E experts, K top-k, C = T*K/E tokens per expert.

Both solvers route each token to the top-k of ``score - price_E`` or of a Sinkhorn plan;
neither guarantees exact balance (use ``balanced_assignment`` for that). The quantile
price step here is also the warm start of the exact solver.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "quantile_assignment", "sinkhorn_assignment", "quantile_prices", "check_scores", "topk_indices",
]


def check_scores(scores_TE, top_k) -> tuple[int, int, int, float]:
    """Validate ``scores [T, E]`` and ``top_k``; returns ``(T, E, C, max |score|)``, C = T*K/E.

    TypeError for a non-tensor, non-float scores or a non-int top_k; ValueError for a
    wrong rank, top_k outside [1, E], T*K not a multiple of E, or NaN/Inf scores (this
    check syncs with the device once).
    """
    if not isinstance(scores_TE, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores_TE).__name__}")
    if scores_TE.dim() != 2:
        raise ValueError(f"scores must have shape [T, E], got shape {tuple(scores_TE.shape)}")
    if not scores_TE.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores_TE.dtype}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {top_k!r} ({type(top_k).__name__})")
    T, E = scores_TE.shape
    if E < 1:
        raise ValueError(f"scores must have at least one expert column, got shape {tuple(scores_TE.shape)}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, num_experts={E}], got {top_k}")
    if (T * top_k) % E:
        step = E // math.gcd(top_k, E)
        raise ValueError(
            f"T*top_k = {T}*{top_k} = {T * top_k} is not a multiple of num_experts={E}, so "
            f"experts cannot be exactly balanced: pad the batch to a multiple of {step} tokens"
        )
    absmax = float(scores_TE.detach().abs().amax()) if T else 0.0  # NaN propagates
    if not math.isfinite(absmax):
        raise ValueError("scores contain NaN or Inf; balanced assignment needs finite scores")
    return T, E, T * top_k // E, absmax


_RANK_CAP = 32  # larger quantile ranks are read off a strided subsample (a big topk is slow)
_SUB_RANKS = 64


def _kth_largest_values(v_ET, count: int, work_ET, mask_ET) -> list[torch.Tensor]:
    """The ``count`` largest distinct values of each column of v_ET, as ``[T]`` tensors
    (``work_ET`` and the bool ``mask_ET`` are scratch of v's shape)."""
    vals = [v_ET.amax(0)]
    neg_inf = torch.tensor(-math.inf, dtype=v_ET.dtype, device=v_ET.device)
    for _ in range(count - 1):
        torch.lt(v_ET, vals[-1], out=mask_ET)
        torch.where(mask_ET, v_ET, neg_inf, out=work_ET)
        nxt = work_ET.amax(0)
        vals.append(torch.where(nxt == -math.inf, vals[-1], nxt))  # ties: repeat the value
    return vals


def _rank_midpoint(dist_ET: torch.Tensor, rank_E: torch.Tensor, rmax: int) -> torch.Tensor:
    """Per row, the midpoint of the rank-th and (rank+1)-th smallest entries (rank >= 0)."""
    small_ER = dist_ET.topk(rmax + 1, dim=1, largest=False, sorted=True).values
    lo_E1 = (rank_E - 1).clamp(min=0).unsqueeze(1)
    return 0.5 * (small_ER.gather(1, lo_E1) + small_ER.gather(1, lo_E1 + 1)).squeeze(1)


def quantile_prices(
    s_ET: torch.Tensor, top_k: int, num_rounds: int, price_E: torch.Tensor | None = None,
    damping: tuple[float, ...] = (1.0, 1.0, 0.8, 0.8, 0.7), stop_excess: int = 0,
) -> torch.Tensor:
    """Expert prices ``[E]`` from ``num_rounds`` Jacobi rounds of per-expert quantile updates.

    ``s_ET`` is the transposed score matrix ``[E, T]``. With prices p, a token's margin on
    expert e is how far ``s[t,e] - p[e]`` sits above the best score - price that would
    replace it: the (K+1)-th largest of the token's row if e is among its top-k, else
    the K-th largest. Expert e alone would get exactly C = T*K/E tokens if its price
    moved by ``q_e`` = the midpoint of the C-th and (C+1)-th largest margins in its row
    (zero when it has C already). Each round moves every price by ``w * q_e`` at once,
    w from ``damping`` (the last value repeats); rounds stop early once the loads'
    total excess over C is at most ``stop_excess``. One round from p = 0 is the closed form
    ``p_e = midpoint of the C-th and (C+1)-th largest of s[:, e] - (best other score)``
    (for K = 1). Ties count as members, so loads are approximate.
    """
    E, T = s_ET.shape
    K = top_k
    C = T * K // E
    p_E = torch.zeros(E, dtype=s_ET.dtype, device=s_ET.device) if price_E is None else price_E.clone()
    if E == 1 or K == E or T == 0:
        return p_E
    # scratch reused by every round: fresh [E, T] allocations cost more than the math
    v_ET = torch.empty_like(s_ET)
    dist_ET = torch.empty_like(s_ET)
    member_ET = torch.empty(s_ET.shape, dtype=torch.bool, device=s_ET.device)
    for r in range(num_rounds):
        torch.sub(s_ET, p_E.unsqueeze(1), out=v_ET)
        vals = _kth_largest_values(v_ET, K + 1, dist_ET, member_ET)
        kth_T, next_T = vals[K - 1], vals[K]
        torch.ge(v_ET, kth_T, out=member_ET)
        load_E = torch.count_nonzero(member_ET, dim=1)
        rank_E = (load_E - C).abs()
        rmax, excess = torch.stack([rank_E.max(), (load_E - C).clamp(min=0).sum()]).tolist()
        if excess <= stop_excess or rmax == 0:
            break
        # distance of each token to the boundary, on the side where expert e must move:
        # members v - next (>= 0), non-members kth - v (> 0)
        torch.sub(kth_T, v_ET, out=dist_ET)
        v_ET.sub_(next_T)
        torch.where(member_ET, v_ET, dist_ET, out=dist_ET)
        dist_ET.masked_fill_(member_ET.ne_((load_E > C).unsqueeze(1)), math.inf)
        rc = min(rmax, _RANK_CAP)
        mid_E = _rank_midpoint(dist_ET, rank_E.clamp(max=rc), rc)
        if rmax > rc:  # far from balance: estimate large ranks on a strided subsample
            stride = -(-rmax // _SUB_RANKS)
            sub_ET = dist_ET[:, ::stride]
            sub_rank_E = ((rank_E + stride // 2) // stride).clamp(1, sub_ET.shape[1] - 1)
            far_E = _rank_midpoint(sub_ET, sub_rank_E, int(sub_rank_E.max()))
            mid_E = torch.where(rank_E > rc, far_E, mid_E)
        shift_E = torch.where(load_E > C, mid_E, -mid_E).masked_fill_(rank_E == 0, 0.0)
        w = damping[min(r, len(damping) - 1)]
        p_E = p_E + w * torch.where(torch.isfinite(shift_E), shift_E, 0.0)
    return p_E


def topk_indices(v_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k expert indices per row ``[T, K]`` int64, descending, ties toward the lower index."""
    if top_k > 4:
        return torch.sort(v_TE, dim=1, descending=True, stable=True).indices[:, :top_k].contiguous()
    if top_k == 1:
        return v_TE.argmax(1, keepdim=True)  # the first maximal index: ties break low
    work_TE = v_TE.clone()
    cols = []
    for _ in range(top_k):
        col_T1 = work_TE.argmax(1, keepdim=True)
        cols.append(col_T1)
        work_TE.scatter_(1, col_T1, -math.inf)
    return torch.cat(cols, 1)


@torch.no_grad()
def quantile_assignment(scores_TE: torch.Tensor, top_k: int = 1, num_rounds: int = 3) -> torch.Tensor:
    """Top-k of ``score - price`` with per-batch quantile prices (approximate balance).

    Prices come from :func:`quantile_prices` (``num_rounds`` rounds from zero; one round
    is the closed form ``p_e`` = midpoint of the C-th and (C+1)-th largest of
    ``s[:, e]`` minus the token's best other expert). Returns ``indices_TK`` int64,
    ordered per token by descending ``score - price``, ties toward the lower index.
    Loads are close to, but not exactly, ``T*K/E``.
    """
    T, E, C, _ = check_scores(scores_TE, top_k)
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 0:
        raise ValueError(f"num_rounds must be an int >= 0, got {num_rounds!r}")
    s_TE = scores_TE.detach().to(torch.float64)
    p_E = quantile_prices(s_TE.t().contiguous(), top_k, num_rounds)
    return topk_indices(s_TE - p_E, top_k)


@torch.no_grad()
def sinkhorn_assignment(
    scores_TE: torch.Tensor,
    top_k: int = 1,
    num_iters: int = 50,
    tol: float = 1e-3,
    temperature: float | None = None,
    return_plan: bool = False,
):
    """S-BASE: Sinkhorn-balance ``exp(scores / tau)`` then take each token's top-k.

    The plan P [T, E] is scaled alternately to row sums K and column sums C = T*K/E
    (log domain, float64) until the largest column-sum error relative to C is <= ``tol``
    or ``num_iters`` column+row scalings have run, whichever comes first; the last
    scaling is on rows, so rows are exact and columns within the reported error.
    ``temperature`` defaults to the standard deviation of the scores (or 1 if they are
    constant). Rows of P can exceed 1 when K > 1; only the ranking is used.

    Balance of the returned indices is approximate: top-k of a balanced plan is close to
    balanced but not exact. Returns ``indices_TK`` (int64, per token by descending plan
    value, ties toward the lower index), or ``(indices_TK, plan_TE, iters)`` with
    ``return_plan=True``.
    """
    T, E, C, _ = check_scores(scores_TE, top_k)
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    s_TE = scores_TE.detach().to(torch.float64)
    if temperature is None:
        std = float(s_TE.std()) if s_TE.numel() > 1 else 0.0
        temperature = std if std > 0 else 1.0
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    K = top_k
    logp_TE = s_TE / temperature
    log_k, log_c = math.log(K), math.log(max(C, 1))
    logp_TE = logp_TE + (log_k - torch.logsumexp(logp_TE, dim=1, keepdim=True))
    iters = 0
    for iters in range(1, num_iters + 1):
        logp_TE = logp_TE + (log_c - torch.logsumexp(logp_TE, dim=0, keepdim=True))
        logp_TE = logp_TE + (log_k - torch.logsumexp(logp_TE, dim=1, keepdim=True))
        col_err = float((logp_TE.exp().sum(0) / max(C, 1) - 1).abs().max()) if T else 0.0
        if col_err <= tol:
            break
    indices_TK = topk_indices(logp_TE, K)
    if return_plan:
        return indices_TK, logp_TE.exp(), iters
    return indices_TK
