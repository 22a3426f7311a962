"""Degenerate input: zero tokens, underflowing scores, non-finite logits, NaN loads.

Every expected value here comes from a closed form, a hand count or a float64 loop, never
from the code under test.
"""
import math

import pytest
import torch

from moebal import stats
from moebal.testing import assert_balanced, balance_table

NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------- stats: NaN loads, empty loads


@pytest.mark.parametrize("load", [
    torch.tensor([3.0, NAN, 1.0]),  # one NaN count
    torch.tensor([NAN, NAN]),  # nothing but NaN
    torch.tensor([2.0, INF, 1.0]),  # an infinite count: (inf - inf) / inf
])
def test_max_violation_is_nan_on_a_nonfinite_load(load):
    assert math.isnan(float(stats.max_violation(load)))
    assert math.isnan(float(stats.coefficient_of_variation(load)))
    assert math.isnan(float(stats.load_entropy(load)))


def test_dropped_fraction_is_nan_on_a_nan_load():
    assert math.isnan(float(stats.dropped_fraction(torch.tensor([NAN, 2.0]), torch.tensor([1.0, 2.0]))))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_empty_load_reads_as_balanced(dtype):
    # T = 0: no expert got anything, so nothing is over- or under-loaded
    load = torch.zeros(4, dtype=dtype)
    assert float(stats.max_violation(load)) == 0.0
    assert float(stats.coefficient_of_variation(load)) == 0.0
    assert float(stats.load_entropy(load)) == 1.0
    assert float(stats.dropped_fraction(load, load)) == 0.0
    assert_balanced(load, max_violation=0.0)


def test_empty_batch_stats_from_expert_load():
    load = stats.expert_load(torch.empty(0, 2, dtype=torch.long), 3)
    assert load.tolist() == [0, 0, 0]
    s = stats.BalanceStats(load, load.clone(), num_tokens=0, top_k=2).to_dict()
    assert (s["max_violation"], s["cv"], s["entropy"], s["dropped_fraction"]) == (0.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize("load", [
    torch.tensor([5.0, NAN, 5.0]),
    torch.tensor([NAN, NAN, NAN]),
    torch.tensor([5.0, INF, 5.0]),
    torch.tensor([5.0, -INF, 5.0]),
])
def test_assert_balanced_fails_closed_on_nonfinite_load(load):
    with pytest.raises(AssertionError, match="not finite"):
        assert_balanced(load, max_violation=1e9)


def test_assert_balanced_fails_closed_on_nonfinite_stats():
    s = stats.BalanceStats(torch.tensor([1.0, NAN]), torch.tensor([1.0, 1.0]), num_tokens=1, top_k=1)
    with pytest.raises(AssertionError, match="stats: load is not finite"):
        assert_balanced(s, max_violation=10.0)


def test_table_prints_real_float_loads():
    table = balance_table(torch.tensor([2.5, 0.5, 1.5, 1.5]))  # mean 1.5
    over = table.split("over-loaded:")[1].split("under-loaded:")[0]
    under = table.split("under-loaded:")[1]
    assert "2.5" in over and "+66.7%" in over  # (2.5 - 1.5) / 1.5
    assert "0.5" in under and "-66.7%" in under
    assert "mean load 1.50 over 4 experts" in table


def test_table_lists_nonfinite_loads():
    table = balance_table(torch.tensor([1.0, NAN, 3.0, INF]))
    assert "not finite:" in table
    tail = table.split("not finite:")[1]
    assert "     1        nan" in tail and "     3        inf" in tail


def test_table_keeps_integer_loads_integer():
    table = balance_table(torch.tensor([10, 40, 10, 0]))
    assert "     1         40" in table and "40.0" not in table


@pytest.mark.parametrize("bad", [0, -1, -3, True, False, 1.5, "2"])
def test_maxvio_batch_rejects_a_bad_last(bad):
    m = stats.BalanceMeter()
    m.update("l0", torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=f"last must be a positive int or None, got {bad!r}"):
        m.maxvio_batch("l0", last=bad)


def test_maxvio_batch_last_none_means_all_and_last_beyond_length_means_all():
    m = stats.BalanceMeter()
    m.update("l0", torch.tensor([3, 1]))  # MaxVio 0.5
    m.update("l0", torch.tensor([2, 2]))  # MaxVio 0
    m.update("l0", torch.tensor([4, 0]))  # MaxVio 1
    assert m.maxvio_batch("l0", last=None) == pytest.approx(0.5)
    assert m.maxvio_batch("l0", last=2) == pytest.approx(0.5)
    assert m.maxvio_batch("l0", last=1) == pytest.approx(1.0)
    assert m.maxvio_batch("l0", last=10) == pytest.approx(0.5)


def test_meter_refuses_a_nan_load_and_counts_an_empty_one():
    m = stats.BalanceMeter()
    with pytest.raises(ValueError, match="load"):
        m.update("l0", torch.tensor([1.0, NAN]))
    with pytest.raises(ValueError, match="load"):
        m.update("l0", torch.tensor([1.5, 2.0]))  # not a count
    assert m.layers == []
    m.update("l0", torch.zeros(2, dtype=torch.long))  # an empty step
    m.update("l0", torch.tensor([3.0, 1.0]))  # integral floats are counts
    assert m.summed_load("l0").tolist() == [3, 1]
    assert m.maxvio_batch("l0") == pytest.approx(0.25)  # mean of 0 and 0.5
    assert m.maxvio_global("l0") == pytest.approx(0.5)
