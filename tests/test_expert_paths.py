"""The expert path rule: it picks what its table says, and expert_ffn runs what it picks."""
import pytest
import torch

import moebal
from moebal import Router, expert_paths
from moebal.expert_paths import DEFAULT_RULE, INFERENCE_TABLE, ROW_BUCKETS, PathRule, rows_bucket
from moebal.decode import prepare_decode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_rows_bucket_rounds_up_to_the_next_bucket():
    assert [rows_bucket(r) for r in (0.5, 1, 1.01, 2, 2.5, 8, 9, 64, 500)] == [1, 1, 2, 2, 4, 8, 16, 64, 64]


@pytest.mark.parametrize("key", sorted(INFERENCE_TABLE))
def test_rule_picks_its_table_entry(key):
    dname, threads, bucket = key
    best, unpacked = INFERENCE_TABLE[key]
    # any rows in (previous bucket, bucket] land in this cell
    prev = ROW_BUCKETS[ROW_BUCKETS.index(bucket) - 1] if bucket != ROW_BUCKETS[0] else 0
    for rows in (prev + 0.5 if prev else 1, bucket):
        kw = dict(device_type="cpu", dtype=DTYPES[dname], rows_per_expert=rows, threads=threads, grad=False)
        assert DEFAULT_RULE.choose(packed=True, **kw) == best
        assert DEFAULT_RULE.choose(packed=False, **kw) == unpacked
        assert not unpacked.endswith("_packed")


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
    for name in ("loop_experts", "bmm_experts", "gemv_experts"):
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
