"""Helpers shared by the GPU check's sections: timing, error capture, routing, errors."""
from __future__ import annotations

import statistics
import time
import traceback

import torch


class Bench:
    """Median milliseconds of ``fn()``: triton.testing.do_bench on CUDA, a wall clock on CPU."""

    def __init__(self, device: torch.device, rep_ms: int):
        self.device, self.rep_ms = device, rep_ms

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=max(10, self.rep_ms // 4), rep=self.rep_ms, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _section(results: dict, key: str, fn, *args):
    """Run one part, store its dict (or its error) under ``results[key]``."""
    t0 = time.perf_counter()
    try:
        results[key] = fn(*args)
    except Exception as err:  # recorded in the JSON, the run goes on
        results[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
    if isinstance(results[key], dict):
        results[key]["section_s"] = round(time.perf_counter() - t0, 2)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _routing(T: int, E: int, K: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    # a mildly skewed router so some experts overflow the capacity
    logits = torch.randn(T, E, device=device, generator=g) + torch.linspace(0.5, 0, E, device=device)
    probs = logits.softmax(-1)
    w, idx = probs.topk(K, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).float()


def _max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    return float((a.double() - ref64).abs().max()) if a.numel() else 0.0
