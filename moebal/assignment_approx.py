"""Approximate balanced assignment: quantile dual prices and Sinkhorn (S-BASE).

Shape legend: T tokens, E experts, K top-k, C = T*K/E tokens per expert.

Both solvers route each token to the top-k of ``score - price_E`` or of a Sinkhorn plan;
neither guarantees exact balance (use ``balanced_assignment`` for that). The quantile
price step here is also the warm start of the exact solver.

Non-finite scores, in every solver: a token whose scores are not all finite (NaN or
+-inf) is routed to experts ``0..K-1`` (as ``topk_routing`` routes a row of NaNs) and left
out of the balance; the other tokens are solved as if it were not there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "quantile_assignment", "sinkhorn_assignment", "quantile_prices", "check_scores", "topk_indices",
    "route_nonfinite_rows", "add_tie_breaker", "CheckedScores",
]


@dataclass(frozen=True)
class CheckedScores:
    """What :func:`check_scores` found."""

    num_tokens: int  # T_f: the tokens to balance, those whose scores are all finite
    capacity: int  # C = T_f * K / E, tokens per expert
    absmax: float  # max |score| over those tokens (0 when there are none)
    finite_T: torch.Tensor | None  # bool [T]: which rows are finite; None when all are


def check_scores(scores_TE, top_k) -> CheckedScores:
    """Validate ``scores [T, E]`` and ``top_k``, and find the rows to balance.

    TypeError for a non-tensor, non-float scores or a non-int top_k; ValueError for a
    wrong rank, no expert column, or top_k outside [1, E]. A row holding NaN or +-inf is
    left out of the balance (the solvers route it to experts 0..K-1); the T_f other rows
    are balanced, so ``T_f * top_k`` must be a multiple of E (ValueError otherwise). This
    syncs with the device once, twice when some row is not finite.
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
    scores_TE = scores_TE.detach()
    absmax = float(scores_TE.abs().amax()) if T else 0.0  # NaN propagates
    finite_T = None
    T_f = T
    if not math.isfinite(absmax):
        finite_T = torch.isfinite(scores_TE).all(dim=1)
        T_f = int(finite_T.sum())
        absmax = float(scores_TE[finite_T].abs().amax()) if T_f else 0.0
    if (T_f * top_k) % E:
        step = E // math.gcd(top_k, E)
        if finite_T is None:
            raise ValueError(
                f"T*top_k = {T}*{top_k} = {T * top_k} is not a multiple of num_experts={E}, so "
                f"experts cannot be exactly balanced: pad the batch to a multiple of {step} tokens"
            )
        raise ValueError(
            f"{T - T_f} of the T={T} tokens have NaN or Inf scores and are left out of the balance; "
            f"the other {T_f} give {T_f}*{top_k} = {T_f * top_k} slots, not a multiple of "
            f"num_experts={E}, so they cannot be exactly balanced (a multiple of {step} finite tokens can)"
        )
    return CheckedScores(T_f, T_f * top_k // E, absmax, finite_T)


def route_nonfinite_rows(solve, scores_TE: torch.Tensor, top_k: int, finite_T: torch.Tensor):
    """Run ``solve`` (scores -> indices, or a tuple led by indices and a plan) on the
    finite rows; every other row gets experts ``0..K-1`` (and NaN in a returned plan)."""
    T, E = scores_TE.shape
    rows = finite_T.nonzero().squeeze(1)
    out = solve(scores_TE[rows])
    idx_fK = out[0] if isinstance(out, tuple) else out
    indices_TK = torch.arange(top_k, device=scores_TE.device).expand(T, top_k).clone()
    indices_TK[rows] = idx_fK
    if not isinstance(out, tuple):
        return indices_TK
    plan_TE = torch.full((T, E), math.nan, dtype=out[1].dtype, device=out[1].device)
    plan_TE[rows] = out[1]
    return (indices_TK, plan_TE, *out[2:])


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
    Loads are close to, but not exactly, ``T*K/E``. Non-finite rows: see the module
    docstring.
    """
    checked = check_scores(scores_TE, top_k)
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 0:
        raise ValueError(f"num_rounds must be an int >= 0, got {num_rounds!r}")
    if checked.finite_T is not None:
        solve = lambda s: quantile_assignment(s, top_k, num_rounds)  # noqa: E731
        return route_nonfinite_rows(solve, scores_TE, top_k, checked.finite_T)
    s_TE = scores_TE.detach().to(torch.float64)
    p_E = quantile_prices(s_TE.t().contiguous(), top_k, num_rounds)
    return topk_indices(s_TE - p_E, top_k)


def add_tie_breaker(s_TE: torch.Tensor, eps: float) -> None:
    """``s += eps * f`` in place, f a deterministic pseudo-random ``[T, E]`` in [0, 1): a
    splitmix64-style hash of the entry's index (int64 arithmetic wraps), so no sum
    f(t) + g(e) can cancel it. Two int64 buffers, reused (fresh pages are slow)."""
    z = torch.arange(s_TE.numel(), dtype=torch.int64, device=s_TE.device).view_as(s_TE)
    tmp = torch.empty_like(z)
    for shift, mult in ((30, -4658895280553007687), (27, -7723592293110705685), (31, 1)):
        torch.bitwise_right_shift(z, shift, out=tmp)  # 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
        z.bitwise_xor_(tmp)
        if mult != 1:
            z.mul_(mult)
    z.bitwise_and_((1 << 53) - 1)
    s_TE.add_(z, alpha=eps * 2.0**-53)


_COOLING = 0.5  # the temperature's factor per iteration
# ties are broken by a perturbation of 2^-24 * max|s|; the temperature stops at 1/16 of it,
# where float64 still resolves the plan's rows to ~1e-7 (2^-52 / 2^-28 per entry)
_TIE_BREAK = 2.0**-24
_NEWTON_STEPS = 2  # per fit of the token or the expert prices
_NEWTON_MAX_STEP = 4.0  # temperatures: a safeguard where the sigmoids are flat


def _fit_prices(s_TE, other, target: float, price, tau: float, dim: int, steps: int, v_TE, x_TE):
    """Newton steps on ``price`` (one per row for dim=1, per column for dim=0) toward
    ``sum over dim of sigmoid((s - other - price) / tau) = target``; ``v_TE``, ``x_TE``
    are scratch of s's shape.

    The mass falls with the price at slope ``sum x(1-x) / tau``; a step moves at most
    ``_NEWTON_MAX_STEP`` temperatures, so a flat start cannot throw the price away.
    """
    torch.sub(s_TE, other, out=v_TE).div_(tau)
    for _ in range(steps):
        torch.sub(v_TE, price / tau, out=x_TE).sigmoid_()
        mass = x_TE.sum(dim, keepdim=True)
        slope = mass - x_TE.square_().sum(dim, keepdim=True)  # sum x (1 - x)
        step = ((mass - target) / slope.clamp(min=1e-300)).clamp_(-_NEWTON_MAX_STEP, _NEWTON_MAX_STEP)
        price = price + tau * step
    return price


def _topk_loads(v_TE, top_k: int, work_TE, mask_TE) -> torch.Tensor:
    """int64 ``[E]``: how many rows hold each column among their ``top_k`` largest values
    (a row's ties at its k-th value all count; exact for tie-free rows)."""
    kth_T = _kth_largest_values(v_TE.t(), top_k, work_TE.t(), mask_TE.t())[-1]
    return torch.ge(v_TE, kth_T.unsqueeze(1), out=mask_TE).sum(0)


def _fit_rows_exactly(v_TE, top_k: int, b_T1, tau: float, rtol: float = 1e-6, max_steps: int = 200):
    """Token prices with ``sum_e sigmoid((v - b) / tau) = K`` to ``rtol * K`` in every row:
    Newton steps kept inside a bracket that bisection shrinks (cold plans are step-like)."""
    lo_T1 = v_TE.amin(1, keepdim=True) - 50 * tau  # mass ~ E > K
    hi_T1 = v_TE.amax(1, keepdim=True) + 50 * tau  # mass ~ 0 < K
    b_T1 = torch.minimum(torch.maximum(b_T1, lo_T1), hi_T1)
    for _ in range(max_steps):
        x_TE = torch.sigmoid((v_TE - b_T1) / tau)
        mass = x_TE.sum(1, keepdim=True)
        if float((mass - top_k).abs().max()) <= rtol * top_k:
            break
        lo_T1 = torch.where(mass > top_k, b_T1, lo_T1)
        hi_T1 = torch.where(mass < top_k, b_T1, hi_T1)
        newton = b_T1 + tau * (mass - top_k) / (x_TE - x_TE * x_TE).sum(1, keepdim=True).clamp(min=1e-300)
        b_T1 = torch.where((newton > lo_T1) & (newton < hi_T1), newton, 0.5 * (lo_T1 + hi_T1))
    return x_TE


@torch.no_grad()
def sinkhorn_assignment(
    scores_TE: torch.Tensor,
    top_k: int = 1,
    num_iters: int = 50,
    tol: float = 0.01,
    temperature: float | None = None,
    return_plan: bool = False,
):
    """S-BASE: an entropic transport plan of tokens to experts, then each token's top-k.

    The plan ``P [T, E]`` relaxes the balanced-assignment LP (rows sum to K, columns to
    C = T*K/E, ``0 <= P <= 1``) with a Fermi-Dirac entropy at temperature tau, whose
    solution is ``P = sigmoid((s - a_E - b_T) / tau)``: a price ``a_e`` per expert and
    ``b_t`` per token. As in Sinkhorn's alternating scalings, each iteration fits the
    expert prices (every column sums to C), then the token prices (every row to K), each
    by two safeguarded Newton steps, in float64; then tau halves (epsilon scaling: a warm
    plan moves the prices far, a cold one settles the close calls). Each token takes its
    top-k of ``s - a``, the K largest entries of its row of P. The bound ``P <= 1`` is
    what makes that work for K > 1: Sinkhorn on ``exp(s / tau)`` has no such bound, one
    cell could take most of a row's K, and the top-k of the rest ignored the balance
    (it balanced worse than plain top-k).

    tau starts at ``temperature`` (default: the standard deviation of the scores) and
    stops cooling at the tie-breaking scale below (finer would resolve rounding). The
    result is the selection with the smallest maximum load among plain top-k (prices 0)
    and every iteration's, so it is never less balanced than plain top-k; iterating stops
    once no expert exceeds C by more than ``tol * C`` (MaxVio <= tol), or after
    ``num_iters``. Ties are broken by the fixed hash perturbation of
    :func:`moebal.assignment.balanced_assignment`, here ``2^-24 * max|s|`` (fp32's
    resolution at the largest score), so constant scores are spread over the experts
    instead of all going to experts 0..K-1.

    Balance is approximate (use ``balanced_assignment`` for exact). Returns
    ``indices_TK`` (int64, per token by descending ``s - a``, ties toward the lower
    index), or ``(indices_TK, plan_TE, iters)`` with ``return_plan=True``: the plan at the
    returned selection's prices, rows fitted to within 1e-6 of K, and the iterations run.
    Non-finite rows: see the module docstring (their plan rows are NaN).
    """
    checked = check_scores(scores_TE, top_k)
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if checked.finite_T is not None:
        solve = lambda s: sinkhorn_assignment(s, top_k, num_iters, tol, temperature, return_plan)  # noqa: E731
        return route_nonfinite_rows(solve, scores_TE, top_k, checked.finite_T)
    T, E = scores_TE.shape
    K, C, scale = top_k, checked.capacity, checked.absmax
    s_TE = scores_TE.detach().to(torch.float64)
    if T == 0 or K == E:  # nothing to route, or every token takes every expert
        indices_TK = topk_indices(s_TE, K)
        return (indices_TK, torch.ones_like(s_TE), 0) if return_plan else indices_TK
    s_TE = s_TE.clone() if s_TE.data_ptr() == scores_TE.data_ptr() else s_TE
    eps = (scale if scale > 0 else 1.0) * _TIE_BREAK
    add_tie_breaker(s_TE, eps)
    tau = float(s_TE.std()) if temperature is None else temperature
    coldest = min(tau, eps / 16)
    v_TE, x_TE = torch.empty_like(s_TE), torch.empty_like(s_TE)
    mask_TE = torch.empty(s_TE.shape, dtype=torch.bool, device=s_TE.device)
    a_1E = torch.zeros(1, E, dtype=torch.float64, device=s_TE.device)
    best = (int(_topk_loads(s_TE, K, x_TE, mask_TE).max()), a_1E, None, tau)  # plain top-k
    # start near the warm solution: at a high temperature P ~ K/E where s is the row's mean
    b_T1 = s_TE.mean(1, keepdim=True) + tau * math.log((E - K) / K)
    b_T1 = _fit_prices(s_TE, 0.0, K, b_T1, tau, 1, 2 * _NEWTON_STEPS, v_TE, x_TE)
    iters = 0
    while best[0] > C + tol * C and iters < num_iters:
        iters += 1
        a_1E = _fit_prices(s_TE, b_T1, C, a_1E, tau, 0, _NEWTON_STEPS, v_TE, x_TE)
        b_T1 = _fit_prices(s_TE, a_1E, K, b_T1, tau, 1, _NEWTON_STEPS, v_TE, x_TE)
        most = int(_topk_loads(torch.sub(s_TE, a_1E, out=v_TE), K, x_TE, mask_TE).max())
        if most < best[0]:
            best = (most, a_1E, b_T1, tau)
        tau = max(tau * _COOLING, coldest)
    _, a_1E, b_T1, tau = best
    indices_TK = topk_indices(s_TE - a_1E, K)
    if not return_plan:
        return indices_TK
    v_TE = s_TE - a_1E
    b_T1 = v_TE.mean(1, keepdim=True) if b_T1 is None else b_T1
    return indices_TK, _fit_rows_exactly(v_TE, K, b_T1, tau), iters
