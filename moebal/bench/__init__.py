"""moebal.bench: time the MoE layer against its dense-equivalent FFN and peer MoEs.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k.

Everything is timed side by side in one process: for each (config, dtype, mode) the
implementations run in interleaved rounds (the starting one rotates each round) and each
keeps its fastest round, so a neighbour's load or a frequency change hits them all alike.
The yardstick is the dense SwiGLU FFN of hidden size K*F, which does the same active
FLOPs as the MoE's experts: ``ratio = time(impl) / time(dense)``, 1.0 being the practical
limit. All MoEs share one router (softmax top-K, renormalised, no balancing loss) with the
same random gate, which routes random tokens roughly evenly.

Entry points: ``run_layer_bench(...) -> dict`` (JSON-ready), ``format_table(result)``,
``save_json(result, path)`` and ``plot(json_path, png_path)`` (matplotlib, imported lazily).

Modules: ``configs`` (shapes, dtypes, modes, clocks), ``impls`` (the implementations and
their inputs), ``timing`` (timed runs, stage times, GEMM floor), ``run`` (``run_layer_bench``
and the environment header) and ``report`` (table, JSON, plot). Everything is re-exported here.
"""
from __future__ import annotations

# Private helpers are re-exported too, so that every name of the former single module still imports.
from moebal.bench.configs import (
    _CLOCKS,
    CONFIGS,
    DTYPES,
    MODES,
    SCHEMA,
    TIMERS,
    LayerConfig,
    _resolve_configs,
)
from moebal.bench.impls import _build, _clone, _peer_errors, build_impls, load_peers_module, make_inputs
from moebal.bench.report import format_table, plot, save_json
from moebal.bench.run import (
    _cpu_name,
    _one_line,
    _prefixed,
    _routing_stats,
    _summarise,
    _versions,
    environment,
    run_layer_bench,
)
from moebal.bench.timing import _stage_times, _time_round_robin, _zero_grads, gemm_floor, paired_ratio, run_once

__all__ = [
    "LayerConfig", "CONFIGS", "DTYPES", "MODES", "run_layer_bench", "format_table", "save_json", "plot",
    "load_peers_module", "build_impls", "make_inputs", "run_once", "gemm_floor", "TIMERS",
    "paired_ratio",
]
