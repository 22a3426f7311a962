"""Router replay: record each router's chosen experts, then route with them again.

Shape legend: T tokens, K top-k.

RL fine-tuning routes the rollout in an inference engine and trains on it in another;
about one router decision in ten differs between the two, and replaying the rollout's
experts in the training forward stops the collapses that follow. The same mechanism gives
bit-identical routing across any two forwards.

    with moebal.record_routing(model) as rec:
        model(x)                                  # rec.indices: {router path: int64 [T, K]}
    with moebal.replay_routing(model, rec.indices):
        loss = model(x).sum()                     # the recorded experts, bit-identical output

Under replay the router still computes its scores: the weights are the router's scores
gathered at the replayed experts (renormalised as the router does), so the router gets
gradient through them. An index of -1 means no expert (a masked token, or one the caller
removed); such a slot weighs 0 and the row renormalises over its other experts. Replayed
forwards move no balancing state (bias, counts, windows) unless ``update_state=True``.
A router called several times inside one ``record_routing`` block records the calls
concatenated along T, and ``replay_routing`` hands them back in the same order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from moebal.router import Router

__all__ = ["record_routing", "replay_routing", "RoutingRecord"]


@dataclass
class RoutingRecord:
    """What ``record_routing`` saw: ``indices[path]`` is the int64 ``[T, K]`` of that router."""

    indices: dict = field(default_factory=dict)


def _routers(model: nn.Module) -> dict[str, Router]:
    routers = {name: m for name, m in model.named_modules() if isinstance(m, Router)}
    if not routers:
        raise ValueError(f"{type(model).__name__} has no moebal.Router to record or replay")
    return routers


@contextlib.contextmanager
def _hooked(routers: dict[str, Router], hook):
    taken = [name for name, r in routers.items() if r._route_hook is not None]
    if taken:
        raise RuntimeError(f"routers {taken} are already inside record_routing/replay_routing")
    for r in routers.values():
        r._route_hook = hook
    try:
        yield
    finally:
        for r in routers.values():
            r._route_hook = None


class _Recorder:
    update_state = True

    def __init__(self, names: dict[int, str]):
        self.names, self.calls = names, {}

    def indices_for(self, router: Router, num_tokens: int, logits_TE, recompute: bool):
        return None

    def seen(self, router: Router, indices_TK: torch.Tensor) -> None:
        self.calls.setdefault(self.names[id(router)], []).append(indices_TK.detach().clone())


class _Replayer:
    def __init__(self, routers: dict[str, Router], indices: dict, update_state: bool):
        self.update_state = update_state
        self.names = {id(r): name for name, r in routers.items()}
        self.indices, self.offsets = {}, {}
        self.served = []  # (router, T, logits fingerprint, rows) of no-grad training forwards, for reentrant recomputes
        unknown = sorted(set(indices) - set(routers))
        if unknown:
            raise ValueError(f"replay_routing: indices name routers the model does not have: {unknown}")
        for name, idx in indices.items():
            r = routers[name]
            if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] != r.top_k:
                got = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
                raise ValueError(f"replay_routing: indices[{name!r}] must be an int tensor [T, {r.top_k}], got {got}")
            if idx.is_floating_point() or idx.dtype == torch.bool:
                raise TypeError(f"replay_routing: indices[{name!r}] must be an integer tensor, got {idx.dtype}")
            idx = idx.long()
            if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= r.num_choices):
                raise ValueError(
                    f"replay_routing: indices[{name!r}] must lie in [-1, {r.num_choices}), got values in "
                    f"[{int(idx.min())}, {int(idx.max())}]"
                )
            real = idx.clamp(min=0)
            repeated = ((real[:, :, None] == real[:, None, :]) & (idx[:, :, None] >= 0) & (idx[:, None, :] >= 0)).sum((1, 2))
            if bool((repeated > idx.shape[1]).any()):
                raise ValueError(f"replay_routing: indices[{name!r}] gives a token the same expert twice")
            self.indices[name], self.offsets[name] = idx, 0

    def indices_for(self, router: Router, num_tokens: int, logits_TE, recompute: bool):
        name = self.names[id(router)]
        if name not in self.indices:
            return None  # not replayed: this router routes as usual
        if recompute:  # a reentrant checkpoint recomputes a forward already served: serve it again
            fp = None if logits_TE is None else logits_TE.detach().sum(dtype=torch.float64)
            for who, n, f, rows in reversed(self.served):
                if who == name and n == num_tokens and (fp is None or f is None or bool(f == fp)):
                    return rows
        idx, start = self.indices[name], self.offsets[name]
        if start + num_tokens > idx.shape[0]:
            raise ValueError(
                f"replay_routing: router {name!r} routes {num_tokens} tokens but only {idx.shape[0] - start} "
                "recorded rows are left (was the record made on another input shape?)"
            )
        self.offsets[name] = start + num_tokens
        rows = idx[start:start + num_tokens].to(router.gate.weight.device)
        if router.training and not torch.is_grad_enabled():  # maybe a reentrant checkpoint's first pass
            fp = None if logits_TE is None else logits_TE.detach().sum(dtype=torch.float64)
            self.served.append((name, num_tokens, fp, rows))
        return rows

    def seen(self, router: Router, indices_TK: torch.Tensor) -> None:
        pass


@contextlib.contextmanager
def record_routing(model: nn.Module):
    """Record every router's ``[T, K]`` expert indices (−1 = no expert) in ``rec.indices``,
    keyed by the router's module path."""
    routers = _routers(model)
    recorder = _Recorder({id(r): name for name, r in routers.items()})
    record = RoutingRecord()
    with _hooked(routers, recorder):
        yield record
    for name, calls in recorder.calls.items():
        record.indices[name] = calls[0] if len(calls) == 1 else torch.cat(calls)


@contextlib.contextmanager
def replay_routing(model: nn.Module, indices: dict, update_state: bool = False):
    """Route with recorded ``indices`` (module path -> int ``[T, K]``); routers not named route
    as usual. ``update_state=True`` lets the replayed forwards count and move balancing state."""
    routers = _routers(model)
    with _hooked(routers, _Replayer(routers, indices, update_state)):
        yield
