"""Which expert path runs a batch: one measured rule instead of a device switch.

The paths (``moebal.experts.EXPERT_PATHS``): ``"loop"`` (per-expert GEMMs into pooled
buffers with a hand-written backward, ``moebal.experts_loop``), ``"grouped"``
(``F.grouped_mm``, static shapes, compiles), ``"bmm"`` (padded bmm over runs of adjacent
touched experts) and ``"gemv"`` (matrix-vector-shaped calls per touched expert, on the
decode layout when ``moebal.decode.prepare_decode`` made one).

The rule, in order:

1. not CPU, or under ``torch.compile``: ``"grouped"`` (static shapes, no host sync);
2. CPU, a gradient will be taken: ``"loop"`` (measured at training configs A, B, C:
   ``moebal bench``, the ``moebal`` against the ``moebal_grouped`` column);
3. CPU, no gradient (``inference_mode``/``no_grad``, or nothing requires grad): the
   measured table ``INFERENCE_TABLE`` by dtype, thread count (1 or more) and rows per
   touched expert (rounded up to the next bucket of ``ROW_BUCKETS``); a cell names the
   fastest path (``"*_packed"``: on the decode layout) and the
   fastest without the decode layout, taken when ``prepare_decode`` made none;
4. any dtype or shape the table does not hold (float16, float64, rows not a multiple of
   16 bytes): ``"loop"``.

The table comes from ``benchmarks/bench_decode.py --paths`` (``moebal.bench.decode.
run_path_grid``: experts alone at d=1024, f=384, E=64, K=8, T = 1 ... 512 tokens, forward
under ``inference_mode``, every candidate timed side by side, median of 9 interleaved
rounds, one thread; saved in ``benchmarks/results/expert_paths_cpu.json``), each cell
the path with the least summed time over the batch sizes in its bucket; the README
shows the measurements behind it. More than one thread has no measured cells yet, so
it keeps the loop (the path before this rule).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

__all__ = ["PathRule", "DEFAULT_RULE", "ROW_BUCKETS", "INFERENCE_TABLE", "choose_path"]

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # rows per touched expert; more than 64 counts as 64
PACKED = "_packed"  # a table path on the decode layout: "gemv_packed", "bmm_packed", "grouped_packed"

# (dtype, threads: 1 or 2 = "more than one", rows bucket) -> (best path, best without the decode
# layout); a path ending in PACKED runs on the decode layout
INFERENCE_TABLE: dict[tuple[str, int, int], tuple[str, str]] = {
    ('bf16', 1, 1): ('gemv_packed', 'grouped'),
    ('bf16', 1, 2): ('gemv_packed', 'grouped'),
    ('bf16', 1, 4): ('bmm_packed', 'bmm'),
    ('bf16', 1, 8): ('bmm_packed', 'bmm'),
    ('bf16', 1, 16): ('bmm_packed', 'bmm'),
    ('bf16', 1, 32): ('bmm', 'bmm'),
    ('bf16', 1, 64): ('bmm', 'bmm'),
    ('fp32', 1, 1): ('grouped_packed', 'grouped'),
    ('fp32', 1, 2): ('grouped_packed', 'grouped'),
    ('fp32', 1, 4): ('grouped_packed', 'grouped'),
    ('fp32', 1, 8): ('grouped_packed', 'grouped'),
    ('fp32', 1, 16): ('grouped', 'grouped'),
    ('fp32', 1, 32): ('grouped_packed', 'grouped'),
    ('fp32', 1, 64): ('loop', 'loop'),
}


@dataclass(frozen=True)
class PathRule:
    """The expert path for a batch, from where it runs and how many rows each expert gets.

    ``table``: ``(dtype name, 1 or 2 threads, rows bucket) -> (best, best without the decode
    layout)``; ``training``: the CPU path when a gradient will be taken; ``fallback``: the
    CPU path for what the table lacks.
    """

    table: dict = field(default_factory=lambda: INFERENCE_TABLE)
    training: str = "loop"
    fallback: str = "loop"

    def choose(self, *, device_type: str, dtype: torch.dtype, rows_per_expert: float, threads: int,
               grad: bool, compiling: bool = False, packed: bool = False) -> str:
        if device_type != "cpu" or compiling:
            return "grouped"
        if grad:
            return self.training
        key = (_DTYPE_NAMES.get(dtype), 1 if threads <= 1 else 2, rows_bucket(rows_per_expert))
        cell = self.table.get(key)
        if cell is None:
            return self.fallback
        best, unpacked = cell
        return best if packed or not best.endswith(PACKED) else unpacked


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def rows_bucket(rows_per_expert: float) -> int:
    """The smallest bucket of ``ROW_BUCKETS`` holding ``rows_per_expert`` (the last one for more)."""
    i = bisect.bisect_left(ROW_BUCKETS, rows_per_expert)
    return ROW_BUCKETS[min(i, len(ROW_BUCKETS) - 1)]


DEFAULT_RULE = PathRule()


def choose_path(xs_RD: torch.Tensor, weights_need_grad: bool, rows_per_expert: float, packed: bool = False,
                rule: PathRule = DEFAULT_RULE) -> str:
    """``rule.choose`` for these rows in the current grad mode and thread count."""
    grad = torch.is_grad_enabled() and (weights_need_grad or xs_RD.requires_grad)
    return rule.choose(device_type=xs_RD.device.type, dtype=xs_RD.dtype, rows_per_expert=rows_per_expert,
                       threads=torch.get_num_threads(), grad=grad, compiling=torch.compiler.is_compiling(),
                       packed=packed)
