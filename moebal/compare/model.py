"""A small byte-level decoder-only transformer with ``moebal.MoE`` in every FFN slot.

Pre-norm blocks: ``x + Attn(RMSNorm(x))`` then ``x + MoE(RMSNorm(x))``. Causal attention
through ``F.scaled_dot_product_attention`` with rotary position embeddings; the output
head is tied to the byte embedding.

Shape legend: B batch, S sequence, D model dim, H heads, Dh head dim, V vocabulary (256).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import moebal

__all__ = ["ModelConfig", "MoELM"]

VOCAB = 256


@dataclass(frozen=True)
class ModelConfig:
    layers: int = 4
    d_model: int = 128
    heads: int = 4
    num_experts: int = 16
    expert_hidden: int = 128
    top_k: int = 2
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    capacity_factor: float | None = None  # None: dropless, as in the loss-free paper

    def __post_init__(self):
        for name in ("layers", "d_model", "heads", "num_experts", "expert_hidden", "top_k", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into {self.heads} heads of even size")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None or > 0, got {self.capacity_factor!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_SF = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles_SF.cos(), angles_SF.sin()


def _apply_rope(x_BHSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
    # rotate the pairs (x[2i], x[2i+1]) by angle pos * base^(-2i/Dh)
    x1, x2 = x_BHSD[..., 0::2], x_BHSD[..., 1::2]
    out1 = x1 * cos_SF - x2 * sin_SF
    out2 = x1 * sin_SF + x2 * cos_SF
    return torch.stack((out1, out2), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _apply_rope(q, cos_SF, sin_SF), _apply_rope(k, cos_SF, sin_SF)
        a_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a_BHSD.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, router: moebal.Router):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.heads)
        self.ffn_norm = nn.RMSNorm(cfg.d_model)
        self.moe = moebal.MoE(
            cfg.d_model, cfg.expert_hidden, cfg.num_experts, cfg.top_k, router=router,
            capacity_factor=cfg.capacity_factor,
        )

    def forward(self, x_BSD, cos_SF, sin_SF, tokens_BS=None):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SF, sin_SF)
        return x_BSD + self.moe(self.ffn_norm(x_BSD), token_ids=tokens_BS)  # the ids feed hash routing


class MoELM(nn.Module):
    """Byte-level language model; ``make_router()`` builds the router of each layer."""

    def __init__(self, cfg: ModelConfig, make_router: Callable[[], moebal.Router]):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg, make_router()) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        cos, sin = _rope_tables(cfg.max_seq_len, cfg.d_model // cfg.heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def moe_layers(self) -> list[tuple[str, moebal.MoE]]:
        return [(f"blocks.{i}.moe", block.moe) for i, block in enumerate(self.blocks)]

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, S, V]`` for byte tokens ``[B, S]``."""
        S = tokens_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos_SF, sin_SF = self.rope_cos[:S], self.rope_sin[:S]
        x_BSD = self.embed(tokens_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD, cos_SF, sin_SF, tokens_BS)
        return F.linear(self.norm(x_BSD), self.embed.weight)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' balancing losses from the last forward."""
        return sum(block.moe.aux_loss for block in self.blocks)
