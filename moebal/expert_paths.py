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
3. CPU, no gradient (``inference_mode``/``no_grad``, or nothing requires grad): a measured
   table by dtype, thread count (1 or more) and rows per touched expert (rounded up to the
   next bucket of ``ROW_BUCKETS``); a cell names the fastest path (``"*_packed"``: on the
   decode layout) and the fastest without the decode layout, taken when
   ``prepare_decode`` made none;
4. any dtype or shape the table does not hold (float16, float64, rows not a multiple of
   16 bytes, a thread count or CPU never measured): ``"loop"``.

Which path wins depends on the CPU's GEMM kernels more than on anything else: on an Intel
Xeon with AMX tiles bf16 matrix-vector calls on the decode layout win one-row batches, on
an AMD EPYC (Zen 4, AVX-512 with bf16 instructions) the same calls take 1.6x as long as
``grouped_mm`` on it. So the tables are per CPU kind (``cpu_kind()``: ``"amx"``,
``"avx512_bf16"``), each measured on such a CPU by ``benchmarks/bench_decode.py --paths``
(``moebal.bench.decode.run_path_grid``: experts alone at d=1024, f=384, E=64, K=8, T = 1
... 512 tokens, forward under ``inference_mode``, every candidate timed side by side,
median of interleaved rounds; each cell the path with the least summed time over the
batch sizes in its bucket; ``benchmarks/results/expert_paths_*.json``; the README shows
the measurements). A CPU of another kind has no table and keeps the loop. ``calibrate()``
measures the grid on the machine at hand (and for a model's own shape), and
``use_rule`` makes its rule the one ``path="auto"`` follows in this process.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from moebal.decode import onednn_supports

__all__ = ["PathRule", "DEFAULT_RULE", "ROW_BUCKETS", "INFERENCE_TABLE", "CPU_TABLES", "choose_path", "cpu_kind",
           "calibrate", "use_rule", "active_rule"]

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # rows per touched expert; more than 64 counts as 64
PACKED = "_packed"  # a table path on the decode layout: "gemv_packed", "bmm_packed", "grouped_packed"

# (dtype, threads: 1 or 2 = "more than one", rows bucket) -> (best path, best without the decode
# layout); a path ending in PACKED runs on the decode layout.
# Intel Xeon with AMX, one thread (benchmarks/results/expert_paths_xeon_amx.json, load 5-7)
_AMX_TABLE: dict[tuple[str, int, int], tuple[str, str]] = {
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
# AMD EPYC (Zen 4: AVX-512 with bf16, no AMX), one and two threads
# (benchmarks/results/expert_paths_epyc_avx512_bf16.json, load 0.4 before, 1.7 after)
_AVX512_BF16_TABLE: dict[tuple[str, int, int], tuple[str, str]] = {
    ('bf16', 1, 1): ('onednn_packed', 'grouped'),
    ('bf16', 1, 2): ('onednn_packed', 'grouped'),
    ('bf16', 1, 4): ('onednn_packed', 'bmm'),
    ('bf16', 1, 8): ('onednn_packed', 'grouped'),
    ('bf16', 1, 16): ('onednn_packed', 'grouped'),
    ('bf16', 1, 32): ('onednn_packed', 'grouped'),
    ('bf16', 1, 64): ('onednn_packed', 'loop'),
    ('bf16', 2, 1): ('onednn_packed', 'grouped'),
    ('bf16', 2, 2): ('onednn_packed', 'bmm'),
    ('bf16', 2, 4): ('onednn_packed', 'bmm'),
    ('bf16', 2, 8): ('onednn_packed', 'bmm'),
    ('bf16', 2, 16): ('onednn_packed', 'bmm'),
    ('bf16', 2, 32): ('onednn_packed', 'grouped'),
    ('bf16', 2, 64): ('onednn_packed', 'grouped'),
    ('fp32', 1, 1): ('grouped', 'grouped'),
    ('fp32', 1, 2): ('grouped', 'grouped'),
    ('fp32', 1, 4): ('grouped', 'grouped'),
    ('fp32', 1, 8): ('onednn_packed', 'grouped'),
    ('fp32', 1, 16): ('onednn_packed', 'grouped'),
    ('fp32', 1, 32): ('onednn_packed', 'loop'),
    ('fp32', 1, 64): ('onednn_packed', 'loop'),
    ('fp32', 2, 1): ('gemv', 'gemv'),
    ('fp32', 2, 2): ('bmm', 'bmm'),
    ('fp32', 2, 4): ('bmm_packed', 'bmm'),
    ('fp32', 2, 8): ('onednn_packed', 'bmm'),
    ('fp32', 2, 16): ('onednn_packed', 'bmm'),
    ('fp32', 2, 32): ('onednn_packed', 'bmm'),
    ('fp32', 2, 64): ('onednn_packed', 'loop'),
}
CPU_TABLES: dict[str, dict[tuple[str, int, int], tuple[str, str]]] = {
    "amx": _AMX_TABLE, "avx512_bf16": _AVX512_BF16_TABLE,
}


def cpu_kind() -> str:
    """The kind of this CPU for the path tables: ``"amx"`` (AMX tiles: Intel Xeon from Sapphire
    Rapids on), ``"avx512_bf16"`` (AVX-512 with bf16 instructions, no AMX: AMD Zen 4 on, Intel
    Cooper Lake), else torch's CPU capability in lower case (``"avx512"``, ``"avx2"``, ...),
    which has no table."""
    try:
        if torch.cpu._is_amx_tile_supported():
            return "amx"
        if torch.cpu._is_avx512_bf16_supported():
            return "avx512_bf16"
    except (AttributeError, RuntimeError):  # a torch without the probes: no table
        pass
    return torch.backends.cpu.get_cpu_capability().lower().replace(" ", "_")


@dataclass(frozen=True)
class PathRule:
    """The expert path for a batch, from where it runs and how many rows each expert gets.

    ``table``: ``(dtype name, 1 or 2 threads, rows bucket) -> (best, best without the decode
    layout)``; ``training``: the CPU path when a gradient will be taken; ``fallback``: the
    CPU path for what the table lacks.
    """

    table: dict = field(default_factory=lambda: dict(INFERENCE_TABLE))
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
        if best == "onednn" + PACKED and not onednn_supports(dtype):  # a torch build without oneDNN's linear
            return unpacked
        return best if packed or not best.endswith(PACKED) else unpacked

    def packed_paths(self, dtype: torch.dtype, threads: int) -> set[str]:
        """The paths on the decode layout (``"*_packed"``) this rule picks anywhere in ``dtype`` at
        ``threads`` threads: the layouts ``prepare_decode`` makes."""
        name, t = _DTYPE_NAMES.get(dtype), 1 if threads <= 1 else 2
        return {best for (dt, n, _), (best, _) in self.table.items() if dt == name and n == t and best.endswith(PACKED)}


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def rows_bucket(rows_per_expert: float) -> int:
    """The smallest bucket of ``ROW_BUCKETS`` holding ``rows_per_expert`` (the last one for more)."""
    i = bisect.bisect_left(ROW_BUCKETS, rows_per_expert)
    return ROW_BUCKETS[min(i, len(ROW_BUCKETS) - 1)]


CPU_KIND = cpu_kind()
INFERENCE_TABLE: dict[tuple[str, int, int], tuple[str, str]] = CPU_TABLES.get(CPU_KIND, {})  # this CPU's table
DEFAULT_RULE = PathRule(table=INFERENCE_TABLE)
_ACTIVE = [DEFAULT_RULE]  # the rule path="auto" follows: use_rule() replaces it


def active_rule() -> PathRule:
    """The rule ``path="auto"`` follows in this process (``DEFAULT_RULE`` unless ``use_rule`` set one)."""
    return _ACTIVE[0]


def use_rule(rule: PathRule | None) -> PathRule:
    """Make ``rule`` (e.g. ``calibrate()``'s) the one ``path="auto"`` follows in this process;
    None restores this CPU's measured ``DEFAULT_RULE``. Returns the rule it replaced."""
    if rule is not None and not isinstance(rule, PathRule):
        raise TypeError(f"rule must be a PathRule or None, got {type(rule).__name__}")
    old, _ACTIVE[0] = _ACTIVE[0], rule if rule is not None else DEFAULT_RULE
    return old


def calibrate(d_model: int = 1024, d_ff: int = 384, num_experts: int = 64, top_k: int = 8,
              tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), dtypes=("fp32", "bf16"), threads=None,
              repeats: int = 5, progress=True) -> PathRule:
    """Measure the path grid on this machine for one expert shape and return its rule.

    Times the experts alone on every path (``moebal.bench.decode.run_path_grid``) at each
    batch size in ``tokens``, in each dtype (``"fp32"``, ``"bf16"``) and at each thread
    count of ``threads`` (default: the current one), and takes per (dtype, threads, rows
    bucket) the path with the least summed time, as the shipped tables were made. Takes
    about 1 s per batch size and dtype at repeats=5 on the default shape (one thread);
    ``progress`` (True: lines on stderr; a callable; False) reports each point. Pass the
    result to ``use_rule``. Cells it did not measure keep the loop.
    """
    import sys

    from moebal.bench.configs import LayerConfig
    from moebal.bench.decode import run_path_grid, table_from_grid

    if isinstance(tokens, int) or not tokens or any(not isinstance(t, int) or t < 1 for t in tokens):
        raise ValueError(f"tokens must be a non-empty sequence of positive ints, got {tokens!r}")
    bad = [d for d in dtypes if d not in _DTYPE_NAMES.values()] if not isinstance(dtypes, str) else [dtypes]
    if bad or not dtypes:
        raise ValueError(f"dtypes must be a sequence of 'fp32'/'bf16', got {dtypes!r}")
    threads = (torch.get_num_threads(),) if threads is None else tuple([threads] if isinstance(threads, int) else threads)
    if not threads or any(not isinstance(n, int) or n < 1 for n in threads):
        raise ValueError(f"threads must be a positive int or a sequence of them, got {threads!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    shape = LayerConfig("calibrate", 1, d_model, d_ff, num_experts, top_k)  # checks the sizes
    say = progress if callable(progress) else (lambda m: print(m, file=sys.stderr, flush=True)) if progress else None
    grid = run_path_grid(tokens=tuple(tokens), dtypes=tuple(dtypes), shape=shape, threads=threads, repeats=repeats,
                         progress=say)
    return PathRule(table=table_from_grid(grid))


def choose_path(xs_RD: torch.Tensor, weights_need_grad: bool, rows_per_expert: float, packed: bool = False,
                rule: PathRule | None = None, training: bool = False) -> str:
    """``rule.choose`` (default: ``active_rule()``) for these rows in the current grad mode and thread count.

    ``training``: the forward belongs to a training step even where no gradient is taken now
    (a reentrant checkpoint's first forward runs under ``no_grad`` and its recompute with
    gradients: both must take the training path, or the output differs from the plain step's).
    """
    rule = rule if rule is not None else _ACTIVE[0]
    grad = training or (torch.is_grad_enabled() and (weights_need_grad or xs_RD.requires_grad))
    return rule.choose(device_type=xs_RD.device.type, dtype=xs_RD.dtype, rows_per_expert=rows_per_expert,
                       threads=torch.get_num_threads(), grad=grad, compiling=torch.compiler.is_compiling(),
                       packed=packed)
