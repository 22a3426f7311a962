"""`moebal multitask`: the synthetic tasks, the equal-parameter models, the report and the CLI,
and `moebal.testing.assert_multitask`.

References: the label correlation the protocol promises (measured on the drawn labels),
parameter counts taken from the built modules, hand-built results for the generated
reading, hand-built statistics for the assertion helper.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from moebal import MultiGateMoE
from moebal.cli import main
from moebal.multitask_bench.data import make_tasks
from moebal.multitask_bench.report import format_tables, reading
from moebal.multitask_bench.run import MODELS, BenchConfig, build_model, param_table, train_one
from moebal.multitask_stats import MultiGateStats
from moebal.testing import assert_multitask


def test_dense_label_correlation_falls_with_the_knob():
    corr = [make_tasks(c, seed=0, n_train=256, n_test=8192).label_corr[0] for c in (1.0, 0.8, 0.5, 0.0)]
    assert corr[0] > 0.98  # the same direction: the two dense labels differ only by their noise
    assert corr[0] > corr[1] > corr[2] > corr[3]
    assert abs(corr[3]) < 0.1  # orthogonal directions


def test_sparse_task_has_one_percent_of_labels_and_dense_tasks_all():
    data = make_tasks(0.5, seed=3, n_train=20000, n_test=64)
    lab = data.labelled_train
    assert lab[:, :2].all()
    assert int(lab[:, 2].sum()) == 200
    # the labelled rows are standardised: zero mean and unit sd over the labelled examples
    for k in range(3):
        y = data.y_train[lab[:, k], k].double()
        assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-5


def test_make_tasks_is_seeded_and_checks_its_arguments():
    a, b = make_tasks(0.8, seed=1, n_train=64, n_test=16), make_tasks(0.8, seed=1, n_train=64, n_test=16)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    for kw, word in (({"correlation": 1.5}, "correlation"), ({"correlation": 0.5, "sparse_fraction": 0.0}, "sparse_fraction"),
                     ({"correlation": 0.5, "d_in": 2}, "d_in")):
        with pytest.raises(ValueError, match=word):
            make_tasks(**kw)


def test_models_have_equal_parameters_within_one_percent():
    cfg = BenchConfig()
    table = param_table(cfg)
    assert set(table) == set(MODELS)
    for name, (params, hidden) in table.items():
        assert abs(params - cfg.param_budget) <= 0.01 * cfg.param_budget, (name, params)
        model, _ = build_model(name, cfg)  # the meta count is the real module's count
        assert sum(p.numel() for p in model.parameters()) == params


def test_one_training_run_learns_and_reports_its_statistics():
    cfg = BenchConfig(models=("cgc",), correlations=(0.5,), steps=150, n_train=4096, n_test=512)
    r = train_one("cgc", 0.5, 0, cfg)
    assert r["r2"]["dense-a"] > 0.3 and r["r2"]["dense-b"] > 0.3  # far above predicting the mean (0)
    assert 1 / 3 - 1e-6 <= r["shared_occupancy"] <= 1 + 1e-6
    assert all(0 <= v <= 1 for v in r["own_use"].values())
    assert r["num_experts"] == 8 and r["owner"].count(-1) == 2


def _run(model, corr, dense, sparse, occ, own_sparse):
    return {"model": model, "correlation": corr, "seed": 0, "params": 100, "num_experts": 4,
            "r2": {"dense-a": dense, "dense-b": dense, "sparse": sparse}, "shared_occupancy": occ,
            "own_use": {"dense-a": 0.5, "dense-b": 0.5, "sparse": own_sparse}, "dead_ratio": 0.0,
            "output_rms": [1.0, 1.0], "entropy": {"dense-a": 1.0, "dense-b": 1.0, "sparse": 1.0}}


def test_reading_answers_the_three_questions_from_the_numbers():
    runs = [
        _run("shared-bottom", 1.0, 0.90, 0.30, None, 0.0), _run("shared-bottom", 0.0, 0.70, 0.20, None, 0.0),
        _run("mmoe", 1.0, 0.91, 0.35, 0.6, 0.0), _run("mmoe", 0.0, 0.85, 0.25, 0.6, 0.0),
        _run("cgc", 1.0, 0.92, 0.40, 0.4, 0.7), _run("cgc", 0.0, 0.88, 0.30, 0.5, 0.5),
    ]
    results = {"config": {"models": ["shared-bottom", "mmoe", "cgc"], "correlations": [1.0, 0.0], "seeds": 1},
               "task_names": ["dense-a", "dense-b", "sparse"], "runs": runs}
    text = reading(results)
    assert "+0.010 at 1, +0.150 at 0" in text and "the gap grows as the correlation falls" in text
    assert "MMoE 0.600; cgc 0.450 (lower than MMoE)" in text
    assert "cgc 0.600 (highest: cgc)" in text
    assert "(best: cgc)" in text
    runs[3]["r2"]["dense-a"] = runs[3]["r2"]["dense-b"] = 0.705  # mmoe barely ahead at corr 0: the gap shrinks
    assert "does not grow" in reading(results)
    table = format_tables(results)
    assert "shared-bottom" in table and "corr 1" in table and "corr 0" in table


def _stats(occ=(0.5, 1.0), own=(0.5, 0.125), dead=(0.0, 0.625), rms=(1.0, 0.125)):
    E = len(occ)
    return MultiGateStats(
        gate_mass_KE=torch.full((2, E), 0.5), occupancy_E=torch.tensor(occ), own_use_K=torch.tensor(own),
        dead_ratio_E=torch.tensor(dead), output_rms_E=torch.tensor(rms), entropy_K=torch.ones(2),
        shared_E=torch.ones(E, dtype=torch.bool),
    )


def test_assert_multitask_passes_within_bounds_and_names_each_failure():
    st = _stats()
    assert_multitask(st, max_shared_occupancy=1.0, min_own_use=0.125, max_dead_ratio=0.625, min_output_rms=0.125)
    assert_multitask([st, st])  # no bounds: nothing checked
    with pytest.raises(AssertionError) as err:
        assert_multitask(st, max_shared_occupancy=0.9, min_own_use=0.25, max_dead_ratio=0.5, min_output_rms=0.25)
    text = str(err.value)
    for line in ("shared expert 1: occupancy 1.000 > 0.9", "task 1: own-expert use 0.125 < 0.25",
                 "expert 1: dead-unit ratio 62.5% > 50.0%", "expert 1: output RMS 0.125 < 0.25"):
        assert line in text
    assert "shared expert 0" not in text and "task 0" not in text
    with pytest.raises(AssertionError, match="occupancy nan"):
        assert_multitask(_stats(occ=(math.nan, 0.5)), max_shared_occupancy=0.9)  # NaN fails its bound


def test_assert_multitask_on_a_model_checks_tasks_that_own_experts():
    torch.manual_seed(0)
    m = MultiGateMoE(6, 3, num_tasks=2, num_shared=2, num_task_experts=[1, 0], mode="cgc", d_expert=8)
    m(torch.randn(32, 6))
    own = m.last_stats[0].own_use_K
    assert float(own[1]) == 0.0  # task 1 owns no expert: its own use is 0 and not checked
    assert_multitask(m, min_own_use=float(own[0]) - 1e-6)
    with pytest.raises(AssertionError, match="task 0: own-expert use"):
        assert_multitask(m, min_own_use=float(own[0]) + 1e-3)


def test_assert_multitask_bad_arguments():
    with pytest.raises(TypeError, match="MultiGateMoE"):
        assert_multitask(torch.zeros(3))
    with pytest.raises(ValueError, match="no statistics"):
        assert_multitask(MultiGateMoE(6, 3, num_tasks=2, num_shared=2, track_stats=False), min_own_use=0.1)
    with pytest.raises((TypeError, ValueError), match="max_shared_occupancy"):
        assert_multitask(_stats(), max_shared_occupancy="high")


def test_cli_tiny_run_writes_every_file(tmp_path, capsys):
    out = tmp_path / "mt"
    rc = main(["multitask", "--out", str(out), "--models", "shared-bottom,mmoe", "--correlations", "1,0",
               "--steps", "5", "--train-examples", "512", "--no-plots"])
    assert rc in (0, None)
    captured = capsys.readouterr()
    assert "[4/4]" in captured.err  # progress on stderr
    assert "shared-bottom" in captured.out and "MMoE minus shared-bottom" in captured.out
    results = json.loads((out / "results.json").read_text())
    assert {(r["model"], r["correlation"]) for r in results["runs"]} == {
        ("shared-bottom", 1.0), ("shared-bottom", 0.0), ("mmoe", 1.0), ("mmoe", 0.0)}
    assert (out / "report.md").read_text().startswith("# moebal multitask")


@pytest.mark.parametrize("argv, word", [
    (["--models", "mmoe,nope"], "--models"),
    (["--correlations", "1,2"], "correlations"),
    (["--steps", "0"], "--steps"),
    (["--threads", "-1"], "--threads"),
])
def test_cli_bad_arguments_exit_2(argv, word, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["multitask", "--out", str(tmp_path / "o"), "--no-plots", *argv])
    assert err.value.code == 2
    assert word in capsys.readouterr().err
