"""The GPU check's layer section: ``moebal.MoE`` (Triton, Triton with the fused gather-GEMM,
torch) against a torchtitan-style plain-torch MoE and the dense-equivalent SwiGLU FFN.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
"""
from __future__ import annotations

import math

import torch

from gpu_check_common import Bench, _section


def _grouped_mm():
    import torch.nn.functional as F

    return getattr(F, "grouped_mm", None) or torch._grouped_mm


class TitanStyleMoE(torch.nn.Module):
    """Plain-torch MoE in the style of torchtitan: softmax top-k router, stable argsort of
    the expert ids, ``x[idx]`` gather, three grouped GEMMs (gate, up, down), weights
    applied to the expert outputs, ``scatter_add`` back to tokens."""

    def __init__(self, D: int, F_: int, E: int, K: int):
        super().__init__()
        self.E, self.K = E, K
        self.router = torch.nn.Linear(D, E, bias=False)
        self.w_gate_EDF = torch.nn.Parameter(torch.randn(E, D, F_) / math.sqrt(D))
        self.w_up_EDF = torch.nn.Parameter(torch.randn(E, D, F_) / math.sqrt(D))
        self.w_down_EFD = torch.nn.Parameter(torch.randn(E, F_, D) / math.sqrt(F_))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gmm = _grouped_mm()
        probs_TE = self.router(x_TD).float().softmax(-1)
        w_TK, idx_TK = probs_TE.topk(self.K, dim=-1)
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        expert_N = idx_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        token_N = order_N // self.K
        offs_E = torch.cumsum(torch.bincount(expert_N, minlength=self.E), 0).to(torch.int32)
        xs_ND = x_TD[token_N]
        h_NF = torch.nn.functional.silu(gmm(xs_ND, self.w_gate_EDF, offs=offs_E)) * gmm(xs_ND, self.w_up_EDF, offs=offs_E)
        ys_ND = gmm(h_NF, self.w_down_EFD, offs=offs_E)
        ys_ND = (ys_ND.float() * w_TK.reshape(-1)[order_N].unsqueeze(-1)).to(x_TD.dtype)
        return torch.zeros_like(x_TD).scatter_add_(0, token_N.unsqueeze(-1).expand(-1, x_TD.shape[1]), ys_ND)


class DenseSwiGLU(torch.nn.Module):
    """The dense-equivalent FFN: SwiGLU with hidden K*F (the FLOPs of the routed experts)."""

    def __init__(self, D: int, hidden: int):
        super().__init__()
        self.w_in = torch.nn.Linear(D, 2 * hidden, bias=False)
        self.w_out = torch.nn.Linear(hidden, D, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x_TD).chunk(2, dim=-1)
        return self.w_out(torch.nn.functional.silu(gate) * up)


def _time_layer(make, x: torch.Tensor, dy: torch.Tensor, bench: Bench, device: torch.device) -> dict:
    module = make().to(device=device, dtype=x.dtype)
    xl = x.detach().requires_grad_(True)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        xl.grad = None
        module(xl).backward(dy)

    def fwd():
        with torch.no_grad():
            module(xl)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = {"fwd_bwd_ms": bench(fwd_bwd), "fwd_ms": bench(fwd)}
    if device.type == "cuda":
        res["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    res["tokens_per_s_fwd_bwd"] = x.shape[0] / (res["fwd_bwd_ms"] * 1e-3)
    del module
    return res


def layer_for_shape(T: int, D: int, F_: int, E: int, K: int, device: torch.device, bench: Bench) -> dict:
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    dy = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    res: dict = {}

    def moebal_layer(backend, experts_path="auto"):
        import moebal

        def make():
            moe = moebal.MoE(D, F_, E, K, router="aux_loss", capacity_factor=None, num_shared_experts=0,
                             activation="swiglu", backend=backend)
            moe.experts.path = experts_path
            return moe

        return make

    variants = {
        "moebal_triton": moebal_layer("triton"),
        "moebal_triton_fused_gather": moebal_layer("triton", "fused_gather"),
        "moebal_torch": moebal_layer("torch"),
        "titan_style_torch": lambda: TitanStyleMoE(D, F_, E, K),
        "dense_equivalent": lambda: DenseSwiGLU(D, K * F_),
    }
    for name, make in variants.items():
        _section(res, name, _time_layer, make, x, dy, bench, device)
    _section(res, "moebal_backends_agree", _layer_backends_agree, T, D, F_, E, K, device)
    ratios = {}
    for name in ("moebal_triton", "moebal_triton_fused_gather", "moebal_torch", "titan_style_torch"):
        for base in ("dense_equivalent", "titan_style_torch"):
            a, b_ = res.get(name, {}).get("fwd_bwd_ms"), res.get(base, {}).get("fwd_bwd_ms")
            if a and b_ and name != base:
                ratios[f"{name}/{base}"] = a / b_
    res["fwd_bwd_time_ratios"] = ratios
    return res


def _layer_backends_agree(T, D, F_, E, K, device) -> dict:
    import moebal

    torch.manual_seed(0)
    moe = moebal.MoE(D, F_, E, K, backend="triton").to(device=device, dtype=torch.bfloat16)
    x = torch.randn(min(T, 4096), D, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y_t = moe(x)
        moe.backend = "torch"
        y_r = moe(x)
    return {"max_abs_diff": float((y_t.float() - y_r.float()).abs().max()), "max_abs_y": float(y_r.float().abs().max())}
