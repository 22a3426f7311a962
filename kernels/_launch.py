"""Shared launcher helpers: device checks and tile choice.

Tiles are chosen from the device of the tensors: on CUDA, tiles of about 4096 elements
(one to a few rows per program, so large T gives many programs); on the CPU, where
kernels run under ``TRITON_INTERPRET=1`` and every program costs a numpy round trip,
fewer and larger programs.
"""
from __future__ import annotations

import torch
import triton

__all__ = ["check_launchable", "row_tile", "next_pow2"]


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _is_interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Raise with a reason when ``kernel`` cannot run on the tensors' device."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not _is_interpreted(kernel):
        raise RuntimeError(
            f"Triton kernels need CUDA tensors, got {device.type} tensors; set TRITON_INTERPRET=1 "
            "before the kernels are imported to run them (slowly) on the CPU"
        )


def row_tile(
    num_rows: int, D: int, device: torch.device, block_rows: int | None, block_d: int | None
) -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_D, num_warps)`` for a kernel that moves rows of width ``D``."""
    on_gpu = device.type == "cuda"
    if block_d is None:
        block_d = min(next_pow2(D), 2048 if on_gpu else 64)
    if block_rows is None:
        target = 4096 if on_gpu else 2048
        block_rows = min(max(1, target // block_d), next_pow2(num_rows))
    for name, v in (("block_rows", block_rows), ("block_d", block_d)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    num_warps = 8 if block_rows * block_d >= 4096 else 4
    return block_rows, block_d, num_warps
