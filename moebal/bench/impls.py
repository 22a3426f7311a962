"""Building the implementations the benchmark times (moebal paths, dense FFN, peers) and their inputs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Iterable

import torch

from moebal.bench.configs import DTYPES, LayerConfig, _resolve_configs


def load_peers_module():
    """``benchmarks/peers.py`` of a source checkout, or None when moebal runs from a wheel."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "peers.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("moebal_bench_peers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def _build(cfg: LayerConfig, seed: int, peers, moebal_paths: Iterable[str]):
    """fp32 modules: {name: module}, the reference MoE first, then dense, then peers."""
    import moebal
    from moebal.layer import DenseFFN

    torch.manual_seed(seed)
    E, K = cfg.num_experts, cfg.top_k
    ref = moebal.MoE(cfg.d_model, cfg.d_ff, E, K, router=moebal.Router(cfg.d_model, E, K, balancer=None))
    mods = {}
    for path in moebal_paths:
        m = ref if not mods else _clone(ref)
        m.experts.path = path
        mods["moebal" if path == "auto" else f"moebal_{path}"] = m
    mods["dense"] = DenseFFN(cfg.d_model, K * cfg.d_ff, "swiglu")
    skipped = {}
    if peers:
        module = peers if not isinstance(peers, (bool, list, tuple)) else load_peers_module()
        if module is None:
            skipped["*"] = "benchmarks/peers.py not found (moebal installed without its source tree)"
        else:
            names = list(peers) if isinstance(peers, (list, tuple)) else None
            avail = module.available_peers()
            if names is None:
                names = list(avail)
            for name in names:
                if name not in avail:
                    skipped[name] = "not available here (is transformers installed?)"
            mods.update(module.build_peers(ref, [n for n in names if n in avail]))
    return ref, mods, skipped


def build_impls(config, dtype="fp32", peers=True, moebal_paths=("auto", "grouped"), seed: int = 0) -> dict:
    """The implementations ``run_layer_bench`` times, in ``dtype``: {name: module x [T, D] -> y}.

    ``"moebal"`` (and ``"moebal_<path>"`` for other expert paths), ``"dense"`` and the peers;
    all MoEs share the router gate and expert weights of the seeded reference.
    """
    cfg = _resolve_configs([config])[0]
    _, mods, _ = _build(cfg, seed, peers, moebal_paths)
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return {k: v.to(dt) for k, v in mods.items()}


def make_inputs(config, dtype="fp32", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [T, D] requiring grad, output gradient [T, D])`` as ``run_layer_bench`` draws them."""
    cfg = _resolve_configs([config])[0]
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(cfg.tokens, cfg.d_model, generator=gen)
    g = torch.randn(cfg.tokens, cfg.d_model, generator=gen)
    return x.to(dt).requires_grad_(True), g.to(dt)


def _clone(module):
    import copy

    return copy.deepcopy(module)


def _peer_errors(ref, mods, x_TD) -> dict[str, float]:
    """Max abs output difference of every implementation from the moebal reference."""
    out = {}
    with torch.no_grad():
        y_ref = ref(x_TD).float()
        for name, m in mods.items():
            if name == "dense" or m is ref:
                continue
            out[name] = (m(x_TD).float() - y_ref).abs().max().item()
    return out
