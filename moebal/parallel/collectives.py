"""Collectives moebal's parallel layers are built from (``torch.distributed`` only).

Shape legend: R rows, D model dim.

- :func:`all_to_all` — ``all_to_all_single`` with variable split sizes as a differentiable
  op; its backward is the reverse exchange with the splits swapped.
- :func:`check_same_config` — an ``all_gather_object`` of a small per-rank config so a
  mismatch raises the same readable ``ValueError`` on every rank instead of a hang later.
- group helpers that accept ``group=None`` as the default (world) group.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "all_to_all", "check_same_config", "digest", "group_size", "group_rank", "require_initialized", "GroupHandle",
]


def require_initialized(what: str) -> None:
    """Raise a clear error when ``torch.distributed`` is missing or not initialised."""
    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this torch build does not provide")
    if not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed.init_process_group(...) to have been called first")


class GroupHandle:
    """Holds a process group on a module; copies of the module share it.

    ``copy.deepcopy(model)`` (EMA weights, an eval copy) must not try to copy a process
    group, which cannot be pickled.
    """

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    return dist.get_rank(group)


class _AllToAll(torch.autograd.Function):
    """``out = all_to_all_single(x)`` with row splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x_RD, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x_RD.new_empty((sum(out_splits),) + tuple(x_RD.shape[1:]))
        dist.all_to_all_single(out, x_RD.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.in_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_RD: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group=None) -> torch.Tensor:
    """Exchange rows of ``x`` between the ranks of ``group``; differentiable.

    Args:
        x_RD: ``[sum(in_splits), ...]`` rows, those for rank j contiguous and in rank order.
        out_splits: rows received from each rank (host ints, one per rank).
        in_splits: rows sent to each rank (host ints, one per rank).
        group: process group (None = default group).

    Returns:
        ``[sum(out_splits), ...]``: the rows from rank 0, then rank 1, ... Works with any
        backend that implements ``all_to_all_single`` with uneven splits (NCCL, gloo).
    """
    out_splits, in_splits = [int(s) for s in out_splits], [int(s) for s in in_splits]
    if x_RD.shape[0] != sum(in_splits):
        raise ValueError(f"x has {x_RD.shape[0]} rows but in_splits sum to {sum(in_splits)}")
    return _AllToAll.apply(x_RD, out_splits, in_splits, group)


@torch.no_grad()
def digest(tensors: Iterable[torch.Tensor]) -> str:
    """A hash of the tensors' bytes (and shapes, dtypes): equal on two ranks iff the values are."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_config(config: Any, group=None, what: str = "configuration") -> None:
    """All ranks of ``group`` must pass equal ``config`` (a picklable value, compared with ==).

    One ``all_gather_object``; every rank sees every rank's value, so a mismatch raises the
    same ``ValueError`` on all of them (no rank is left waiting in a later collective).
    """
    gathered: list[Any] = [None] * group_size(group)
    dist.all_gather_object(gathered, config, group=group)
    if all(c == gathered[0] for c in gathered):
        return
    lines = [f"  rank {r}: {c!r}" for r, c in enumerate(gathered)]
    if all(isinstance(c, dict) for c in gathered):
        keys = sorted({k for c in gathered for k in c}, key=str)
        diff = [k for k in keys if len({repr(c.get(k)) for c in gathered}) > 1]
        lines = [f"  rank {r}: " + ", ".join(f"{k}={c.get(k)!r}" for k in diff) for r, c in enumerate(gathered)]
    raise ValueError(f"{what} differs across the {len(gathered)} ranks of the group:\n" + "\n".join(lines))
