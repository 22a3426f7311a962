"""pytest-benchmark suite for the balanced-assignment solvers.

CI runs it as a smoke test (``--benchmark-disable``: every case runs once and its result
is checked). Real measurements of the exact solver against HiGHS and scipy's Hungarian
come from ``python benchmarks/bench_assignment.py``; this file times moebal's solvers
alone on small shapes:

    python -m pytest benchmarks/test_bench_assignment.py --benchmark-enable
"""
import pytest
import torch

from moebal.assignment import assign

# pytest (rootdir-relative "prepend" import mode) makes this folder importable: benchmarks/ is not a package
from bench_assignment import main as bench_main
from bench_assignment import make_scores


@pytest.mark.parametrize("solver", ["exact", "sinkhorn", "quantile"])
@pytest.mark.parametrize("T,E,K", [(1024, 8, 1), (1024, 64, 2)])
def test_solver(benchmark, solver, T, E, K):
    torch.set_num_threads(1)
    scores = make_scores(T, E, "router", seed=T + E + K)
    benchmark.group = f"assignment T={T} E={E} K={K}"
    benchmark.extra_info.update(T=T, E=E, K=K, threads=1)
    idx = benchmark(assign, scores, K, solver)
    assert idx.shape == (T, K)
    load = torch.bincount(idx.reshape(-1), minlength=E)
    if solver == "exact":
        assert torch.equal(load, torch.full((E,), T * K // E))


def test_bench_script_quick(tmp_path):
    # the comparison script end to end on its --quick sizes (HiGHS only, no LSA, no scaling)
    out = tmp_path / "assignment.json"
    result = bench_main(["--quick", "--skip-lsa", "--skip-scaling", "--repeats", "1", "--json", str(out)])
    assert out.exists()
    assert all(r["highs_ratio"] > 0 for r in result["side_by_side"])
