"""benchmarks/gpu_check.py keeps working: its CPU smoke mode (tiny shapes, Triton interpreter)
runs every section in its own process and the JSON says what a GPU run would check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_gpu_check_script_smoke(tmp_path):
    # the GPU check script at least runs: tiny shapes, in its own process
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "smoke.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--smoke",
           "--shapes", "tiny_top4_primeE", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape = json.loads(out.read_text())["shapes"]["tiny_top4_primeE"]
    kernels, fused = shape["kernels"], shape["fused_gather_gemm"]
    assert "error" not in kernels, kernels.get("error")
    assert "error" not in fused, fused.get("traceback")
    for mode in ("dropless", "capacity"):
        assert kernels[mode]["plan_equal_to_build_plan"] and kernels[mode]["plan_deterministic"]
        assert kernels[mode]["dispatch_fwd"]["bit_equal_to_twin"]
        # the fused gather-GEMM: repeatable, padding rows zero, as close to fp64 as the rule asks
        assert fused[mode]["deterministic"] and fused[mode]["padding_rows_zero"]
        assert all(e["within_2x_twin_plus_ulp"] for e in fused[mode]["max_err_vs_fp64"].values())
        assert set(fused[mode]["ms"]["bwd"]) == {"fused", "dispatch_plus_grouped_mm"}
    layer = shape["layer"]
    for name in ("moebal_triton", "moebal_triton_fused_gather", "moebal_torch", "titan_style_torch", "dense_equivalent"):
        assert layer[name]["fwd_bwd_ms"] > 0, layer[name].get("traceback")
    assert layer["moebal_backends_agree"]["max_abs_diff"] <= 0.05 * layer["moebal_backends_agree"]["max_abs_y"]
    assert "moebal_triton_fused_gather/titan_style_torch" in layer["fwd_bwd_time_ratios"]
