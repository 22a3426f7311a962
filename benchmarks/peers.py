"""Peer MoE implementations that ``moebal.bench`` times next to ``moebal.MoE``.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k.

Every peer is built from a reference ``moebal.MoE`` and copies its router and expert
weights, so all implementations route the same tokens to the same experts (up to
low-precision ties in the gate) and compute the same function: ``check_peer`` holds
them to that in fp32 before anything is timed.

- ``hf_mixtral_<impl>`` / ``hf_qwen3_<impl>``: transformers' ``MixtralSparseMoeBlock`` and
  ``Qwen3MoeSparseMoeBlock`` (needs ``transformers``, the ``hf`` extra). ``<impl>`` is the
  experts implementation transformers offers: ``eager`` (its per-expert Python loop with
  ``index_add_``) and ``grouped_mm`` (sorted rows and ``grouped_mm``) where the installed
  version has the ``experts_implementation`` setting.
- ``torchtitan``: a plain-torch MoE in torchtitan's style, written here: separate
  ``w1``/``w3``/``w2`` expert weights, token reorder by ``argsort``, ``grouped_mm`` experts,
  scores applied after the experts in fp32, unsort by scatter and a sum over K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_peers", "available_peers", "check_peer", "TitanStyleMoE"]


class TitanStyleMoE(nn.Module):
    """torchtitan-style MoE: softmax top-k router, argsort reorder, grouped_mm SwiGLU experts."""

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))  # gate proj
        self.w3 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))  # up proj
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))  # down proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T, K = x_TD.shape[0], self.top_k
        # router: softmax in fp32, top-k, renormalised
        scores_TE = torch.softmax(self.gate(x_TD).float(), dim=-1)
        top_scores_TK, experts_TK = torch.topk(scores_TE, K, dim=-1)
        top_scores_TK = top_scores_TK / top_scores_TK.sum(-1, keepdim=True)
        num_tokens_E = torch.histc(experts_TK.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
        # reorder: expert-contiguous rows
        order_N = torch.argsort(experts_TK.view(-1), stable=True)
        routed_ND = x_TD[order_N // K]
        offs_E = torch.cumsum(num_tokens_E, 0, dtype=torch.int32)
        # experts
        h_NF = F.silu(F.grouped_mm(routed_ND, self.w1.transpose(-2, -1), offs=offs_E))
        h_NF = h_NF * F.grouped_mm(routed_ND, self.w3.transpose(-2, -1), offs=offs_E)
        out_ND = F.grouped_mm(h_NF, self.w2.transpose(-2, -1), offs=offs_E)
        out_ND = (out_ND.float() * top_scores_TK.view(-1)[order_N].unsqueeze(-1)).to(x.dtype)
        # unsort and sum over K
        unsorted_ND = torch.zeros_like(out_ND).index_copy(0, order_N, out_ND)
        return unsorted_ND.view(T, K, -1).sum(dim=1).view(shape)


def _hf_classes():
    try:
        from transformers import MixtralConfig, Qwen3MoeConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except Exception:  # transformers missing, or too old to have these blocks
        return None
    return {"mixtral": (MixtralConfig, MixtralSparseMoeBlock), "qwen3": (Qwen3MoeConfig, Qwen3MoeSparseMoeBlock)}


def _hf_impls(config) -> list[str]:
    """The experts implementations the installed transformers offers for a config."""
    if not hasattr(config, "_experts_implementation"):
        return ["eager"]  # older transformers: the per-expert loop only
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except Exception:
        return ["eager"]
    return ["eager"] + (["grouped_mm"] if "grouped_mm" in ALL_EXPERTS_FUNCTIONS else [])


def available_peers() -> dict[str, str]:
    """Peer names that can be built here, each with a one-line description."""
    out = {"torchtitan": "torchtitan-style plain-torch MoE (argsort reorder, grouped_mm experts)"}
    classes = _hf_classes()
    if classes is not None:
        import transformers

        for fam, (cfg_cls, _) in classes.items():
            for impl in _hf_impls(cfg_cls()):
                out[f"hf_{fam}_{impl}"] = f"transformers {transformers.__version__} {fam} sparse MoE block, experts={impl}"
    return out


class _HFBlock(nn.Module):
    """Wraps an HF sparse MoE block to take and return ``[T, D]`` like moebal (HF wants [B, S, D])."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out = self.block(x_TD.unsqueeze(0))
        out = out[0] if isinstance(out, tuple) else out
        return out.squeeze(0)


def _hf_block(family: str, impl: str, ref) -> nn.Module:
    cfg_cls, block_cls = _hf_classes()[family]
    E, K, D, F_ = ref.num_experts, ref.top_k, ref.d_model, ref.d_ff
    common = dict(hidden_size=D, num_experts_per_tok=K, hidden_act="silu")
    if family == "mixtral":
        config = cfg_cls(intermediate_size=F_, num_local_experts=E, router_jitter_noise=0.0, **common)
    else:
        config = cfg_cls(moe_intermediate_size=F_, num_experts=E, norm_topk_prob=True, **common)
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = impl
    block = block_cls(config)
    w_in, w_out = ref.experts.w_in_EDH.detach(), ref.experts.w_out_EFD.detach()
    with torch.no_grad():
        block.gate.weight.copy_(ref.router.gate.weight)
        block.experts.gate_up_proj.copy_(w_in.transpose(1, 2))  # [E, 2F, D], gate then up
        block.experts.down_proj.copy_(w_out.transpose(1, 2))  # [E, D, F]
    return _HFBlock(block)


def _titan(ref) -> TitanStyleMoE:
    F_ = ref.d_ff
    m = TitanStyleMoE(ref.d_model, F_, ref.num_experts, ref.top_k)
    w_in, w_out = ref.experts.w_in_EDH.detach(), ref.experts.w_out_EFD.detach()
    with torch.no_grad():
        m.gate.weight.copy_(ref.router.gate.weight)
        m.w1.copy_(w_in[:, :, :F_].transpose(1, 2))
        m.w3.copy_(w_in[:, :, F_:].transpose(1, 2))
        m.w2.copy_(w_out.transpose(1, 2))
    return m


def build_peers(ref, names=None) -> dict[str, nn.Module]:
    """Peer modules computing the same function as the fp32 reference ``moebal.MoE`` ``ref``.

    Args:
        ref: a SwiGLU ``moebal.MoE`` without biases or shared experts; its router's gate and
            its expert weights are copied.
        names: which peers (default: all of ``available_peers()``); unknown names raise.

    Returns modules in the dtype and device of ``ref``'s experts, mapping ``x [T, D] -> y [T, D]``.
    """
    avail = available_peers()
    names = list(avail) if names is None else list(names)
    unknown = [n for n in names if n not in avail]
    if unknown:
        raise ValueError(f"unknown or unavailable peers {unknown}; available here: {sorted(avail)}")
    if ref.experts.activation != "swiglu" or ref.experts.b_in_EH is not None or ref.shared is not None:
        raise ValueError("peers reproduce a SwiGLU MoE without biases or shared experts")
    out = {}
    for name in names:
        if name == "torchtitan":
            peer = _titan(ref)
        else:
            _, family, impl = name.split("_", 2)
            peer = _hf_block(family, impl, ref)
        out[name] = peer.to(dtype=ref.experts.w_in_EDH.dtype, device=ref.experts.w_in_EDH.device)
    return out


@torch.no_grad()
def check_peer(peer: nn.Module, ref, x_TD: torch.Tensor, atol: float = 1e-4) -> float:
    """Max abs difference between ``peer(x)`` and ``ref(x)`` (both fp32); raises above ``atol``."""
    err = (peer(x_TD).float() - ref(x_TD).float()).abs().max().item() if x_TD.numel() else 0.0
    if not err <= atol:
        raise AssertionError(f"peer {type(peer).__name__} differs from moebal by {err:.3g} (> {atol})")
    return err
