"""Benchmark shapes, dtypes, modes and clocks, and resolving config names to ``LayerConfig``s."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

SCHEMA = "moebal.bench.layer/1"
# "cpu": CPU time of this process (time.process_time, user + system, so page faults count):
# with one thread it is the work done, and it does not grow when other processes share
# the cores, which wall time does. "wall": time.perf_counter. "auto": cpu for one thread,
# wall otherwise (threads that wait or spin make CPU time meaningless).
TIMERS = ("auto", "cpu", "wall")
_CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclass(frozen=True)
class LayerConfig:
    """One benchmark shape: T tokens through an MoE of E experts (hidden F each), top-K."""

    name: str
    tokens: int  # T
    d_model: int  # D
    d_ff: int  # F
    num_experts: int  # E
    top_k: int  # K

    def __post_init__(self):
        for field in ("tokens", "d_model", "d_ff", "num_experts", "top_k"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LayerConfig.{field} must be an int >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"LayerConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")

    @property
    def active_flops_fwd(self) -> int:
        """FLOPs of the experts' (= the dense-equivalent FFN's) forward: 3 GEMMs of T x D x KF."""
        return 6 * self.tokens * self.d_model * self.top_k * self.d_ff


CONFIGS = {
    "A": LayerConfig("A", 4096, 512, 256, 64, 8),  # many small experts (fine-grained, DeepSeek-like)
    "B": LayerConfig("B", 2048, 1024, 3584, 8, 2),  # few big experts (Mixtral-like)
    "C": LayerConfig("C", 1024, 256, 512, 16, 2),  # small layer: overheads show
    "tiny": LayerConfig("tiny", 64, 32, 16, 8, 2),  # smoke tests
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")


def _resolve_configs(configs) -> list[LayerConfig]:
    out = []
    for c in configs:
        if isinstance(c, LayerConfig):
            out.append(c)
        elif c in CONFIGS:
            out.append(CONFIGS[c])
        else:
            raise ValueError(f"unknown config {c!r}; known: {sorted(CONFIGS)} or a LayerConfig")
    return out
