"""The expert path rule: it picks what its table says, and expert_ffn runs what it picks."""
import json
from pathlib import Path

import pytest
import torch

import moebal
from moebal import Router, expert_paths
from moebal.expert_paths import CPU_TABLES, DEFAULT_RULE, ROW_BUCKETS, PathRule, rows_bucket
from moebal.bench.decode import table_from_grid
from moebal.decode import prepare_decode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
GRIDS = {"amx": "expert_paths_xeon_amx.json", "avx512_bf16": "expert_paths_epyc_avx512_bf16.json"}
CELLS = sorted((kind, key) for kind, table in CPU_TABLES.items() for key in table)


def test_rows_bucket_rounds_up_to_the_next_bucket():
    assert [rows_bucket(r) for r in (0.5, 1, 1.01, 2, 2.5, 8, 9, 64, 500)] == [1, 1, 2, 2, 4, 8, 16, 64, 64]


@pytest.mark.parametrize("kind,key", CELLS)
def test_rule_picks_its_table_entry(kind, key):
    dname, threads, bucket = key
    rule = PathRule(table=CPU_TABLES[kind])
    best, unpacked = rule.table[key]
    # any rows in (previous bucket, bucket] land in this cell
    prev = ROW_BUCKETS[ROW_BUCKETS.index(bucket) - 1] if bucket != ROW_BUCKETS[0] else 0
    for rows in (prev + 0.5 if prev else 1, bucket):
        kw = dict(device_type="cpu", dtype=DTYPES[dname], rows_per_expert=rows, threads=threads, grad=False)
        assert rule.choose(packed=True, **kw) == best
        assert rule.choose(packed=False, **kw) == unpacked
        assert not unpacked.endswith("_packed")
        if threads == 2:  # "more than one thread"
            assert rule.choose(packed=True, **{**kw, "threads": 16}) == best


@pytest.mark.parametrize("kind", sorted(CPU_TABLES))
def test_each_cpu_table_is_its_measured_grid(kind):
    """Every cell is the path with the least summed median time over its bucket's points, read
    here from the grid the table was made from (and nothing the grid lacks is in the table)."""
    grid = json.loads((RESULTS / GRIDS[kind]).read_text())
    sums = {}
    for point in grid["points"]:
        key = (point["dtype"], min(point["threads"], 2), rows_bucket(point["rows_per_expert"]))
        for path, seconds in point["median_s"].items():
            sums.setdefault(key, {}).setdefault(path, 0.0)
            sums[key][path] += seconds
    want = {key: (min(acc, key=acc.get), min((p for p in acc if not p.endswith("_packed")), key=acc.get))
            for key, acc in sums.items()}
    assert CPU_TABLES[kind] == want
    assert table_from_grid(grid) == want  # what calibrate() builds its rule from



def test_packed_paths_are_the_layouts_a_table_runs_on():
    rule = PathRule(table=CPU_TABLES["avx512_bf16"])  # the README's EPYC rule table
    assert rule.packed_paths(torch.bfloat16, 1) == {"onednn_packed"}
    assert rule.packed_paths(torch.float32, 1) == {"onednn_packed"}
    assert rule.packed_paths(torch.float32, 2) == {"bmm_packed", "onednn_packed"}
    assert rule.packed_paths(torch.float32, 8) == rule.packed_paths(torch.float32, 2)  # "more than one thread"
    assert rule.packed_paths(torch.float64, 1) == set()
    assert PathRule(table=CPU_TABLES["amx"]).packed_paths(torch.bfloat16, 2) == set()  # never measured


def _probes(monkeypatch, amx, bf16, capability="AVX512"):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


def test_cpu_kind_from_the_probes(monkeypatch):
    _probes(monkeypatch, True, True)
    assert expert_paths.cpu_kind() == "amx"
    _probes(monkeypatch, False, True)
    assert expert_paths.cpu_kind() == "avx512_bf16"
    _probes(monkeypatch, False, False, "AVX2")
    assert expert_paths.cpu_kind() == "avx2" and "avx2" not in CPU_TABLES  # no table: the loop
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert expert_paths.cpu_kind() == "avx2"  # a torch without the probe


def test_use_rule_sets_what_auto_follows(monkeypatch):
    from moebal import experts

    calls = []
    real = experts.bmm_experts
    monkeypatch.setattr(experts, "bmm_experts", lambda *a: calls.append("bmm") or real(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    torch.manual_seed(0)
    moe = moebal.MoE(32, 16, 8, 2, router=Router(32, 8, 2, balancer=None)).eval()
    x = torch.randn(3, 32)
    rule = PathRule(table={("fp32", 1, b): ("bmm", "bmm") for b in ROW_BUCKETS})
    with torch.inference_mode():
        want = moe(x)
        old = expert_paths.use_rule(rule)
        try:
            assert expert_paths.active_rule() is rule and old is DEFAULT_RULE
            got = moe(x)
        finally:
            assert expert_paths.use_rule(None) is rule
    assert expert_paths.active_rule() is DEFAULT_RULE
    assert calls == ["bmm"]
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="rule must be a PathRule"):
        expert_paths.use_rule({("fp32", 1, 1): ("bmm", "bmm")})


def test_calibrate_measures_a_rule_for_the_shape():
    lines = []
    rule = expert_paths.calibrate(d_model=32, d_ff=16, num_experts=8, top_k=2, tokens=(1, 16), dtypes=("fp32",),
                                  threads=(1,), repeats=1, progress=lines.append)
    # T=1: 2 experts with one row each (bucket 1); T=16: 32 rows over at most 8 experts (4 or more)
    assert len(lines) == 2 and all("T=" in line for line in lines)
    assert set(rule.table) <= {("fp32", 1, b) for b in ROW_BUCKETS} and ("fp32", 1, 1) in rule.table
    for best, unpacked in rule.table.values():
        assert best.removesuffix("_packed") in ("loop", "grouped", "bmm", "gemv", "onednn")
        assert unpacked in ("loop", "grouped", "bmm", "gemv")
    assert rule.choose(device_type="cpu", dtype=torch.bfloat16, rows_per_expert=1, threads=1, grad=False) == "loop"


@pytest.mark.parametrize("kwargs,match", [
    (dict(tokens=()), "tokens"), (dict(tokens=4), "tokens"), (dict(tokens=(0,)), "tokens"),
    (dict(dtypes=("fp16",)), "dtypes"), (dict(dtypes="fp32"), "dtypes"), (dict(threads=0), "threads"),
    (dict(repeats=0), "repeats"), (dict(d_model=0), "d_model"),
])
def test_calibrate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        expert_paths.calibrate(**{"progress": False, **kwargs})


def test_rule_outside_the_table():
    kw = dict(dtype=torch.bfloat16, rows_per_expert=1, threads=1)
    assert DEFAULT_RULE.choose(device_type="cuda", grad=False, **kw) == "grouped"
    assert DEFAULT_RULE.choose(device_type="cpu", grad=False, compiling=True, **kw) == "grouped"
    assert DEFAULT_RULE.choose(device_type="cpu", grad=True, packed=True, **kw) == "loop"  # training: loop
    assert DEFAULT_RULE.choose(device_type="cpu", dtype=torch.float64, rows_per_expert=1, threads=1,
                               grad=False) == "loop"  # no table entry
    rule = PathRule(table={("fp32", 1, 1): ("gemv_packed", "bmm")}, training="grouped", fallback="gemv")
    assert rule.choose(device_type="cpu", dtype=torch.float32, rows_per_expert=1, threads=1, grad=False) == "bmm"
    assert rule.choose(device_type="cpu", dtype=torch.float32, rows_per_expert=1, threads=1, grad=False,
                       packed=True) == "gemv_packed"
    assert rule.choose(device_type="cpu", dtype=torch.float32, rows_per_expert=3, threads=1, grad=False) == "gemv"
    assert rule.choose(device_type="cpu", dtype=torch.float32, rows_per_expert=3, threads=1, grad=True) == "grouped"


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_runs_the_path_the_rule_picks(monkeypatch, dtype, packed):
    """At eval the auto path calls the chosen path's function (with the decode layout only for a *_packed cell)."""
    from moebal import experts

    calls = []
    for name in ("loop_experts", "bmm_experts", "gemv_experts", "onednn_experts"):
        real = getattr(experts, name)

        def spy(*args, _real=real, _name=name):
            calls.append((_name.split("_")[0], args[-1] is not None if _name != "loop_experts" else False))
            return _real(*args)

        monkeypatch.setattr(experts, name, spy)
    real_grouped = experts._grouped_ffn
    torch.manual_seed(0)
    moe = moebal.MoE(32, 16, 8, 2, router=Router(32, 8, 2, balancer=None)).eval().to(dtype)
    stored = moe.experts.w_in_EDH.data_ptr()  # grouped on the decode layout gets other weights than the stored ones
    monkeypatch.setattr(experts, "_grouped_ffn",
                        lambda *a: calls.append(("grouped", a[1].data_ptr() != stored)) or real_grouped(*a))
    if packed:
        prepare_decode(moe)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    x = torch.randn(1, 32).to(dtype)  # one token, top-2 of 8: two experts with one row each
    with torch.inference_mode():
        moe(x)
    want = DEFAULT_RULE.choose(device_type="cpu", dtype=dtype, rows_per_expert=1, threads=1, grad=False, packed=packed)
    assert calls == [(want.removesuffix("_packed"), want.endswith("_packed"))]
    calls.clear()
    moe.train()
    moe(x.requires_grad_(True)).sum().backward()  # training: the loop whatever the table says
    assert calls == [("loop", False)]


def test_choose_path_reads_grad_mode_and_threads(monkeypatch):
    seen = {}
    monkeypatch.setattr(expert_paths.PathRule, "choose", lambda self, **kw: seen.update(kw) or "loop")
    xs = torch.randn(3, 4)
    expert_paths.choose_path(xs, weights_need_grad=True, rows_per_expert=1.5)
    assert seen["grad"] is True and seen["threads"] == torch.get_num_threads() and seen["rows_per_expert"] == 1.5
    with torch.no_grad():
        expert_paths.choose_path(xs, weights_need_grad=True, rows_per_expert=1.5)
    assert seen["grad"] is False


def test_reentrant_checkpoint_takes_the_training_path_in_both_forwards(monkeypatch):
    """Its first forward runs under no_grad: a training-mode layer still takes the training path
    (not the inference table's), so the output equals the plain step's bit for bit."""
    import copy

    from torch.utils.checkpoint import checkpoint

    from moebal import experts

    calls = []
    for name in ("loop_experts", "bmm_experts"):
        real = getattr(experts, name)
        monkeypatch.setattr(experts, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    rule = PathRule(table={(d, t, b): ("bmm", "bmm") for d in ("fp32", "bf16") for t in (1, 2) for b in ROW_BUCKETS})
    old = expert_paths.use_rule(rule)
    try:
        torch.manual_seed(0)
        moe = moebal.MoE(16, 8, 4, 2, router=Router(16, 4, 2, balancer=None))
        ck = copy.deepcopy(moe)
        x = torch.randn(6, 16)
        want = moe(x)
        calls.clear()
        got = checkpoint(ck, x.requires_grad_(True), use_reentrant=True)
        assert calls == ["loop_experts"]
        got.square().sum().backward()
        assert calls == ["loop_experts", "loop_experts"]  # the recompute too
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        calls.clear()
        with torch.no_grad():
            moe.eval()(x)  # eval without gradients: the rule's inference cell
        assert calls == ["bmm_experts"]
    finally:
        expert_paths.use_rule(old)
