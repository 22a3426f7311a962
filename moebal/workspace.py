"""Reusable CPU workspaces for the large row tensors of the MoE layer.

On CPU every fresh large allocation is mmap'ed and each page is faulted in on first
touch, which costs as much as the gather or elementwise op that fills it; ``empty_buffer``
hands out pooled storages instead.
"""
from __future__ import annotations

import math
import os
import threading

import torch

__all__ = ["empty_buffer", "clear_buffers", "pooled_cast"]


class _BufferPool:
    """Reusable CPU buffers for the large row tensors (xs, ys, their gradients, scratch).

    Why: on CPU every fresh large allocation is mmap'ed and each page is faulted in on
    first touch, which costs as much as the gather or elementwise op that fills it. The
    pool keeps storages and hands one out again only when nothing else (a user's tensor,
    an autograd saved tensor, a ``.grad``) still holds it, so reuse can never overwrite
    live data. A request takes the smallest free storage of at least its size (and at
    most 5/4 of it, so routing-dependent scratch sizes still hit); misses evict the least
    recently used free storages to stay under ``MOEBAL_CPU_POOL_MB`` (default 2048, 0 =
    off), and past that allocate plainly.
    """

    MIN_BYTES = 1 << 18  # below this, malloc reuses its own heap and the pool adds nothing
    SLACK = 1.25

    def __init__(self):
        self._storages: list[torch.UntypedStorage] = []  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self.limit_bytes = int(float(os.environ.get("MOEBAL_CPU_POOL_MB", "2048")) * (1 << 20))

    @staticmethod
    def _free(st: torch.UntypedStorage) -> bool:
        return torch._C._storage_Use_Count(st._cdata) == 1  # only the pool holds it

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.MIN_BYTES or self.limit_bytes <= 0:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            best = None
            for i, st in enumerate(self._storages):
                nb = st.nbytes()
                if nbytes <= nb <= nbytes * self.SLACK and (best is None or nb < best[1]) and self._free(st):
                    best = (i, nb)
            if best is not None:
                st = self._storages.pop(best[0])
                self._storages.append(st)
                return torch.empty(0, dtype=dtype).set_(st, 0, shape)
            i = 0
            while self._bytes + nbytes > self.limit_bytes and i < len(self._storages):
                if self._free(self._storages[i]):
                    self._bytes -= self._storages.pop(i).nbytes()
                else:
                    i += 1
            out = torch.empty(shape, dtype=dtype)
            if self._bytes + nbytes <= self.limit_bytes:
                self._storages.append(out.untyped_storage())
                self._bytes += nbytes
            return out

    def clear(self) -> None:
        with self._lock:
            self._storages.clear()
            self._bytes = 0


_POOL = _BufferPool()


def empty_buffer(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.empty`` that reuses a pooled storage on CPU (see ``_BufferPool``); plain elsewhere."""
    if torch.device(device).type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    return _POOL.empty(shape, dtype)


def clear_buffers() -> None:
    """Drop every pooled CPU buffer (those still in use stay alive with their users)."""
    _POOL.clear()


class _CastWeight(torch.autograd.Function):
    """``w.to(dtype)`` with the cast and its gradient in pooled CPU buffers.

    Under autocast the fp32 master weights are cast every forward and their gradients cast
    back every backward. As fresh tensors, about two thirds of that time goes to first-touch
    page faults (see ``_BufferPool``): at config C this took autocast from 1.50x to
    1.26x the time of bf16 weights. A pooled gradient that becomes ``.grad`` stays reserved
    while ``.grad`` holds it. (Casting one expert at a time into a cached scratch instead
    measured slower: the backward must then cast every weight a second time.)
    """

    @staticmethod
    def forward(ctx, w, dtype):
        ctx.src_dtype = w.dtype
        return empty_buffer(w.shape, dtype, w.device).copy_(w)

    @staticmethod
    def backward(ctx, grad):
        return empty_buffer(grad.shape, ctx.src_dtype, grad.device).copy_(grad), None


def pooled_cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` in ``dtype`` (autocast's weight cast), pooled on CPU in eager mode."""
    if w.dtype == dtype:
        return w
    if w.device.type != "cpu" or torch.compiler.is_compiling():
        return w.to(dtype)
    return _CastWeight.apply(w, dtype)
