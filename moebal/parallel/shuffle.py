"""Random token shuffle across ranks, undone exactly (BASE layers, Lewis et al. 2021).

Shape legend: T tokens on this rank, N tokens on all ranks, D model dim, W ranks.

BASE balances each rank's batch by itself (``moebal.functional.balanced_assignment``
inside a ``router="base"`` MoE): every expert gets exactly T*K/E of the rank's tokens.
When one rank's batch is not a random sample of the data (one document, one domain), a
random shuffle of tokens across ranks before routing makes it one; the shuffle is a
permutation of the N global token positions drawn from a seeded generator, identical on
every rank, applied with ``all_to_all_single`` and undone with the reverse exchange.
Both directions are differentiable and move rows without arithmetic, so the round trip
is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moebal.parallel.collectives import GroupHandle, all_to_all, group_rank, group_size, require_initialized

__all__ = ["shuffle_permutation", "TokenShufflePlan", "TokenShuffle"]


def shuffle_permutation(num_tokens: int, seed: int, step: int) -> torch.Tensor:
    """``perm [N]`` (int64, CPU): shuffled position p holds global token ``perm[p]``.

    Global token ids number rank 0's tokens first, then rank 1's, and so on. The same
    (num_tokens, seed, step) gives the same permutation in every process.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))
    return torch.randperm(num_tokens, generator=gen)


def _bucket(ids_T: torch.Tensor, ends_W: torch.Tensor) -> torch.Tensor:
    """The rank owning each global position (``ends_W`` = cumulative token counts)."""
    return torch.searchsorted(ends_W, ids_T, right=True)


@dataclass(frozen=True)
class TokenShufflePlan:
    """How this rank's tokens move for one shuffle; ``shuffle`` and ``restore`` are inverses."""

    send_order_T: torch.Tensor  # int64 [T]  local tokens in send order (by destination position)
    gather_T: torch.Tensor  # int64 [T]  shuffled slot i takes received row gather_T[i]
    unsend_T: torch.Tensor  # int64 [T]  inverse permutation of send_order_T
    ungather_T: torch.Tensor  # int64 [T]  inverse permutation of gather_T
    send_splits: list  # rows sent to each rank
    recv_splits: list  # rows received from each rank
    group: GroupHandle

    @classmethod
    def build(cls, num_tokens: int, seed: int, step: int, group=None, device=None) -> "TokenShufflePlan":
        """Collective: all ranks of ``group`` call it with their own token count (may differ).

        The index tensors are built on the CPU (one all_gather of the counts, on ``device``)
        and moved to ``device``.
        """
        require_initialized("TokenShufflePlan.build")
        W, rank = group_size(group), group_rank(group)
        mine = torch.tensor([num_tokens], dtype=torch.int64, device=device)  # NCCL gathers device tensors
        gathered = [torch.zeros_like(mine) for _ in range(W)]
        dist.all_gather(gathered, mine, group=group)
        sizes_W = torch.cat(gathered).cpu()
        ends_W = torch.cumsum(sizes_W, 0)
        lo, hi = int(ends_W[rank] - sizes_W[rank]), int(ends_W[rank])
        perm_N = shuffle_permutation(int(ends_W[-1]), seed, step)
        inv_N = torch.argsort(perm_N)
        dest_T = inv_N[lo:hi]  # shuffled position of each of my tokens
        send_order_T = torch.argsort(dest_T, stable=True)
        send_splits = torch.bincount(_bucket(dest_T, ends_W), minlength=W).tolist()
        # senders send in destination-position order, so rows from rank s arrive sorted by
        # position: received row j is shuffled slot recv_slot[j]
        src_rank_T = _bucket(perm_N[lo:hi], ends_W)
        recv_slot_T = torch.argsort(src_rank_T, stable=True)
        recv_splits = torch.bincount(src_rank_T, minlength=W).tolist()
        gather_T = torch.argsort(recv_slot_T)
        return cls(
            send_order_T.to(device), gather_T.to(device), torch.argsort(send_order_T).to(device),
            recv_slot_T.to(device), send_splits, recv_splits, GroupHandle(group),
        )

    def shuffle(self, x_TD: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the shuffled global batch: ``[T, D]``."""
        xr = all_to_all(x_TD.index_select(0, self.send_order_T), self.recv_splits, self.send_splits, self.group.group)
        return xr.index_select(0, self.gather_T)

    def restore(self, y_TD: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`shuffle`: rows back to the ranks and positions they came from."""
        yr = y_TD.index_select(0, self.ungather_T)
        ys = all_to_all(yr, self.send_splits, self.recv_splits, self.group.group)
        return ys.index_select(0, self.unsend_T)


class TokenShuffle(nn.Module):
    """Run a token-wise ``module`` (e.g. a ``moebal.MoE`` with ``router="base"``) on tokens
    shuffled randomly across the ranks of ``group``, and return its output in the original
    order. In eval mode the module runs on the local tokens, unshuffled.

    ``x [..., D]`` is flattened to ``[T, D]`` before the shuffle (so per-sequence losses
    see no sequences). Each call draws the next permutation: ``(seed, step)`` with the
    ``step`` buffer counting calls, saved in the state dict so a resumed run continues the
    sequence. Every rank must call it the same number of times.
    """

    def __init__(self, module: nn.Module, group=None, seed: int = 0):
        super().__init__()
        require_initialized("TokenShuffle")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.module, self.seed = module, seed
        self._group = GroupHandle(group)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.module(x)
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        plan = TokenShufflePlan.build(x_TD.shape[0], self.seed, int(self.step), self._group.group, x.device)
        self.step += 1
        y_TD = plan.restore(self.module(plan.shuffle(x_TD)))
        return y_TD.view(shape[:-1] + y_TD.shape[-1:])

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
