"""The router's lean inference path: plain top-k in about ten ops.

Shape legend: T tokens, D model dim, E choices (experts plus null experts), K top-k.

A decode step routes a handful of tokens, so the router's time is its op count, not its
FLOPs. ``Router.forward`` spends about thirty small ops on what a batch of finite logits
does not need: per-token finite checks, NaN handling, a second softmax, the tie repair
and the host reads that decide whether a row needs the log-space weights of
``moebal.routing._chosen_weights``. ``lean_route`` gives the same routing bit for bit
where that is provable cheaply: eval mode, no gradient, eager CPU, no autocast, plain
top-k (no selecting policy, no record/replay hook, no group limit), and a batch whose
logits are finite and whose top K+1 scores hold no tie. Anywhere else, and for a batch
that needs a repair (a tie at the top-k boundary, a sigmoid sum below fp32's normal
range), it returns None and the general path runs.

In fp32 the gate weight is used as it is; a bf16 (or other) gate is cast to fp32 once and
the copy kept until the weight changes (its version counter or storage moves), where the
general path casts it every forward.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moebal import routing as R
from moebal.policies import RouteContext

__all__ = ["lean_route", "LeanRouting"]


def _gate_fp32(router) -> torch.Tensor:
    """The gate weight in fp32: the weight itself, or a cached cast of it."""
    w = router.gate.weight
    if w.dtype == torch.float32:
        return w
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    cached = router.__dict__.get("_lean_gate")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, w.detach().float())
        router.__dict__["_lean_gate"] = cached
    return cached[1]


def _applies(router, x_TD: torch.Tensor) -> bool:
    """Whether the lean path may run: where it computes what ``Router.forward`` does."""
    if router.training or x_TD.shape[0] == 0 or x_TD.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if router.selector is not None or router._route_hook is not None or torch.is_autocast_enabled("cpu"):
        return False
    if router.top_groups is not None and router.top_groups < router.num_groups:
        return False
    return not (torch.is_grad_enabled() and (x_TD.requires_grad or router.gate.weight.requires_grad))


class LeanRouting(NamedTuple):
    """The fields of ``moebal.Routing`` that a lean routing sets (the rest keep their defaults)."""

    indices: torch.Tensor  # int64 [T, K]; -1 = a masked token
    weights: torch.Tensor  # fp32 [T, K]
    scores: torch.Tensor  # fp32 [T, E]
    aux_loss: torch.Tensor  # fp32 scalar
    nonfinite_tokens: torch.Tensor  # int64 scalar, 0


def lean_route(router, x_TD, token_mask=None, token_ids=None, token_groups=None, seq_len=None,
               causal=False) -> LeanRouting | None:
    """``router``'s routing of ``x [T, D]`` by plain top-k, or None where the general path must run.

    Takes what ``Router.forward`` takes, already checked, and returns the fields of its
    ``Routing``. The same ops as the general path on the values it keeps (``F.linear`` of
    the fp32 input and gate, ``softmax``/``sigmoid``, ``topk`` of K+1, ``gather``, the
    quotient), so the result is bit-identical to it.
    """
    if not _applies(router, x_TD):
        return None
    logits_TE = F.linear(x_TD.float(), _gate_fp32(router))
    if not math.isfinite(logits_TE.sum().item()):  # a NaN or inf logit: the general path marks its rows
        return None
    scores_TE = R.scores_from_logits(logits_TE, router.score)  # finite logits give finite scores
    K = router.top_k
    values_TK1, top_TK1 = torch.topk(scores_TE, min(K + 1, scores_TE.shape[-1]), dim=-1, sorted=True)
    if bool((values_TK1[:, 1:] == values_TK1[:, :-1]).any()):  # a tie: the general path breaks it by index
        return None
    indices_TK = top_TK1[:, :K]
    weights_TK = scores_TE.gather(1, indices_TK)
    if router.renormalize:
        sum_T1 = weights_TK.sum(dim=-1, keepdim=True)
        if router.score == "sigmoid" and sum_T1.amin().item() < R._TINY:  # the log-space rows: general path
            return None
        weights_TK = weights_TK / sum_T1
    if token_mask is not None:  # a masked token goes nowhere
        indices_TK = torch.where(token_mask[:, None], indices_TK, -1)
        weights_TK = torch.where(token_mask[:, None], weights_TK, 0.0)
    if router.scale != 1.0:
        weights_TK = weights_TK * router.scale
    aux = x_TD.new_zeros((), dtype=torch.float32)
    if router.policies:  # the loss terms see the context the general path gives them (none adds one at eval)
        finite_T = torch.ones(x_TD.shape[0], dtype=torch.bool)
        ctx = RouteContext(router, logits_TE, scores_TE, finite_T, token_mask, seq_len, token_ids, token_groups,
                           False, False, None, causal=bool(causal))
        ctx.indices_TK, ctx.weights_TK = indices_TK, weights_TK
        for policy in router.policies:
            term = policy.loss(ctx)
            if term is not None:
                aux = aux + term
    return LeanRouting(indices_TK, weights_TK, scores_TE, aux, torch.zeros((), dtype=torch.int64))
