"""moebal.MoE: a drop-in Mixture-of-Experts replacement for a transformer FFN.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R xs rows.

    x [..., D] -> Router -> dispatch -> GroupedExperts -> combine (+ shared experts) -> y [..., D]
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from moebal.backend import BACKENDS, resolve_backend
from moebal.dispatch import combine_rows, dispatch_rows
from moebal.experts import ACTIVATIONS, GroupedExperts, activate, hidden_width
from moebal.layer_decode import decode_forward
from moebal.plan import DROP_POLICIES, build_pair_plan, build_plan
from moebal.router import Router, make_router
from moebal.stats import BalanceStats

__all__ = ["MoE", "DenseFFN"]

_ZERO = torch.zeros((), dtype=torch.int64)


class DenseFFN(nn.Module):
    """A dense FFN with the experts' activation (used for shared experts and baselines)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        hidden = hidden_width(d_ff, activation)
        self.w_in = nn.Linear(d_model, hidden, bias=False, device=device, dtype=dtype)
        self.w_out = nn.Linear(d_ff, d_model, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.w_in.reset_parameters()
        self.w_out.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


class MoE(nn.Module):
    """Mixture-of-Experts FFN layer.

    Args:
        d_model: model width D.
        d_ff: hidden width F of each expert.
        num_experts: E routed experts.
        top_k: experts per token K.
        router: ``"aux_loss"`` (softmax, Switch loss alpha=1e-2), ``"loss_free"`` (sigmoid,
            bias rate 1e-3), ``"base"`` (balanced assignment in training) or a ``moebal.Router``.
        capacity_factor: None for dropless, or a float c > 0: each expert takes at most
            ``ceil(c * T * K / E)`` rows; overflowing pairs contribute zero and are counted
            in ``last_stats``. T counts every row, masked ones included (the buffer's
            shape stays static, no host sync): padding takes no seat but sizes the buffer.
        num_shared_experts: dense experts every token passes through (DeepSeek), run as
            one FFN of hidden ``num_shared_experts * d_ff``.
        activation: ``"swiglu"``, ``"geglu"`` (tanh-GELU gate, Gemma), ``"gelu"`` (exact),
            ``"gelu_tanh"`` (tanh approximation) or ``"relu"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for dispatch/combine.
        drop_policy: which pairs an overflowing expert drops: ``"position"`` (keeps the
            earliest tokens) or ``"weight"`` (drops the lowest routing weights).
        shared_d_ff: hidden width of the shared FFN when it is not ``num_shared_experts * d_ff``.
        shared_gate: scale the shared FFN's output by ``sigmoid(x w_gate)`` (Qwen2-MoE),
            a learned ``shared_gate.weight [1, D]``.
        ffn_bias: give every expert biases ``b_in_EH`` / ``b_out_ED`` (GPT-2-style FFNs).
        jitter_noise: Mixtral's router jitter: in training, the layer's input is multiplied
            by noise ``U(1 - eps, 1 + eps)`` drawn as ``torch.empty_like(x).uniform_``
            (the same draws as a Mixtral block under the same seed), and the router and
            the experts both see the noisy input. 0 = off; never applied at eval.
        num_null_experts: Z null experts (AdaMoE, MoE++, LongCat-Flash): the router chooses
            K of E + Z, so a token gets a variable number of real experts at fixed K. A
            null pick is never dispatched. None: the router's own (0 for a named router).
        null_expert: what a null pick contributes: ``"zero"`` (nothing) or ``"identity"``
            (``w * x``, its routing weight times the token).
        causal: the layer sits in a decoder: its ``[B, S, D]`` input is causal sequence
            data, and a routing that would let a token see later tokens of its sequence
            (``ExpertChoice(group="batch")``) raises ValueError instead.
        device, dtype: factory kwargs for every parameter, as ``nn.Linear`` takes them
            (the loss-free bias stays fp32 and the counters int64 whatever ``dtype``).
            ``device="meta"``, then ``to_empty(device=...)`` and ``reset_parameters()``,
            gives a usable layer.

    After each forward, ``aux_loss`` holds the router's balancing loss (a scalar tensor,
    zero when the policy has none; it carries the graph: add it to the loss) and
    ``last_stats`` a :class:`BalanceStats`. Copies (``copy.deepcopy``, pickle,
    ``torch.save`` of the module, ``AveragedModel``) take a detached ``aux_loss``.

    Training setups:
        - ``torch.autocast``: the expert GEMMs (and the shared experts) run in the autocast
          dtype, as ``nn.Linear`` would, and the output has that dtype; the router always
          runs in fp32.
        - Activation checkpointing (``torch.utils.checkpoint`` in both modes, HF's
          ``gradient_checkpointing_enable()``): the recompute routes exactly as the first
          pass did and counts nothing (see :mod:`moebal.recompute`). With
          ``use_reentrant=False`` (HF's default), ``aux_loss`` read after the forward
          carries the gradient as usual. With ``use_reentrant=True`` the first pass runs
          under ``no_grad``, so ``aux_loss`` read after the forward has no gradient:
          return it from the checkpointed function instead
          (``def block(x): y = moe(x); return y, moe.aux_loss``), and the checkpoint
          backpropagates it.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        router: str | Router = "aux_loss",
        capacity_factor: float | None = None,
        num_shared_experts: int = 0,
        activation: str = "swiglu",
        backend: str = "auto",
        drop_policy: str = "position",
        shared_d_ff: int | None = None,
        shared_gate: bool = False,
        ffn_bias: bool = False,
        jitter_noise: float = 0.0,
        num_null_experts: int | None = None,
        null_expert: str = "zero",
        causal: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        if shared_d_ff is not None and (
            isinstance(shared_d_ff, bool) or not isinstance(shared_d_ff, int) or shared_d_ff < 1 or not num_shared_experts
        ):
            raise ValueError(f"shared_d_ff must be None or an int >= 1 with num_shared_experts > 0, got {shared_d_ff!r}")
        if shared_gate and not num_shared_experts:
            raise ValueError("shared_gate=True needs num_shared_experts > 0")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.capacity_factor, self.backend, self.drop_policy = capacity_factor, backend, drop_policy
        if isinstance(jitter_noise, bool) or not isinstance(jitter_noise, (int, float)) or not 0 <= jitter_noise < 1:
            raise ValueError(f"jitter_noise must be a number in [0, 1), got {jitter_noise!r}")
        self.jitter_noise = float(jitter_noise)
        factory = dict(device=device, dtype=dtype)
        if null_expert not in ("zero", "identity"):
            raise ValueError(f"null_expert must be 'zero' or 'identity', got {null_expert!r}")
        self.null_expert = null_expert
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.causal = causal
        self.router = make_router(router, d_model, num_experts, top_k, num_null_experts=num_null_experts, **factory)
        selector = self.router.selector
        if capacity_factor is not None and selector is not None and selector.pair_based:
            raise ValueError(
                f"capacity_factor={capacity_factor!r}: {type(selector).__name__} sets each expert's tokens itself "
                "(its own capacity_factor); leave the layer's capacity_factor None"
            )
        self.token_source = None  # an object with tokens(shape) -> (mask, ids), set by moebal.hf
        self.experts = GroupedExperts(d_model, d_ff, num_experts, activation, bias=ffn_bias, **factory)
        shared_hidden = shared_d_ff if shared_d_ff is not None else num_shared_experts * d_ff
        self.shared = DenseFFN(d_model, shared_hidden, activation, **factory) if num_shared_experts else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False, **factory) if shared_gate else None
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_stats: BalanceStats | None = None

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (as at construction) and zero the balancing state."""
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared is not None:
            self.shared.reset_parameters()
        if self.shared_gate is not None:
            self.shared_gate.reset_parameters()

    def __getstate__(self):
        # deepcopy, pickle and torch.save copy the module's __dict__: the live aux loss holds
        # the autograd graph (which cannot be copied), so a copy takes its value only
        state = super().__getstate__()
        state["aux_loss"] = self.aux_loss.detach().clone()
        return state

    def __setstate__(self, state):
        for name, default in (("token_source", None), ("null_expert", "zero"), ("jitter_noise", 0.0), ("causal", False)):
            state.setdefault(name, default)  # a module pickled before these existed
        if "capacity_factor" in state:  # a module pickled before the factor was kept as a ratio
            factor = state.pop("capacity_factor")
            state["_capacity_ratio"] = None if factor is None else float(factor).as_integer_ratio()
        super().__setstate__(state)

    @property
    def capacity_factor(self) -> float | None:
        """c of the capacity ``ceil(c * T * K / E)``, None when dropless; settable."""
        ratio = self._capacity_ratio
        return None if ratio is None else ratio[0] / ratio[1]

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value)
        ):
            raise ValueError(f"capacity_factor must be None or a finite number > 0, got {value!r}")
        # kept as the float's exact integer ratio (num / den gives the same float back):
        # torch.compile(dynamic=True) reads a float attribute as a symbolic float, and a
        # capacity computed from one cannot size the plan's tensors; ints stay constants
        self._capacity_ratio = None if value is None else float(value).as_integer_ratio()

    def capacity(self, num_tokens: int) -> int | None:
        """Rows per expert for ``num_tokens`` tokens (None when dropless), at most ``num_tokens``:
        an expert receives each token at most once, so more rows could never be filled."""
        if self.capacity_factor is None:
            return None
        # c * (T*K): compiled, the capacity is a symbolic expression that inductor evaluates with
        # sympy, which folds c*T*K into (c*K)*T; with T*K grouped it rounds as eager does
        return max(1, min(num_tokens, math.ceil(self.capacity_factor * (num_tokens * self.top_k) / self.num_experts)))

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        token_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [..., D] -> y [..., D]``.

        ``token_mask`` (bool, ``x.shape[:-1]``, True = a real token): masked tokens are not
        dispatched, their output is zero, and they count nowhere (loads, losses, bias
        updates, assignment, stats). ``token_ids`` (int, ``x.shape[:-1]``) feed hash
        routing; ``token_groups`` (int, ``x.shape[:-1]``) name each token's group for
        per-group losses. Without ``token_mask`` and ``token_ids``, a layer inside a
        swapped or converted HF model takes both from the model's own inputs
        (``token_source``, see :mod:`moebal.hf.tokens`).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [..., {self.d_model}], got {tuple(x.shape)}")
        if token_mask is None and token_ids is None and self.token_source is not None:
            token_mask, token_ids = self.token_source.tokens(x.shape[:-1])
        for name, t in (("token_mask", token_mask), ("token_ids", token_ids), ("token_groups", token_groups)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != x.shape[:-1]):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have the shape of x without its last dim {tuple(x.shape[:-1])}, got {got}")
        if token_mask is not None and token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask must be a bool tensor (True = a real token; use mask.bool()), got {token_mask.dtype}")
        if token_mask is None:
            y = decode_forward(self, x)  # eval, no gradient, eager CPU: the decode step in one function
            if y is not None:
                return y
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        seq_len = shape[-2] if x.dim() >= 3 else None
        flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
        routing = self.router(
            x_TD, seq_len=seq_len, token_mask=flat(token_mask), token_ids=flat(token_ids), token_groups=flat(token_groups),
            causal=self.causal,
        )
        device_type = x_TD.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        if autocast_on and x_TD.dtype != torch.float64:
            # as nn.Linear under autocast: the GEMMs' operands in the autocast dtype (the experts
            # cast their weights to the rows' dtype), fp32 master weights get fp32 gradients
            x_TD = x_TD.to(torch.get_autocast_dtype(device_type))
        indices_TK, null_TK = routing.indices, None
        if self.router.num_null_experts:  # a null pick is never dispatched
            null_TK = indices_TK >= self.num_experts
            indices_TK = torch.where(null_TK, -1, indices_TK)
        if routing.pair_based:  # 0..E experts per token: R = the pairs' rows, not T*W
            if self.capacity_factor is not None:
                raise ValueError("a pair-based router (expert choice, thresholds) needs capacity_factor=None on the layer")
            plan = build_pair_plan(indices_TK, self.num_experts, routing.num_rows)
        else:
            plan = build_plan(
                indices_TK, self.num_experts, self.capacity(x_TD.shape[0]), routing.weights, self.drop_policy,
                backend=self.backend,
            )
        if self.experts.path == "fused_gather":
            if resolve_backend(self.backend, x_TD.device) != "triton":
                raise ValueError(
                    f"experts.path='fused_gather' runs the Triton gather-GEMM kernel, but backend={self.backend!r} "
                    f"resolves to 'torch' for {x_TD.device.type} tensors; use backend='triton' (CUDA, or the CPU "
                    "under TRITON_INTERPRET=1) or another experts.path"
                )
            with torch.autocast(device_type, enabled=False):
                ys_RD = self.experts.forward_tokens(x_TD, plan)
        else:
            xs_RD = dispatch_rows(x_TD, plan, self.backend)
            # x_TD already has the compute dtype; without autocast on, no context to enter (a decode step's µs)
            with torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext():
                ys_RD = self.experts(xs_RD, plan)
        y_TD = combine_rows(ys_RD, plan, routing.weights, self.backend)
        if null_TK is not None and self.null_expert == "identity":
            w_T1 = torch.where(null_TK, routing.weights, 0.0).sum(dim=-1, keepdim=True)
            y_TD = y_TD + (w_T1 * x_TD.float()).to(y_TD.dtype)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        if token_mask is not None:  # a padding token's output is zero, whatever the shared experts say
            y_TD = torch.where(token_mask.reshape(-1, 1), y_TD, 0.0)
        if routing.replayed:  # a non-reentrant checkpoint's recompute: the first pass already logged
            return y_TD.view(shape[:-1] + (self.d_model,))
        self.aux_loss = routing.aux_loss
        self.last_stats = BalanceStats(
            load=plan.counts_E, kept=plan.kept_E, num_tokens=x_TD.shape[0], top_k=self.top_k,
            nonfinite_tokens=routing.nonfinite_tokens,
            masked_tokens=(~token_mask).sum() if token_mask is not None else _ZERO,
            null_pairs=null_TK.sum() if null_TK is not None else _ZERO,
            indices=indices_TK, token_mask=flat(token_mask),
        )
        return y_TD.view(shape[:-1] + (self.d_model,))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, backend={self.backend!r}"
            + (f", num_null_experts={self.router.num_null_experts}, null_expert={self.null_expert!r}"
               if self.router.num_null_experts else "")
        )
