"""pytest-benchmark suite: the MoE layer vs its dense-equivalent SwiGLU FFN vs peer MoEs, on CPU.

CI runs it as a smoke test (``--benchmark-disable``, the ``tiny`` config: every
implementation runs once and is checked). Real measurements:

    MOEBAL_BENCH_FULL=1 python -m pytest benchmarks/test_bench_layer.py --benchmark-enable \
        --benchmark-group-by=group --benchmark-columns=min,median,rounds

runs configs A, B and C (``moebal.bench.CONFIGS``) in fp32 and bf16; each benchmark group
is one (config, dtype, mode), so pytest-benchmark lists moebal, dense and the peers side by
side. ``python -m moebal.bench``-style ratio tables and the saved JSON come from
``moebal.bench.run_layer_bench`` (also smoke-tested here).
"""
import json
import os
import statistics

import pytest
import torch

from moebal import bench

FULL = os.environ.get("MOEBAL_BENCH_FULL", "0") == "1"
CONFIG_NAMES = ("A", "B", "C") if FULL else ("tiny",)
def _peer_names():
    module = bench.load_peers_module()
    return list(module.available_peers()) if module is not None else []


IMPLS = ["moebal", "moebal_grouped", "dense"] + _peer_names()
_CACHE = {}


def _setup(config, dtype):
    key = (config, dtype)
    if key not in _CACHE:
        _CACHE.clear()  # keep one config's modules alive at a time (B is ~1 GB in fp32)
        torch.set_num_threads(int(os.environ.get("MOEBAL_BENCH_THREADS", "1")))
        mods = bench.build_impls(config, dtype)
        x, g = bench.make_inputs(config, dtype)
        _CACHE[key] = (mods, x, g)
    return _CACHE[key]


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("config", CONFIG_NAMES)
@pytest.mark.parametrize("impl", IMPLS)
def test_layer(benchmark, impl, config, dtype, mode):
    mods, x, g = _setup(config, dtype)
    m = mods[impl]
    cfg = bench.CONFIGS[config]
    benchmark.group = f"{config}-{dtype}-{mode}"
    benchmark.extra_info.update(tokens=cfg.tokens, threads=torch.get_num_threads(), dtype=dtype, mode=mode)

    def step():
        bench.run_once(m, x, g, mode)

    benchmark.pedantic(step, rounds=5 if FULL else 1, warmup_rounds=1 if FULL else 0)
    # whatever ran must have produced finite gradients (a smoke check, not a timing claim)
    if mode == "fwd+bwd":
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_peers_compute_the_same_function():
    module = bench.load_peers_module()
    if module is None:
        pytest.skip("benchmarks/peers.py not found")
    mods = bench.build_impls("tiny", "fp32")
    x, _ = bench.make_inputs("tiny", "fp32")
    ref = mods["moebal"]
    for name, m in mods.items():
        if name != "dense":
            module.check_peer(m, ref, x.detach(), atol=1e-5)


def test_run_layer_bench_result_table_and_plot(tmp_path):
    seen = []
    result = bench.run_layer_bench(configs=("tiny",), dtypes=("fp32", "bf16"), threads=1, repeats=1, warmup=0,
                                   progress=seen.append)
    assert result["schema"] == bench.SCHEMA
    assert result["device"]["name"] and result["versions"]["torch"] == torch.__version__
    assert result["threads"] == [1]
    assert len(result["runs"]) == 4 and len(result["stages"]) == 2 and len(seen) == 6
    for run in result["runs"]:
        dense = run["impls"]["dense"]
        assert dense["ratio_to_dense"] == pytest.approx(1.0) and dense["paired_ratio_to_dense"] == pytest.approx(1.0)
        for name, v in run["impls"].items():
            assert v["paired_ratio_to_dense"] == pytest.approx(
                statistics.median(t / d for t, d in zip(v["times_s"], dense["times_s"])))
            assert v["best_s"] > 0 and v["tokens_per_s"] > 0 and v["ratio_to_dense"] > 0
            if name not in ("dense", "moebal") and run["dtype"] == "fp32":
                assert v["max_abs_err_vs_moebal"] < 1e-5  # same routing, same weights
    stage = result["stages"][0]
    assert set(stage["fwd_s"]) == {"router", "plan", "dispatch", "experts", "combine"}
    assert set(stage["bwd_s"]) == {"combine", "experts", "dispatch", "router"}
    table = bench.format_table(result)
    assert "moebal" in table and "tiny" in table and "fwd+bwd" in table
    path = tmp_path / "bench.json"
    bench.save_json(result, path)
    assert json.loads(path.read_text())["runs"][0]["config"]["name"] == "tiny"
    pytest.importorskip("matplotlib")
    bench.plot(path, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="config"):
        bench.run_layer_bench(configs=("Z",))
    with pytest.raises(ValueError, match="dtype"):
        bench.run_layer_bench(configs=("tiny",), dtypes=("fp8",))
    with pytest.raises(ValueError, match="mode"):
        bench.run_layer_bench(configs=("tiny",), modes=("bwd",))
    with pytest.raises(ValueError, match="top_k"):
        bench.LayerConfig("bad", 8, 8, 8, 2, 3)


def test_paired_ratio_is_the_median_of_same_round_ratios():
    # round ratios 1.2, 0.9, 1.5: median 1.2, where fastest / fastest gives 1.5 and
    # median / median 0.9 (a slow round for both leaves its ratio alone)
    assert bench.paired_ratio([3.6, 1.8, 1.5], [3.0, 2.0, 1.0]) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="one time per round"):
        bench.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="one time per round"):
        bench.paired_ratio([], [])


def test_gemm_floor_runs_on_tiny():
    out = bench.gemm_floor("tiny", "fp32", repeats=1)
    assert out["dense_gemms_s"] > 0 and out["per_expert_gemms_s"] > 0 and out["ratio"] > 0
    assert out["per_expert_cached_gemms_s"] > 0 and out["cached_ratio"] > 0
    with pytest.raises(ValueError, match="divisible"):
        bench.gemm_floor(bench.LayerConfig("odd", 5, 8, 8, 3, 1))
