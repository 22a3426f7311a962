"""Routing formulas: top-k selection, balancing losses and the loss-free bias update.

Pure functions on tensors, no module state. Shape legend: T tokens, E experts, K top-k.
All router math runs in fp32 whatever the input dtype.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "topk_routing",
    "switch_aux_loss",
    "sequence_aux_loss",
    "router_z_loss",
    "loss_free_update",
    "scores_from_logits",
]

_SCORES = ("softmax", "sigmoid")


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_logits(logits_TE: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits_TE, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits_TE).__name__}")
    if logits_TE.dim() != 2:
        raise ValueError(f"{name} must have shape [T, E], got {tuple(logits_TE.shape)}")
    if not logits_TE.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {logits_TE.dtype}")
    if logits_TE.shape[1] == 0:
        raise ValueError(f"{name} must have at least one expert column, got shape {tuple(logits_TE.shape)}")


def scores_from_logits(logits_TE: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """Router scores in fp32: softmax over experts, or an independent sigmoid per expert."""
    if score == "softmax":
        return torch.softmax(logits_TE.float(), dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(logits_TE.float())
    raise ValueError(f"score must be one of {_SCORES}, got {score!r}")


def topk_routing(
    logits_TE: torch.Tensor,
    top_k: int,
    score: str = "softmax",
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
    num_groups: int = 1,
    top_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token.

    Args:
        logits_TE: router logits ``[T, E]``, any float dtype (math runs in fp32).
        top_k: experts per token, ``1 <= top_k <= E``.
        score: ``"softmax"`` or ``"sigmoid"``.
        bias: optional ``[E]`` expert bias added to the scores to *choose* experts only
            (loss-free balancing); it never enters the returned weights.
        renormalize: divide the chosen weights by their sum. Finite logits always give
            finite weights: where the chosen scores underflow fp32 (sigmoid of logits below
            about -87, or softmax entries that only a bias could choose), the row is
            computed in log space instead, as a softmax over the chosen log-scores (an
            exact identity); every other row is the plain quotient, bit for bit.
        num_groups, top_groups: group-limited routing (DeepSeek-V3's ``n_group`` /
            ``topk_group``): the E experts form ``num_groups`` equal groups of consecutive
            experts; a group's score is the sum of its two highest (biased) selection
            scores (its highest when a group has one expert); only the ``top_groups`` best
            groups (ties: the lower group) stay eligible, the others' experts are masked
            with -inf. ``top_groups=None`` keeps every group.

    Returns:
        ``(weights_TK fp32, indices_TK int64)``. Experts are ordered by biased score,
        descending; equal scores break toward the lower expert index. A token whose logits
        are not all finite (NaN or +-inf) is still routed to K distinct valid experts (NaN
        ranks below every number, so a row of NaNs goes to experts ``0..K-1``), and all
        its weights are NaN, so the loss shows it.
    """
    _check_logits(logits_TE)
    num_experts = logits_TE.shape[-1]
    _check_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
    _check_groups(num_experts, top_k, num_groups, top_groups)
    scores_TE = scores_from_logits(logits_TE, score)
    select_TE = scores_TE
    if bias is not None:
        if bias.shape != (num_experts,):
            raise ValueError(f"bias must have shape [{num_experts}], got {tuple(bias.shape)}")
        select_TE = scores_TE + bias.float()
    # NaN -> -inf so it sorts last; ties break toward the lower index
    select_TE = torch.nan_to_num(select_TE.detach(), nan=float("-inf"))
    if top_groups is not None and top_groups < num_groups:
        select_TE = _mask_groups(select_TE, num_groups, top_groups)
    indices_TK = _topk_indices(select_TE, top_k)
    # without a bias, softmax always chooses its largest score (>= 1/E), so no row can underflow
    can_underflow = score == "sigmoid" or bias is not None
    return _chosen_weights(scores_TE, logits_TE, indices_TK, score, renormalize, can_underflow), indices_TK


def _check_groups(num_experts: int, top_k: int, num_groups, top_groups) -> None:
    _check_int("num_groups", num_groups)
    if num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide num_experts ({num_experts})")
    if top_groups is None:
        return
    _check_int("top_groups", top_groups)
    if top_groups > num_groups:
        raise ValueError(f"top_groups must be <= num_groups ({num_groups}), got {top_groups}")
    if top_k > top_groups * (num_experts // num_groups):
        raise ValueError(
            f"top_k ({top_k}) must be <= top_groups * experts per group = {top_groups * (num_experts // num_groups)}"
        )


def _mask_groups(select_TE: torch.Tensor, num_groups: int, top_groups: int) -> torch.Tensor:
    """``select`` with every expert outside each token's ``top_groups`` best groups at -inf."""
    T, E = select_TE.shape
    select_TGN = select_TE.view(T, num_groups, E // num_groups)
    best = min(2, E // num_groups)
    group_TG = select_TGN.topk(best, dim=-1).values.sum(dim=-1)
    # stable descending sort: equal group scores keep the lower group
    keep_TG = torch.sort(group_TG, dim=-1, descending=True, stable=True).indices[:, :top_groups]
    allowed_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=select_TE.device).scatter_(1, keep_TG, True)
    return select_TGN.masked_fill(~allowed_TG.unsqueeze(-1), float("-inf")).view(T, E)


_TINY = torch.finfo(torch.float32).tiny  # the smallest normal fp32


def _chosen_weights(
    scores_TE, logits_TE, indices_TK, score: str, renormalize: bool, can_underflow: bool = True
) -> torch.Tensor:
    """The chosen scores ``[T, K]``, renormalised when asked, NaN in rows with a non-finite logit.

    Renormalising is the plain quotient ``w / sum(w)``, except in rows whose sum is below
    fp32's normal range (0/0, or digits lost to subnormals): there it is a softmax over the
    chosen log-scores in float64, the logits themselves for softmax scores (the row's
    normaliser cancels) and their ``logsigmoid`` for sigmoid scores, equal to the quotient
    in exact arithmetic. The quotient's denominator is made safe in the rows it does not
    serve, so no NaN gradient leaks through the ``where``.

    On CPU a host read or two say whether any row needs either fix (free there, and the
    common batch needs none; ``can_underflow=False`` skips the second); on other devices
    and under torch.compile both always run and ``where`` picks (no host sync, no
    data-dependent branch).
    """
    weights_TK = scores_TE.gather(1, indices_TK)
    sum_T1 = weights_TK.sum(dim=-1, keepdim=True) if renormalize else None
    if logits_TE.device.type == "cpu" and not torch.compiler.is_compiling():
        # the logits' total is finite unless one is NaN or inf (or finite ones overflow 3e38)
        if math.isfinite(logits_TE.detach().sum().item()):
            if not renormalize:
                return weights_TK
            if not can_underflow or sum_T1.shape[0] == 0 or sum_T1.amin().item() >= _TINY:  # False for NaN
                return weights_TK / sum_T1
    if renormalize:
        normal_T1 = sum_T1 >= _TINY
        log_TK = logits_TE.gather(1, indices_TK).double()
        if score == "sigmoid":
            log_TK = torch.nn.functional.logsigmoid(log_TK)
        stable_TK = torch.softmax(log_TK, dim=-1).to(weights_TK.dtype)
        weights_TK = torch.where(normal_T1, weights_TK / torch.where(normal_T1, sum_T1, 1.0), stable_TK)
    finite_T1 = (logits_TE.detach() * 0).sum(dim=-1, keepdim=True) == 0  # NaN * 0 and inf * 0 are NaN
    return torch.where(finite_T1, weights_TK, math.nan)


def _topk_indices(select_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """The first ``top_k`` columns of a stable descending sort of each row (ties -> lower index).

    On CPU, ``torch.topk`` of the top K+1 is ~2.5x faster than the sort but promises nothing
    about ties; where its K+1 values are strictly decreasing the top K and their order are
    unique, so it equals the sort, and only rows with a tie among them are sorted (reading
    that on the host is free on CPU). On other devices and under torch.compile the sort runs
    as is (no host sync, no data-dependent branch).
    """
    stable_sort = lambda t: torch.sort(t, dim=-1, descending=True, stable=True).indices[:, :top_k]  # noqa: E731
    if select_TE.device.type != "cpu" or select_TE.shape[0] == 0 or torch.compiler.is_compiling():
        return stable_sort(select_TE)
    values, indices = torch.topk(select_TE, min(top_k + 1, select_TE.shape[-1]), dim=-1, sorted=True)
    tied_T = (values[:, 1:] == values[:, :-1]).any(dim=-1)
    indices_TK = indices[:, :top_k]
    if bool(tied_T.any()):
        rows = tied_T.nonzero().squeeze(1)
        indices_TK = indices_TK.clone()
        indices_TK[rows] = stable_sort(select_TE[rows])
    return indices_TK


def _expert_fraction(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """f_E: fraction of the routed (token, slot) pairs that went to each expert; a -1 slot
    (no expert: dynamic k) is not a pair (all T*K when there is none)."""
    flat = indices_TK.reshape(-1)
    valid_N = (flat >= 0).float()
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=flat.device)
    counts_E.scatter_add_(0, flat.clamp(min=0), valid_N)
    return counts_E / valid_N.sum().clamp(min=1)


def switch_aux_loss(
    probs_TE: torch.Tensor, indices_TK: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard balance loss ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of the T*K routed pairs sent to expert i (all K choices count;
    a -1 slot, no expert, is no pair: f is over the routed pairs with dynamic k),
    ``P_i`` the mean router probability of expert i over the T tokens. Perfectly balanced
    routing with rows of ``probs`` summing to 1 gives exactly 1.0; all tokens collapsed
    onto the same K experts gives E/K. Only ``P`` carries gradient. Zero tokens give 0.
    ``mask`` (bool [T], True = the token counts): f and P over the kept tokens only (a
    masked token's index may be -1); no kept token gives 0.
    """
    _check_int("num_experts", num_experts)
    if probs_TE.dim() != 2 or probs_TE.shape[-1] != num_experts:
        raise ValueError(f"probs must have shape [T, {num_experts}], got {tuple(probs_TE.shape)}")
    if indices_TK.dim() != 2 or indices_TK.shape[0] != probs_TE.shape[0]:
        raise ValueError(
            f"indices must have shape [T={probs_TE.shape[0]}, K], got {tuple(indices_TK.shape)}"
        )
    if mask is not None:
        _check_mask(mask, probs_TE.shape[0])
        return num_experts * _masked_fractions(probs_TE, indices_TK, num_experts, mask[None]).sum()
    f_E = _expert_fraction(indices_TK, num_experts)
    P_E = _mean0(probs_TE.float())
    return num_experts * torch.dot(f_E, P_E)


def _check_mask(mask: torch.Tensor, num_tokens: int) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (num_tokens,):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape [T={num_tokens}], got {got}")


def _masked_fractions(probs_TE, indices_TK, num_experts: int, mask_BS: torch.Tensor) -> torch.Tensor:
    """[B, E] ``f * P`` per sequence over its kept tokens, divided by the number of
    sequences with a kept token (so that summing over B and E averages those sequences)."""
    B, S = mask_BS.shape
    K = indices_TK.shape[-1]
    keep_BS = mask_BS.float()
    pair_BN = (keep_BS[:, :, None] * (indices_TK >= 0).view(B, S, K).float()).view(B, S * K)
    counts_BE = torch.zeros(B, num_experts, dtype=torch.float32, device=probs_TE.device)
    counts_BE.scatter_add_(1, indices_TK.clamp(min=0).view(B, S * K), pair_BN)
    kept_B1 = keep_BS.sum(dim=1, keepdim=True)
    f_BE = counts_BE / pair_BN.sum(dim=1, keepdim=True).clamp(min=1)  # = kept * K without -1 slots
    probs_BSE = torch.where(mask_BS[:, :, None], probs_TE.float().view(B, S, num_experts), 0.0)
    P_BE = probs_BSE.sum(dim=1) / kept_B1.clamp(min=1)
    return f_BE * P_BE / (kept_B1 > 0).sum().clamp(min=1)


def _mean0(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0, and 0 (not NaN) over zero rows, with a zero gradient."""
    return x.mean(dim=0) if x.shape[0] else x.sum(dim=0)


def sequence_aux_loss(
    probs_TE: torch.Tensor, indices_TK: torch.Tensor, num_experts: int, seq_len: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 per-sequence balance loss: the Switch loss of each sequence, averaged.

    Rows are laid out as a flattened ``[B, S]``: sequence b owns rows ``b*S .. b*S+S-1``.
    For a single sequence it equals :func:`switch_aux_loss`. Zero tokens give 0.
    ``mask`` (bool [T], True = the token counts): each sequence's f and P over its kept
    tokens, averaged over the sequences that have one.
    """
    _check_int("num_experts", num_experts)
    _check_int("seq_len", seq_len)
    T = probs_TE.shape[0]
    if T % seq_len != 0:
        raise ValueError(f"number of rows ({T}) must be a multiple of seq_len ({seq_len})")
    if probs_TE.dim() != 2 or probs_TE.shape[-1] != num_experts:
        raise ValueError(f"probs must have shape [T, {num_experts}], got {tuple(probs_TE.shape)}")
    B, K = T // seq_len, indices_TK.shape[-1]
    if mask is not None:
        _check_mask(mask, T)
        return num_experts * _masked_fractions(probs_TE, indices_TK, num_experts, mask.view(B, seq_len)).sum()
    idx_BN = indices_TK.reshape(B, seq_len * K)
    counts_BE = torch.zeros(B, num_experts, dtype=torch.float32, device=probs_TE.device)
    counts_BE.scatter_add_(1, idx_BN, torch.ones_like(idx_BN, dtype=torch.float32))
    f_BE = counts_BE / (seq_len * K)
    P_BE = probs_TE.float().reshape(B, seq_len, num_experts).mean(dim=1)
    return num_experts * _mean0((f_BE * P_BE).sum(dim=-1))


def router_z_loss(logits_TE: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: ``mean_t logsumexp(logits_t)^2`` (fp32, finite for large logits;
    0 for zero tokens). ``mask`` (bool [T]): the mean over the kept tokens only."""
    _check_logits(logits_TE)
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    if mask is None:
        return _mean0(z_T)
    _check_mask(mask, logits_TE.shape[0])
    return torch.where(mask, z_T, 0.0).sum() / mask.sum().clamp(min=1)


def loss_free_update(
    bias_E: torch.Tensor,
    load_E: torch.Tensor,
    rate: float,
    rule: str = "sign",
    center: bool = False,
    target_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss-free balancing step on the bias; returns a new tensor in ``bias``'s dtype.

    - ``rule="sign"`` (Wang et al. 2024): ``b + rate * sign(mean(load) - load)``. The sign is
      decided in exact integer arithmetic when ``load`` holds integers
      (``sign(sum(load) - E*load_i)``), so counts near 4e4 that differ by one are ordered right.
    - ``rule="proportional"`` (LongCat-Flash): ``b + rate * (mean(load) - load) / sum(load)``,
      a step that shrinks as the loads even out (0 when nothing was counted).
    - ``center=True`` (torchtitan): the step's mean is subtracted, so the bias mean stays
      put; top-k selection is unchanged by a common shift, so routing is the same.
    - ``target_E``: the load each expert should get (float [E], summing to ``sum(load)``)
      instead of the mean, e.g. to aim at an expected number of real experts per token
      when some experts are null experts.
    """
    if bias_E.shape != load_E.shape or bias_E.dim() != 1:
        raise ValueError(
            f"bias and load must both have shape [E], got {tuple(bias_E.shape)} and {tuple(load_E.shape)}"
        )
    if rule not in ("sign", "proportional"):
        raise ValueError(f"rule must be 'sign' or 'proportional', got {rule!r}")
    if target_E is not None and target_E.shape != load_E.shape:
        raise ValueError(f"target must have shape {tuple(load_E.shape)}, got {tuple(target_E.shape)}")
    E = load_E.shape[0]
    if target_E is not None:
        err_E = target_E.double() - load_E.double()
    elif load_E.is_floating_point() or rule == "proportional":
        err_E = (load_E.double().sum() - E * load_E.double()) / E
    else:
        err_E = load_E.long().sum() - E * load_E.long()
    if rule == "sign":
        step_E = torch.sign(err_E).double() * rate
    else:
        step_E = rate * err_E.double() / load_E.double().sum().clamp(min=1)
    if center:
        step_E = step_E - step_E.mean()
    return bias_E + step_E.to(bias_E.dtype)
