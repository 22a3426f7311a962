"""Process-group helpers shared by the policies that sum counts over data-parallel ranks."""
from __future__ import annotations

import torch

__all__ = ["GroupRef", "all_reduce_sum"]


class GroupRef:
    """Holds a process group; deep copies of the router share it (groups cannot be copied)."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


def all_reduce_sum(t: torch.Tensor, group) -> None:
    """Sum ``t`` over ``group`` in place; a no-op for ``group=None`` or without torch.distributed."""
    dist = torch.distributed
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
