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


# --- decode-sized batches (moebal bench --decode) ------------------------------------------

from moebal.bench import decode  # noqa: E402

DECODE_SHAPE = decode.DECODE_SHAPE if FULL else decode.TINY_SHAPE
DECODE_IMPLS = list(decode.MOEBAL_IMPLS) + [n for n in _peer_names() if n.startswith("hf_")]
_DECODE_CACHE = {}


def _decode_setup(dtype):
    if dtype not in _DECODE_CACHE:
        _DECODE_CACHE.clear()
        torch.set_num_threads(int(os.environ.get("MOEBAL_BENCH_THREADS", "1")))
        _, mods32, _ = decode._build_decode(DECODE_SHAPE, 0, True)
        _DECODE_CACHE[dtype] = decode._variants(mods32, bench.DTYPES[dtype])
    return _DECODE_CACHE[dtype]


@pytest.mark.parametrize("tokens", [1, 8, 64])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", DECODE_IMPLS)
def test_decode(benchmark, impl, dtype, tokens):
    mods = _decode_setup(dtype)
    if impl not in mods:
        pytest.skip(f"{impl} not available here")
    m = mods[impl]
    x = torch.randn(tokens, DECODE_SHAPE.d_model, generator=torch.Generator().manual_seed(1)).to(bench.DTYPES[dtype])
    benchmark.group = f"decode-{dtype}-T{tokens}"
    benchmark.extra_info.update(tokens=tokens, dtype=dtype, threads=torch.get_num_threads())

    def step():
        with torch.inference_mode():
            return m(x)

    y = benchmark.pedantic(step, rounds=15 if FULL else 1, warmup_rounds=2 if FULL else 0)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_decode_bench_result_and_table():
    seen = []
    result = decode.run_decode_bench(tokens=(0, 1, 3), shape=decode.TINY_SHAPE, repeats=2, warmup=0,
                                     bandwidth_bytes=1 << 20, progress=seen.append)
    assert result["schema"] == decode.SCHEMA and result["read_bandwidth_GBps"] > 0
    assert len(result["points"]) == 6 and len(seen) == 7  # the bandwidth line, then one per point
    per_expert_bytes = 3 * decode.TINY_SHAPE.d_model * decode.TINY_SHAPE.d_ff  # gate, up and down projections
    for p in result["points"]:
        itemsize = 4 if p["dtype"] == "fp32" else 2
        assert p["touched_weight_bytes"] == p["experts_touched"] * per_expert_bytes * itemsize
        assert (p["experts_touched"] == 0) == (p["tokens"] == 0)
        assert p["impls"]["moebal"]["ratio_to_moebal"] == pytest.approx(1.0)
        for name, v in p["impls"].items():
            assert v["median_s"] == pytest.approx(statistics.median(v["times_s"]))
            assert v["GBps"] == pytest.approx(p["touched_weight_bytes"] / v["median_s"] / 1e9)
            assert v["bandwidth_fraction"] == pytest.approx(v["GBps"] / result["read_bandwidth_GBps"])
            if p["dtype"] == "fp32":
                assert v["max_abs_err_vs_loop"] < 1e-5, name  # same routing, same weights
    table = decode.format_decode_table(result)
    assert "moebal_unpacked" in table and "GB/s" in table


def test_decode_cli_smoke(tmp_path, capsys):
    import time

    from moebal.cli import main

    t0 = time.perf_counter()
    path = tmp_path / "decode.json"
    assert main(["bench", "--decode", "--configs", "tiny", "--tokens", "1,3", "--repeats", "1",
                 "--json", str(path)]) == 0
    assert time.perf_counter() - t0 < 10
    assert "T  dtype" in capsys.readouterr().out
    assert {p["tokens"] for p in json.loads(path.read_text())["points"]} == {1, 3}


def test_path_grid_and_its_table():
    grid = decode.run_path_grid(tokens=(1, 6), dtypes=("fp32",), shape=decode.TINY_SHAPE, repeats=1)
    assert [p["tokens"] for p in grid["points"]] == [1, 6]
    table = decode.table_from_grid(grid)
    for p in grid["points"]:
        assert set(p["median_s"]) == set(decode.PATH_CANDIDATES)
        best, unpacked = table[("fp32", 1, p["rows_bucket"])]
        assert best in decode.PATH_CANDIDATES and not unpacked.endswith("_packed")
