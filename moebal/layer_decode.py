"""The MoE layer's decode step: one function from ``x`` to ``y`` for inference on the CPU.

Shape legend: T tokens, D model dim, E experts, K top-k, N = T*K pairs, R xs rows.

A decode step sends a handful of tokens through every layer, so outside the experts a
layer's time is its count of ops and Python calls, not its FLOPs, and what each costs
depends on the caches far more than on T: between two forwards of one layer the rest of
the model streams its weights through them. ``MoE.forward`` calls ``decode_forward``
first; where it applies (eval, no gradient mode, eager CPU without autocast, the torch
backend, a plain top-k router without a selecting policy, null experts, group limit or
hooks, dropless, no token mask) it runs the layer as one function:

- the router's lean routing (``moebal.router_lean.lean_route``) called directly, without
  the router module's call, its argument checks or the ``Routing`` record;
- for up to ``HOST_PLAN_PAIRS`` pairs, the dropless plan from one host read of the
  indices (free on the CPU): the stable sort by expert, the counts and the inverse
  permutation in Python, six small tensors instead of a dozen ops; above that the lean
  tensor plan of ``moebal.plan``;
- dispatch as one ``index_select``, the experts module as always (its path rule and the
  decode layout included), combine as the same gather and fp32 ``bmm`` as
  ``moebal.dispatch``'s no-gradient path;
- ``aux_loss`` and ``last_stats`` set as the general path sets them.

Every field it builds equals the general construction's, so the output is the general
path's bit for bit (``tests/test_layer_decode.py`` checks it, and against a float64
loop). Anywhere it does not apply it returns None before computing anything, and where the
routing needs a repair (a non-finite logit, a tie) it returns None and the general path
runs.
"""
from __future__ import annotations

import array
import itertools
import math

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module

from moebal.backend import resolve_backend
from moebal.dispatch import _combine_fwd, _combine_small, _token_chunk
from moebal.plan import DispatchPlan, _lean_dropless_plan
from moebal.router import Router
from moebal import routing as R
from moebal.router_lean import _gate_fp32, lean_route
from moebal.stats import BalanceStats

__all__ = ["decode_forward", "HOST_PLAN_PAIRS"]

# pairs up to which the plan is built from a host read of the indices (Python's sort of a
# few dozen ints beats a dozen tensor ops; at a few hundred pairs the tensor ops win)
HOST_PLAN_PAIRS = 128

_ZERO = torch.zeros((), dtype=torch.int64)


def _hooked(*mods) -> bool:
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in mods)


def _eval_silent(policies) -> bool:
    """No policy selects, and each is one of moebal's, whose loss terms are all training-only."""
    return all(not p.selects and type(p).__module__.startswith("moebal.policies") for p in policies)


def _applies(moe, router, experts, x: torch.Tensor) -> bool:
    if moe.training or torch.is_grad_enabled() or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if moe.capacity_factor is not None or experts.path == "fused_gather" or torch.is_autocast_enabled("cpu"):
        return False
    if type(router).forward is not Router.forward or router.num_null_experts or router._route_hook is not None:
        return False
    if router.top_groups is not None and router.top_groups < router.num_groups:
        return False
    if not _eval_silent(router.policies) or _hooked(router, experts):
        return False
    return moe.backend == "torch" or resolve_backend(moe.backend, x.device) == "torch"


def host_plan(expert_N: list[int], T: int, K: int, E: int) -> DispatchPlan:
    """The dropless plan of the pairs' experts ``expert_N`` (T*K ints in [0, E), token-major).

    Field for field what ``moebal.plan.build_plan`` builds (rows sorted stably by expert,
    token order inside a group, nothing dropped or padding), from host lists: one tensor
    made and split into the fields (through ``torch.frombuffer`` of an ``array``: half the cost
    of ``torch.tensor`` of a list, warm and cold), the int32 group ends another; and the
    experts' host bounds, which the expert paths would otherwise read back from the tensors.
    """
    N = len(expert_N)
    order_N = sorted(range(N), key=expert_N.__getitem__)  # stable: token order per expert
    counts_E = [0] * E
    for e in expert_N:
        counts_E[e] += 1
    ends_E = list(itertools.accumulate(counts_E))
    row_of_pair_N = [0] * N
    for row, pair in enumerate(order_N):
        row_of_pair_N[pair] = row
    starts_E = [e - c for e, c in zip(ends_E, counts_E)]
    fields = array.array("q", counts_E)
    fields.extend(starts_E)
    fields.extend(row_of_pair_N)
    fields.extend(order_N)
    fields.extend([p // K for p in order_N])
    # the tensors keep their arrays alive
    counts, starts, row_of_pair, pair_of_row, token_of_row = torch.frombuffer(fields, dtype=torch.int64).split(
        [E, E, N, N, N])
    ends = torch.frombuffer(array.array("i", ends_E), dtype=torch.int32)
    return DispatchPlan(
        num_tokens=T, top_k=K, num_experts=E, capacity=None, counts_E=counts, kept_E=counts, starts_E=starts,
        group_ends_E=ends, row_of_pair_TK=row_of_pair.view(T, K), pair_of_row_R=pair_of_row,
        token_of_row_R=token_of_row, may_have_null_pairs=False,
        host_bounds=list(zip(starts_E, counts_E, ends_E)),
    )


def _route(router, x_TD: torch.Tensor):
    """``lean_route``'s routing with one host read: ``(indices [T, K], weights [T, K], experts of
    the pairs as a host list)``, or None where it would step aside (a non-finite logit, a tie
    in a token's top K+1, a sigmoid sum that needs the log-space weights)."""
    T, K = x_TD.shape[0], router.top_k
    logits_TE = F.linear(x_TD.float(), _gate_fp32(router))
    scores_TE = R.scores_from_logits(logits_TE, router.score)
    K1 = min(K + 1, scores_TE.shape[-1])
    values_TK1, top_TK1 = torch.topk(scores_TE, K1, dim=-1, sorted=True)
    # the logits' sum (finite iff every logit is, barring an overflow, which only steps aside), the
    # top K+1 scores and their experts (exact in fp32: E < 2**24) in one read
    host = torch.cat((logits_TE.sum().view(1), values_TK1.reshape(-1), top_TK1.reshape(-1).float())).tolist()
    if not math.isfinite(host[0]):
        return None
    values, experts = host[1:1 + T * K1], host[1 + T * K1:]
    for t in range(0, T * K1, K1):
        row = values[t:t + K1]
        if any(a == b for a, b in zip(row, row[1:])):  # a tie: the general path breaks it by index
            return None
        if router.renormalize and router.score == "sigmoid" and sum(row[:K]) < 2 * R._TINY:
            return None  # near the log-space rows' threshold: lean_route decides it exactly
    indices_TK = top_TK1[:, :K]
    weights_TK = values_TK1[:, :K]  # the scores at the indices, as lean_route's gather gives them
    if router.renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    if router.scale != 1.0:
        weights_TK = weights_TK * router.scale
    expert_N = [int(experts[t + k]) for t in range(0, T * K1, K1) for k in range(K)]
    return indices_TK, weights_TK, expert_N


def decode_forward(moe, x: torch.Tensor) -> torch.Tensor | None:
    """``moe(x)`` for a checked input without a token mask, or None where it does not apply.

    Token ids and groups reach only the policies' loss terms, and none of the policies this
    runs with adds one at eval, so the layer calls it whatever ids or groups it has.
    """
    mods = moe._modules
    router, experts = mods["router"], mods["experts"]
    if not _applies(moe, router, experts, x):
        return None
    shape, D = x.shape, moe.d_model
    x_TD = x.reshape(-1, D)
    T, K, E = x_TD.shape[0], router.top_k, moe.num_experts
    if T == 0:
        return None
    if T * K <= HOST_PLAN_PAIRS:
        routed = _route(router, x_TD)
        if routed is None:
            return None
        indices_TK, weights_TK, expert_N = routed
        plan = host_plan(expert_N, T, K, E)
    else:
        routing = lean_route(router, x_TD, seq_len=shape[-2] if x.dim() >= 3 else None, causal=moe.causal)
        if routing is None:
            return None
        indices_TK, weights_TK = routing.indices, routing.weights
        plan = _lean_dropless_plan(indices_TK.reshape(-1), T, K, E)
        if plan is None:  # not reached: top-k of E scores gives indices in [0, E)
            return None
    xs_RD = x_TD.index_select(0, plan.token_of_row_R)
    ys_RD = experts(xs_RD, plan).contiguous()
    combine = _combine_small if T <= _token_chunk(T, K, D, ys_RD.dtype) else _combine_fwd
    y_TD = combine(ys_RD, weights_TK, plan)
    shared = mods.get("shared")
    if shared is not None:
        shared_TD = shared(x_TD)
        if mods.get("shared_gate") is not None:
            shared_TD = torch.sigmoid(mods["shared_gate"](x_TD)) * shared_TD
        y_TD = y_TD + shared_TD
    moe.aux_loss = x_TD.new_zeros((), dtype=torch.float32)
    moe.last_stats = BalanceStats(
        load=plan.counts_E, kept=plan.kept_E, num_tokens=T, top_k=K, nonfinite_tokens=_ZERO, masked_tokens=_ZERO,
        null_pairs=_ZERO, indices=indices_TK, token_mask=None,
    )
    return y_TD.view(shape[:-1] + (D,))
