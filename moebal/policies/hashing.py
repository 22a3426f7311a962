"""``HashRouting``: Hash Layers (Roller et al. 2021), a fixed token -> experts table.

Shape legend: T tokens, E experts, K top-k, V buckets (token ids, or hashed n-grams).

Each token's bucket (its id, or a hash of its last ``ngram`` ids: ``moebal.hash_table.
ngram_buckets``) picks the K experts of that row of an int64 table ``router.hash_table``
[V, K]. Nothing is learned and nothing moves during training, so every forward routes
a given context the same way. DeepSeek-V4 routes its first layers this way with the gate's
scores as the weights (``weights="router"``); with ``weights="unit"`` (the paper) the
router runs no gate GEMM at all.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from moebal import routing as R
from moebal.hash_table import balanced_hash_table, ngram_buckets
from moebal.policies.base import Policy, RouteContext

__all__ = ["HashRouting"]

TABLE_KINDS = ("balanced", "random", "round_robin")


def _int_arg(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"HashRouting {name} must be an int >= {low}, got {value!r}")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:8]


@dataclass(frozen=True, eq=False, repr=False)
class HashRouting(Policy):
    """Route each token to the K experts its bucket's row of a fixed table names.

    Args:
        table: how the [V, K] table is made: ``"balanced"`` (Graham's LPT over bucket
            frequencies ``counts``: ``moebal.hash_table.balanced_hash_table``),
            ``"random"`` (K distinct experts per bucket, uniform, from a generator seeded
            with ``seed``), ``"round_robin"`` (bucket v -> experts ``(v*K + j) % E``,
            j < K), or an int tensor [V, K] of your own (values in [0, E), K distinct per
            row, K = the router's top_k).
        num_buckets: V. Required for ``"random"`` and ``"round_robin"``; otherwise taken
            from ``counts`` or the table, which it must equal when given.
        counts: [V] bucket frequencies for ``"balanced"``, e.g.
            ``moebal.hash_table.bucket_counts(sample_ids, ngram, num_buckets)`` on a sample
            of the training data.
        ngram: 1 buckets a token by its id (ids must lie in [0, V)); n > 1 by a hash of its
            id and the n - 1 ids before it in its sequence (``ngram_buckets``).
        weights: ``"unit"`` (every chosen expert gets 1/K; the router skips its gate) or
            ``"router"`` (the router's scores at the hashed experts, renormalised when the
            router renormalises; the gate is trained through them).
        seed: the ``"random"`` table's generator seed.

    ``setup`` registers the table as a persistent int64 buffer ``router.hash_table`` (it
    survives ``state_dict``, stays int64 under ``.to(dtype)``; a loaded table wins over
    the one built here). The router must have no null experts and no group limit: a hash
    picks real experts from its table. Tensors given here are copied to the CPU, and the
    repr names them by shape and a digest of their values, so two ranks' configurations
    compare equal exactly when their tables do.
    """

    table: str | torch.Tensor = "balanced"
    num_buckets: int | None = None
    counts: torch.Tensor | None = None
    ngram: int = 1
    weights: str = "unit"
    seed: int = 0

    selects = True

    def __post_init__(self):
        if self.weights not in ("unit", "router"):
            raise ValueError(f"HashRouting weights must be 'unit' or 'router', got {self.weights!r}")
        _int_arg("ngram", self.ngram, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"HashRouting seed must be an int, got {self.seed!r}")
        if self.num_buckets is not None:
            _int_arg("num_buckets", self.num_buckets, 1)
        if self.counts is not None:
            if not isinstance(self.counts, torch.Tensor) or self.counts.dim() != 1 or self.counts.is_complex():
                got = getattr(self.counts, "shape", self.counts)
                raise ValueError(f"HashRouting counts must be a 1-d tensor [V], got {got!r}")
            counts_V = self.counts.detach().to("cpu", torch.float64).clone()
            if counts_V.numel() == 0 or not torch.isfinite(counts_V).all() or (counts_V < 0).any():
                raise ValueError("HashRouting counts must be a non-empty [V] tensor of finite numbers >= 0")
            object.__setattr__(self, "counts", counts_V)
        if isinstance(self.table, torch.Tensor):
            object.__setattr__(self, "table", self._checked_user_table(self.table))
            rows, source = self.table.shape[0], "the table's rows"
        elif self.table in TABLE_KINDS:
            rows, source = None, None
        else:
            raise ValueError(f"HashRouting table must be one of {TABLE_KINDS} or an int tensor [V, K], got {self.table!r}")
        if self._kind == "balanced":
            if self.counts is None:
                raise ValueError(
                    "HashRouting(table='balanced') needs counts: the [V] bucket frequencies, e.g. "
                    "counts=moebal.hash_table.bucket_counts(sample_ids, ngram, num_buckets) on a sample of the "
                    "training data (or use table='random' / 'round_robin' with num_buckets=V)"
                )
            rows, source = self.counts.shape[0], "len(counts)"
        elif self.counts is not None:
            raise ValueError(f"HashRouting counts are used only by table='balanced', not by table={self._kind!r}")
        if rows is None and self.num_buckets is None:
            raise ValueError(f"HashRouting(table={self._kind!r}) needs num_buckets (V, the number of buckets)")
        if rows is not None and self.num_buckets is not None and rows != self.num_buckets:
            raise ValueError(f"HashRouting num_buckets={self.num_buckets} but {source} is {rows}")
        object.__setattr__(self, "_tables", {})  # (E, K) -> the built table: routers sharing this policy build it once

    @staticmethod
    def _checked_user_table(table: torch.Tensor) -> torch.Tensor:
        if table.dim() != 2 or table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError(f"HashRouting table must be a 2-d tensor [V, K] with V, K >= 1, got {tuple(table.shape)}")
        if table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
            raise ValueError(f"HashRouting table must be an integer tensor, got dtype {table.dtype}")
        table_VK = table.detach().to("cpu", torch.int64).clone()
        if (table_VK < 0).any():
            raise ValueError(f"HashRouting table values must be expert indices >= 0, got {table_VK.min().item()}")
        sorted_VK = table_VK.sort(dim=1).values
        repeated_V = (sorted_VK[:, 1:] == sorted_VK[:, :-1]).any(dim=1)
        if repeated_V.any():
            v = int(repeated_V.nonzero()[0])
            raise ValueError(f"HashRouting table rows must name K distinct experts, row {v} is {table_VK[v].tolist()}")
        return table_VK

    # --- configuration ------------------------------------------------------------------------

    @property
    def _kind(self) -> str:
        return "tensor" if isinstance(self.table, torch.Tensor) else self.table

    @property
    def buckets(self) -> int:
        """V: the number of buckets (table rows)."""
        if self.num_buckets is not None:
            return self.num_buckets
        return (self.table if isinstance(self.table, torch.Tensor) else self.counts).shape[0]

    @property
    def needs_logits(self) -> bool:
        """Only ``weights="router"`` reads the gate; unit weights let the router skip it."""
        return self.weights == "router"

    def __repr__(self) -> str:
        table = (f"<int64 [{self.table.shape[0]}, {self.table.shape[1]}] #{_digest(self.table)}>"
                 if isinstance(self.table, torch.Tensor) else repr(self.table))
        counts = "" if self.counts is None else f", counts=<[{self.counts.shape[0]}] #{_digest(self.counts)}>"
        seed = f", seed={self.seed}" if self._kind == "random" else ""
        return (f"HashRouting(table={table}, num_buckets={self.buckets}{counts}, ngram={self.ngram}, "
                f"weights={self.weights!r}{seed})")

    # --- the table ------------------------------------------------------------------------------

    def build_table(self, num_experts: int, top_k: int) -> torch.Tensor:
        """int64 [V, K] on the CPU: K distinct experts in [0, num_experts) per bucket."""
        E, K, V = num_experts, top_k, self.buckets
        if K > E:
            raise ValueError(f"HashRouting needs top_k <= num_experts, got top_k={K}, num_experts={E}")
        key = (E, K)
        if key in self._tables:
            return self._tables[key]
        if isinstance(self.table, torch.Tensor):
            if self.table.shape[1] != K:
                raise ValueError(f"HashRouting table has {self.table.shape[1]} columns, the router's top_k is {K}")
            if int(self.table.max()) >= E:
                raise ValueError(f"HashRouting table values must be < num_experts={E}, got {int(self.table.max())}")
            table_VK = self.table
        elif self._kind == "balanced":
            table_VK = balanced_hash_table(self.counts, E, K)
        elif self._kind == "random":
            # the K largest of E uniform keys: a uniform K-subset; 4096 buckets at a time bounds the memory
            gen = torch.Generator().manual_seed(self.seed)
            table_VK = torch.cat([
                torch.rand(min(4096, V - v), E, generator=gen).topk(K, dim=1).indices.sort(dim=1).values
                for v in range(0, V, 4096)
            ])
        else:  # round_robin
            table_VK = (torch.arange(V)[:, None] * K + torch.arange(K)[None, :]) % E
        self._tables[key] = table_VK
        return table_VK

    def setup(self, router) -> None:
        if router.num_null_experts:
            raise ValueError(
                f"HashRouting does not take null experts (the router has num_null_experts={router.num_null_experts}): "
                "its table names real experts only, so a null expert would never be chosen"
            )
        if router.num_groups != 1:
            raise ValueError(
                f"HashRouting does not take group-limited routing (the router has num_groups={router.num_groups}): "
                "its table picks the experts, not a top-k over groups"
            )
        table_VK = self.build_table(router.num_experts, router.top_k)
        router.register_buffer("hash_table", table_VK.to(router.gate.weight.device, copy=True))

    # --- the hooks ------------------------------------------------------------------------------

    def select(self, ctx: RouteContext) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.token_ids_T is None:
            raise ValueError(
                "HashRouting needs token_ids: pass MoE(...)(x, token_ids=...) or Router(...)(x_TD, token_ids=...) "
                "(int, one id per token), or swap the layer into an HF model, which passes its input_ids"
            )
        router = ctx.router
        table_VK = router.hash_table
        bucket_T = ngram_buckets(ctx.token_ids_T.to(table_VK.device), self.ngram, self.buckets, ctx.seq_len, ctx.mask_T)
        indices_TK = table_VK[bucket_T]
        if self.weights == "unit":  # a table row holds K real experts: 1/K each
            return torch.full(indices_TK.shape, 1.0 / router.top_k, device=indices_TK.device), indices_TK
        weights_TK = R._chosen_weights(ctx.scores_TE, ctx.logits_TE, indices_TK, router.score, router.renormalize)
        return weights_TK, indices_TK

    @staticmethod
    def unit_weights(indices_TK: torch.Tensor) -> torch.Tensor:
        """fp32 [T, K]: 1/K for each chosen expert; a row with -1 entries (a replayed routing)
        shares 1 among its real experts, and -1 entries get 0."""
        valid_TK = indices_TK >= 0
        return valid_TK.float() / valid_TK.sum(dim=-1, keepdim=True).clamp(min=1).float()
