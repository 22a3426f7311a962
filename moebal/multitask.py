"""Multi-task mixture of experts: one gate per task over shared and task-specific experts.

One class, ``MultiGateMoE``, covers MMoE, CGC, PLE (stacked CGC levels), HoME-style task
groups and MMoEEx exclusivity as a boolean mask per level over (gate, expert). A closed
connection is masked with -inf before the softmax, so its weight is exactly 0 and its gate
parameters get exactly 0 gradient.

Legend: K tasks, G gates of a level (K, plus one shared gate on non-final levels), E experts
of a level, B examples, D level input dim, H expert hidden dim, F expert output dim,
R feature-gate rank.

Expert layout of every level: ``[shared | group 0 | group 1 | ... | task 0 | task 1 | ...]``.
Task k's experts read task k's input; shared and group experts read the shared input (at
level 0 every input is ``x``). Task gate k at level l reads task k's input and its output is
task k's input at level l + 1; the shared gate (non-final levels) feeds the shared input.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moebal.recompute import in_backward
from moebal.multitask_stats import MultiGateStats, MultiTaskMeter, multigate_stats

__all__ = ["MultiGateMoE", "ExpertNorm", "MultiGateStats", "MultiTaskMeter"]

_MODES = ("mmoe", "cgc", "ple", "home", "mmoeex", "custom")
_ACTS = {"relu": F.relu, "silu": F.silu, "swish": F.silu, "gelu": F.gelu}


def _pos_int(name: str, v, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {v!r}")
    return v


class ExpertNorm(nn.Module):
    """BatchNorm over the batch of each expert's output ``[E, B, F]`` (HoME's expert norm).

    Training: normalise per (expert, feature) with the batch mean and biased variance and
    update the running estimates (only when B > 1, and not in an activation checkpoint's
    recompute, so a checkpointed step moves them once); eval: use the running estimates.
    """

    def __init__(self, num_experts: int, features: int, eps: float = 1e-5, momentum: float = 0.1,
                 device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_experts, features, **fk))
        self.bias = nn.Parameter(torch.zeros(num_experts, features, **fk))
        self.register_buffer("running_mean", torch.zeros(num_experts, features, device=device))
        self.register_buffer("running_var", torch.ones(num_experts, features, device=device))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def forward(self, y_EBF: torch.Tensor) -> torch.Tensor:
        B = y_EBF.shape[1]
        if self.training and B > 0:
            yf = y_EBF.float()
            mean = yf.mean(1)
            var = yf.var(1, unbiased=False)
            if B > 1 and not in_backward():  # a checkpoint's recompute must not count the batch twice
                with torch.no_grad():
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                    unbiased = var * (B / (B - 1))
                    self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        z = (y_EBF.float() - mean[:, None]) * torch.rsqrt(var[:, None] + self.eps)
        return (z * self.weight[:, None].float() + self.bias[:, None].float()).to(y_EBF.dtype)


class MultiGateMoE(nn.Module):
    """Multi-task MoE: ``x [B, d_in]`` -> a tuple of K task outputs ``[B, d_out]`` (a tuple, so
    the layer runs as is under ``torch.utils.checkpoint`` in both modes).

    Args:
        d_in, d_out: input and output feature dims.
        num_tasks: K.
        num_shared: experts shared by all tasks, per level.
        num_task_experts: task-specific experts per task (an int, or one int per task).
        d_hidden: hidden units of every expert MLP (Linear -> activation -> Linear).
        levels: stacked levels (PLE when > 1); non-final levels output ``d_expert`` features.
        mode: ``"mmoe"`` (all gates open to all experts; needs no task experts),
            ``"cgc"`` (task k: shared + own), ``"ple"`` (CGC with levels >= 2),
            ``"home"`` (task k: shared + its group's experts + own; needs ``task_groups``),
            ``"mmoeex"`` (of ``num_shared`` pool experts, ``round(exclusivity * num_shared)``
            become exclusive to one task each, round-robin from the front of the pool; the
            rest stay shared), ``"custom"`` (``masks`` given). ``masks`` overrides any mode.
            The shared gate of a non-final level is open to every expert.
        masks: optional list (one per level) of bool ``[G, E]`` (G = K + 1 on non-final levels,
            the last row being the shared gate; K on the final level).
        top_k: None for dense softmax gates, else each gate keeps its top-k open experts.
        task_groups: HoME task groups, a list of lists of task indices covering each task once.
        num_group_experts: experts per group (HoME).
        expert_norm: HoME expert normalisation (``ExpertNorm``) followed by Swish on each
            expert's output.
        feature_gates: HoME feature gates, ``x * 2*sigmoid(x @ B_e @ A_e)`` on each expert's
            input (rank ``feature_gate_rank``; A zero-initialised, so identity at init).
        self_gates: each task adds a softmax mixture over its own experts only (one more gate
            per task) to its output; needs task experts.
        activation: expert hidden activation, ``"relu"`` (default), ``"silu"``/``"swish"``, ``"gelu"``.
        track_stats: compute ``last_stats`` (a list of ``MultiGateStats`` per level) each forward.
    """

    def __init__(
        self, d_in: int, d_out: int, num_tasks: int, num_shared: int = 4,
        num_task_experts: int | Sequence[int] = 0, d_hidden: int = 64, *, levels: int = 1,
        d_expert: int | None = None, mode: str = "mmoe", masks: Sequence[torch.Tensor] | None = None,
        top_k: int | None = None, task_groups: Sequence[Sequence[int]] | None = None,
        num_group_experts: int = 0, exclusivity: float = 0.0, expert_norm: bool = False,
        feature_gates: bool = False, feature_gate_rank: int = 8, self_gates: bool = False,
        activation: str = "relu", track_stats: bool = True, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.d_in, self.d_out = _pos_int("d_in", d_in), _pos_int("d_out", d_out)
        self.num_tasks = K = _pos_int("num_tasks", num_tasks)
        self.d_hidden = _pos_int("d_hidden", d_hidden)
        self.levels = _pos_int("levels", levels)
        self.d_expert = d_out if d_expert is None else _pos_int("d_expert", d_expert)
        if not isinstance(mode, str) or mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if masks is not None:
            mode = "custom"
        if mode == "custom" and masks is None:
            raise ValueError("mode='custom' needs masks")
        if top_k is not None:
            _pos_int("top_k", top_k)
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {sorted(_ACTS)}, got {activation!r}")
        _pos_int("num_shared", num_shared, allow_zero=True)
        _pos_int("num_group_experts", num_group_experts, allow_zero=True)
        _pos_int("feature_gate_rank", feature_gate_rank)
        if isinstance(num_task_experts, int) and not isinstance(num_task_experts, bool):
            per_task = [num_task_experts] * K
        elif isinstance(num_task_experts, (list, tuple)):
            per_task = list(num_task_experts)
            if len(per_task) != K:
                raise ValueError(f"num_task_experts has {len(per_task)} entries, num_tasks is {K}")
        else:
            raise TypeError(f"num_task_experts must be an int or a list of ints, got {num_task_experts!r}")
        for n in per_task:
            _pos_int("num_task_experts", n, allow_zero=True)
        if not isinstance(exclusivity, (int, float)) or isinstance(exclusivity, bool) or not 0 <= exclusivity < 1:
            raise ValueError(f"exclusivity must be a float in [0, 1), got {exclusivity!r}")
        if mode != "mmoeex" and exclusivity:
            raise ValueError(f"exclusivity is only used with mode='mmoeex', got mode={mode!r}")
        if mode == "mmoe" and sum(per_task):
            raise ValueError(f"mode='mmoe' has no task experts, got num_task_experts={num_task_experts!r}")
        if mode == "ple" and levels < 2:
            raise ValueError(f"mode='ple' needs levels >= 2, got levels={levels!r}")
        groups: list[list[int]] = []
        if task_groups is not None:
            groups = [list(g) for g in task_groups]
            flat = sorted(t for g in groups for t in g)
            if flat != list(range(K)) or any(len(g) == 0 for g in groups):
                raise ValueError(f"task_groups must partition range({K}) into non-empty groups, got {task_groups!r}")
        if mode == "home" and not groups:
            raise ValueError("mode='home' needs task_groups")
        if num_group_experts and not groups:
            raise ValueError(f"num_group_experts={num_group_experts} needs task_groups")
        if self_gates and min(per_task) == 0:
            raise ValueError(f"self_gates needs task experts for every task, got num_task_experts={num_task_experts!r}")

        # owner of each expert: -1 shared, -(2+g) group g, k >= 0 task k
        owner = [-1] * num_shared
        for g in range(len(groups)):
            owner += [-(2 + g)] * num_group_experts
        for k, n in enumerate(per_task):
            owner += [k] * n
        if mode == "mmoeex":
            for i in range(round(exclusivity * num_shared)):
                owner[i] = i % K
        E = len(owner)
        if E == 0:
            raise ValueError("the layer has no experts: num_shared, num_group_experts and num_task_experts are all 0")
        self.num_experts = E
        self.mode, self.top_k, self.track_stats = mode, top_k, track_stats
        self.expert_norm, self.feature_gates, self.self_gates = expert_norm, feature_gates, self_gates
        self.activation = activation
        task_of_group = {t: gi for gi, g in enumerate(groups) for t in g}

        cpu = torch.device("cpu")  # masks are built and checked on the CPU (works under meta-device init)
        target = torch.device(device) if device is not None else torch.empty(0).device  # honours `with torch.device(...)`
        own = torch.tensor([[o == k for o in owner] for k in range(K)], dtype=torch.bool, device=cpu)
        shared = torch.tensor([o == -1 for o in owner], device=cpu)
        # experts read their owner task's input, else the shared input (index K)
        in_idx = torch.tensor([o if o >= 0 else K for o in owner], dtype=torch.long, device=cpu)
        self.register_buffer("expert_input_E", in_idx.to(target), persistent=False)
        self.register_buffer("own_KE", own.to(target), persistent=False)
        self.register_buffer("shared_E", shared.to(target), persistent=False)
        self.owner = owner
        self._wiring_cpu = {"expert_input_E": in_idx, "own_KE": own, "shared_E": shared}
        self._masks_cpu: list[torch.Tensor] = []

        default = torch.ones(K, E, dtype=torch.bool, device=cpu)
        if mode in ("cgc", "ple", "mmoeex", "home"):
            for k in range(K):
                for e, o in enumerate(owner):
                    default[k, e] = o == -1 or o == k or (o <= -2 and task_of_group.get(k) == -(o + 2))
        if masks is not None:
            if not isinstance(masks, (list, tuple)) or len(masks) != levels:
                raise ValueError(f"masks must be a list of {levels} bool tensors, got {masks!r}")
        fk = {"device": device, "dtype": dtype}
        self.blocks = nn.ModuleList()
        for level in range(levels):
            G = K + (1 if level < levels - 1 else 0)
            if masks is not None:
                m = masks[level]
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                    raise TypeError(f"masks[{level}] must be a bool tensor, got {m!r}")
                if tuple(m.shape) != (G, E):
                    raise ValueError(f"masks[{level}] must have shape ({G}, {E}), got {tuple(m.shape)}")
                m = m.to(cpu)
            else:
                m = torch.cat([default, torch.ones(G - K, E, dtype=torch.bool, device=cpu)])
            if not m.any(1).all():
                raise ValueError(f"masks[{level}]: gates {(~m.any(1)).nonzero().flatten().tolist()} have no open expert")
            d = d_in if level == 0 else self.d_expert
            f = d_out if level == levels - 1 else self.d_expert
            blk = nn.Module()
            blk.register_buffer("mask_GE", m.clone().to(target))
            self._masks_cpu.append(m.clone())
            blk.w1 = nn.Parameter(torch.empty(E, d, d_hidden, **fk))
            blk.b1 = nn.Parameter(torch.empty(E, d_hidden, **fk))
            blk.w2 = nn.Parameter(torch.empty(E, d_hidden, f, **fk))
            blk.b2 = nn.Parameter(torch.empty(E, f, **fk))
            blk.gate_w = nn.Parameter(torch.empty(G, d, E, **fk))
            blk.gate_b = nn.Parameter(torch.empty(G, E, **fk))
            if self_gates:
                blk.self_w = nn.Parameter(torch.empty(K, d, E, **fk))
                blk.self_b = nn.Parameter(torch.empty(K, E, **fk))
            if feature_gates:
                blk.fg_b = nn.Parameter(torch.empty(E, d, feature_gate_rank, **fk))
                blk.fg_a = nn.Parameter(torch.empty(E, feature_gate_rank, d, **fk))
            if expert_norm:
                blk.norm = ExpertNorm(E, f, **fk)
            self.blocks.append(blk)
        self.last_stats: list[MultiGateStats] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init for experts and gates; feature gates' A to zero (identity).

        Also rewrites the wiring buffers (masks, expert inputs, own/shared flags) from the
        values the layer was built with, so ``to_empty`` after meta-device init loses nothing.
        """
        with torch.no_grad():
            for name, value in self._wiring_cpu.items():
                getattr(self, name).copy_(value)
            for blk, m in zip(self.blocks, self._masks_cpu):
                blk.mask_GE.copy_(m)
        for blk in self.blocks:
            d, h = blk.w1.shape[1], blk.w1.shape[2]
            for w, b, fan in ((blk.w1, blk.b1, d), (blk.w2, blk.b2, h), (blk.gate_w, blk.gate_b, d)):
                nn.init.uniform_(w, -1 / math.sqrt(fan), 1 / math.sqrt(fan))
                nn.init.uniform_(b, -1 / math.sqrt(fan), 1 / math.sqrt(fan))
            if self.self_gates:
                nn.init.uniform_(blk.self_w, -1 / math.sqrt(d), 1 / math.sqrt(d))
                nn.init.zeros_(blk.self_b)
            if self.feature_gates:
                nn.init.normal_(blk.fg_b, std=1 / math.sqrt(d))
                nn.init.zeros_(blk.fg_a)
            if self.expert_norm:
                blk.norm.reset_parameters()

    def _gate(self, logits_GBE: torch.Tensor, mask_GE: torch.Tensor) -> torch.Tensor:
        logits = logits_GBE.to(torch.promote_types(logits_GBE.dtype, torch.float32))
        logits = logits.masked_fill(~mask_GE[:, None, :], float("-inf"))
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            idx = logits.topk(self.top_k, dim=-1).indices
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
            logits = logits.masked_fill(~keep, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor [B, {self.d_in}], got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x must have shape [B, {self.d_in}], got {tuple(x.shape)}")
        K = self.num_tasks
        act = _ACTS[self.activation]
        recompute = in_backward()  # an activation checkpoint's second run: no statistics
        inputs = x.unsqueeze(0).expand(K + 1, *x.shape)  # [K+1, B, D]: tasks, then shared
        stats = []
        for level, blk in enumerate(self.blocks):
            G = blk.mask_GE.shape[0]
            xe = inputs[self.expert_input_E]  # [E, B, D]
            if self.feature_gates:
                xe = xe * (2 * torch.sigmoid(torch.bmm(torch.bmm(xe, blk.fg_b), blk.fg_a)))
            h = act(torch.baddbmm(blk.b1[:, None], xe, blk.w1))  # [E, B, H]
            y = torch.baddbmm(blk.b2[:, None], h, blk.w2)  # [E, B, F]
            if self.expert_norm:
                y = F.silu(blk.norm(y))
            gin = inputs[:G] if G == K + 1 else inputs[:K]  # [G, B, D]
            w = self._gate(torch.baddbmm(blk.gate_b[:, None], gin, blk.gate_w), blk.mask_GE)
            out = torch.einsum("gbe,ebf->gbf", w.to(y.dtype), y)  # [G, B, F]
            if self.self_gates:
                s = self._gate(torch.baddbmm(blk.self_b[:, None], inputs[:K], blk.self_w), self.own_KE)
                out = torch.cat([out[:K] + torch.einsum("kbe,ebf->kbf", s.to(y.dtype), y), out[K:]])
            if self.track_stats and not recompute:
                stats.append(multigate_stats(w[:K], h, y, self.own_KE, self.shared_E))
            inputs = out
        if not recompute:
            self.last_stats = stats if self.track_stats else None
        return tuple(inputs.unbind(0))

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, num_tasks={self.num_tasks}, "
                f"num_experts={self.num_experts}, levels={self.levels}, mode={self.mode!r}, top_k={self.top_k}")
