"""Activation checkpointing: the recomputed forward routes exactly as the original did.

Shape legend: T tokens, K top-k, E experts.

``torch.utils.checkpoint`` runs a layer's forward twice: once in the forward pass and again
inside the backward pass, to rebuild what it did not save. A router whose state moves
during the forward (the loss-free bias after an ``"auto"`` update, a global-batch window)
would route the second run differently, and a router that counts would count twice. The
router therefore tells the two runs apart:

- A forward that runs inside a backward pass (``in_backward()``) is a recompute. It does
  not count, update or log anything.
- Non-reentrant checkpointing (``use_reentrant=False``, HF's default) runs the first pass
  with grad enabled under saved-tensor hooks. That pass leaves a :class:`Selection`
  (the chosen experts and whatever else the selection depended on) hung on the autograd
  graph it builds, so the selection lives exactly as long as that graph; the recompute
  finds it and replays it. Forwards outside any saved-tensor hooks record nothing (no
  cost in the common path).
- Reentrant checkpointing (``use_reentrant=True``) runs the first pass under
  ``torch.no_grad()``: it neither counts nor moves state (a no-grad forward is not a
  training step), so the recompute, which has grad, routes with the same state and is the
  run that counts. It finds no selection and runs as a normal training forward.

Under ``torch.compile`` none of this runs: compiled checkpointing recomputes inside the
compiled graph.
"""
from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["in_backward", "saving_under_hooks", "Selection", "SelectionLog"]


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (never under compile)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def saving_under_hooks() -> bool:
    """True inside ``torch.autograd.graph.saved_tensors_hooks`` (non-reentrant checkpoint)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


@dataclass(eq=False)
class Selection:
    """One forward's routing decision, enough to replay it bit for bit."""

    num_tokens: int
    fingerprint: torch.Tensor  # float64 0-d: the sum of the router logits
    indices_TK: torch.Tensor  # int64 [T, K]
    state: dict = field(default_factory=dict)  # what the policies remembered (a bias, a window's f)
    used: bool = False


class _Hold(torch.autograd.Function):
    """Identity on ``t`` whose graph node keeps ``selection`` alive."""

    @staticmethod
    def forward(ctx, t, selection):
        ctx.selection = selection
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fingerprint(logits_TE: torch.Tensor) -> torch.Tensor:
    return logits_TE.detach().sum(dtype=torch.float64)


class SelectionLog:
    """A router's selections from first passes under checkpointing, held weakly.

    Each selection is owned by the autograd graph of the forward that made it; the log
    only finds it again, so it never grows past the graphs the caller keeps alive.
    """

    _UNHELD = 8  # selections kept strongly when no graph can own them (a router without gradient)

    def __init__(self):
        self._refs: list[weakref.ref] = []
        self._unheld: collections.deque = collections.deque(maxlen=self._UNHELD)

    def __deepcopy__(self, memo):
        return SelectionLog()  # a copy owns no graph

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def hold(self, t: torch.Tensor, selection: Selection) -> torch.Tensor:
        """Return ``t`` (a graph-carrying tensor of the output path) with ``selection`` hung on it."""
        self._refs = [r for r in self._refs if r() is not None]
        self._refs.append(weakref.ref(selection))
        if not t.requires_grad:  # no graph to own it (a frozen router on input without grad)
            self._unheld.append(selection)
            return t
        return _Hold.apply(t, selection)

    def find(self, logits_TE: torch.Tensor) -> Selection | None:
        """The first pass whose routing this recompute must replay, or None.

        The candidates are the live selections for this token count, unused ones first.
        When there is one unused candidate it is taken without a host sync (on CPU its
        fingerprint is still checked, for free); otherwise the logits' fingerprint picks it.
        """
        live = [s for s in (r() for r in self._refs) if s is not None and s.num_tokens == logits_TE.shape[0]]
        if not live:
            return None
        unused = [s for s in live if not s.used]
        fp = fingerprint(logits_TE)
        if len(unused) == 1 and logits_TE.device.type != "cpu":
            chosen = unused[0]
        else:
            chosen = next((s for s in unused + [s for s in live if s.used] if bool(s.fingerprint == fp)), None)
        if chosen is not None:
            chosen.used = True
        return chosen
