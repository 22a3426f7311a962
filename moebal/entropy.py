"""LIMoE's router-entropy terms (Mustafa et al. 2022), as pure functions.

Shape legend: T tokens, E experts. Natural log throughout.

- ``local_entropy(p)`` = mean over kept tokens of ``H(p_t)``: small when each token is
  confident about its experts (LIMoE minimises it).
- ``global_entropy(p)`` = ``H(mean over kept tokens of p_t)``: large when the batch as a
  whole uses many experts (LIMoE keeps it above a threshold).

Both are safe at ``p = 0`` (``0 log 0 = 0`` with a finite gradient, as one-hot rows from
softmax of large logits give) and return 0 when no token is kept.
"""
from __future__ import annotations

import torch

__all__ = ["local_entropy", "global_entropy"]

_TINY = torch.finfo(torch.float32).tiny


def _plogp_sum(p: torch.Tensor) -> torch.Tensor:
    """``-sum_e p_e log p_e`` over the last dim; the log's argument is kept >= tiny, so
    ``p = 0`` contributes exactly 0 and a finite gradient (``log tiny``)."""
    return -(p * p.clamp_min(_TINY).log()).sum(dim=-1)


def _kept(probs_TE: torch.Tensor, mask_T: torch.Tensor | None, name: str) -> torch.Tensor:
    if not isinstance(probs_TE, torch.Tensor) or probs_TE.dim() != 2 or not probs_TE.is_floating_point():
        raise ValueError(f"{name}: probs must be a floating-point tensor [T, E], got {getattr(probs_TE, 'shape', probs_TE)!r}")
    if mask_T is None:
        return torch.ones(probs_TE.shape[0], dtype=probs_TE.dtype, device=probs_TE.device)
    if not isinstance(mask_T, torch.Tensor) or mask_T.dtype != torch.bool or mask_T.shape != probs_TE.shape[:1]:
        raise ValueError(
            f"{name}: mask must be a bool tensor of shape [{probs_TE.shape[0]}] (True = the token counts), "
            f"got {getattr(mask_T, 'dtype', type(mask_T).__name__)} {tuple(getattr(mask_T, 'shape', ()))}"
        )
    return mask_T.to(probs_TE.dtype)


def local_entropy(probs_TE: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over kept tokens of the entropy of each token's expert distribution ``[T, E]``."""
    keep_T = _kept(probs_TE, mask, "local_entropy")
    p = probs_TE.float()
    # masked rows are zeroed before the log, so a NaN row that does not count stays out
    h_T = _plogp_sum(torch.where(keep_T.bool().unsqueeze(-1), p, 0.0))
    return h_T.sum() / keep_T.float().sum().clamp_min(1.0)


def global_entropy(probs_TE: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of the mean expert distribution over the kept tokens of ``[T, E]``."""
    keep_T = _kept(probs_TE, mask, "global_entropy")
    p = torch.where(keep_T.bool().unsqueeze(-1), probs_TE.float(), 0.0)
    mean_E = p.sum(dim=0) / keep_T.float().sum().clamp_min(1.0)
    return _plogp_sum(mean_E)
