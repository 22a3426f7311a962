"""Balance statistics against closed forms; assert_balanced's message."""
import math

import pytest
import torch

import moebal
from moebal import stats
from moebal.testing import assert_balanced


def test_expert_load_counts_pairs():
    idx = torch.tensor([[0, 2], [2, 3], [0, 2]])
    assert stats.expert_load(idx, 5).tolist() == [2, 0, 3, 1, 0]
    assert stats.expert_load(idx, 5).dtype == torch.int64


def test_closed_forms():
    load = torch.tensor([10, 30, 20, 20])
    assert float(stats.max_violation(load)) == pytest.approx(0.5)
    std = math.sqrt(((10 - 20) ** 2 + (30 - 20) ** 2) / 4)
    assert float(stats.coefficient_of_variation(load)) == pytest.approx(std / 20)
    p = [0.125, 0.375, 0.25, 0.25]
    assert float(stats.load_entropy(load)) == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(4))
    assert float(stats.load_entropy(torch.tensor([5, 5, 5]))) == pytest.approx(1.0)
    assert float(stats.load_entropy(torch.tensor([0, 9, 0]))) == pytest.approx(0.0)
    assert float(stats.max_violation(torch.tensor([7, 7]))) == 0.0
    assert float(stats.max_violation(torch.zeros(3, dtype=torch.long))) == 0.0
    assert float(stats.dropped_fraction(torch.tensor([10, 6]), torch.tensor([8, 6]))) == pytest.approx(2 / 16)


def test_meter_global_vs_batch():
    m = stats.BalanceMeter()
    m.update("l0", torch.tensor([3, 1]))  # MaxVio 0.5
    m.update("l0", torch.tensor([1, 3]))  # MaxVio 0.5
    assert m.maxvio_batch("l0") == pytest.approx(0.5)
    assert m.maxvio_global("l0") == pytest.approx(0.0)  # summed counts [4, 4]
    m.update("l1", torch.tensor([2, 2]))
    assert m.maxvio_batch() == pytest.approx(0.25)
    assert m.maxvio_batch("l0", last=1) == pytest.approx(0.5)


def test_meter_reads_model_layers():
    model = torch.nn.Sequential(moebal.MoE(4, 4, 2, 1), moebal.MoE(4, 4, 2, 1))
    model(torch.randn(6, 4))
    m = stats.BalanceMeter()
    m.update_model(model)
    assert m.layers == ["0", "1"]


def test_assert_balanced_message_names_experts():
    assert_balanced(torch.tensor([10, 10, 11]), max_violation=0.1)
    with pytest.raises(AssertionError) as err:
        assert_balanced(torch.tensor([10, 40, 10, 0]), max_violation=0.1)
    msg = str(err.value)
    assert "MaxVio 1.6667 > 0.1" in msg  # mean 15, max 40
    assert "over-loaded" in msg and "under-loaded" in msg
    over = msg.split("over-loaded:")[1].split("under-loaded:")[0]
    assert "     1" in over and "+166.7%" in over
    assert "-100.0%" in msg.split("under-loaded:")[1]


def test_assert_balanced_on_model():
    moe = moebal.MoE(8, 8, 4, 1, router="base")
    moe(torch.randn(16, 8))
    assert_balanced(moe, max_violation=0.0)
    with pytest.raises(ValueError, match="forward"):
        assert_balanced(moebal.MoE(8, 8, 4, 1))
    with pytest.raises(TypeError):
        assert_balanced([1, 2, 3])
