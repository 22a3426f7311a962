"""swap_ffn: replace the dense FFNs of a transformers model with moebal.MoE layers.

Sparse upcycling (Komatsuzaki et al., ICLR 2023): every expert starts as a copy of the
dense FFN and the router is fresh. With top-k weights renormalised to sum 1 every token
gets ``sum_k w_k * FFN(x) = FFN(x)``, so the upcycled model computes the dense model's
logits at initialisation (up to float rounding; exactly so with a dropless layer).

FFNs are recognised by structure and module type, not by class name, through the
declarative patterns of :mod:`moebal.hf.ffn_patterns` (gate/up/down and fused gate-up
MLPs with a SiLU or tanh-GELU gate, GPT-2/GPTBigCode/Starcoder2 ``c_fc``/``c_proj``,
GPT-NeoX/Falcon/Bloom ``dense_h_to_4h``/``dense_4h_to_h``, GPT-J ``fc_in``/``fc_out``,
Phi ``fc1``/``fc2``, OPT's ``fc1``/``fc2`` on the decoder layer itself);
:func:`moebal.hf.register_ffn` adds one. A module with a child no pattern names (a norm
inside the MLP, say) is not matched, so no part of an FFN is ever dropped unseen. Dropout
on the FFN output is kept (:class:`MoEWithDropout`); Bloom's MLP, which adds the residual
itself, becomes a :class:`MoEWithResidual`. GPT-2's ``gelu_new`` and Bloom's GELU are the
tanh approximation written in Python: the experts use ``activation="gelu_tanh"``, which
agrees with them to a few fp32 ulps (torch's fused kernel vs the Python formula).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

from moebal.hf._keys import ConversionError, Rule, same, transpose_last2, translate
from moebal.hf._models import Replacement, SwapReport, find_layer_lists, set_submodule
from moebal.hf.ffn_patterns import DenseSpec, describe_mlp_like, match_dense_ffn
from moebal.hf.tokens import attach_token_source
from moebal.layer import MoE
from moebal.router import Router, make_router

__all__ = ["swap_ffn", "MoEWithDropout", "MoEWithResidual", "DenseSpec", "match_dense_ffn"]


class MoEWithDropout(MoE):
    """``moebal.MoE`` followed by the dropout the replaced FFN applied to its output."""

    def __init__(self, *args, dropout: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        token_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = super().forward(x, token_mask=token_mask, token_ids=token_ids, token_groups=token_groups)
        return self.dropout(y)  # masked tokens stay zero


class MoEWithResidual(MoEWithDropout):
    """Bloom's MLP contract: ``forward(x, residual)`` returns ``residual + dropout(MoE(x))``."""

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        token_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return residual + super().forward(x, token_mask=token_mask, token_ids=token_ids, token_groups=token_groups)


class _FFNView(nn.Module):
    """The children of a decoder layer that form its inline FFN, as a module of their own
    (for the state-dict translation; the layer keeps owning them)."""

    def __init__(self, layer: nn.Module, names: tuple[str, ...]):
        super().__init__()
        for n in names:
            self.add_module(n, getattr(layer, n))


def _upcycle_rules(spec: DenseSpec, num_experts: int) -> list[Rule]:
    """Rules copying the dense weights into every expert (``[E, ...]`` stacks for ``x @ W``)."""
    E = num_experts
    orient = same if spec.layout == "conv1d" else transpose_last2
    swap_halves = spec.fused_order == "up_gate"  # moebal's gated w_in is [gate | up]

    def gate_first(t):  # the last dim of a fused up-gate projection, reordered
        return torch.cat(t.chunk(2, dim=-1)[::-1], dim=-1) if swap_halves else t

    def w_in(*ws):
        return gate_first(torch.cat([orient(w) for w in ws], dim=1)).unsqueeze(0).expand(E, -1, -1)

    def w_out(w):
        return orient(w).unsqueeze(0).expand(E, -1, -1)

    def b_in(*bs):
        return gate_first(torch.cat(bs)).unsqueeze(0).expand(E, -1)

    def b_out(b):
        return b.unsqueeze(0).expand(E, -1)

    rules = [Rule(spec.w_in, ("experts.w_in_EDH",), w_in), Rule((spec.w_out,), ("experts.w_out_EFD",), w_out)]
    if spec.bias:
        rules += [Rule(spec.b_in, ("experts.b_in_EH",), b_in), Rule((spec.b_out,), ("experts.b_out_ED",), b_out)]
    return rules


def _router_for(
    router, d_model: int, num_experts: int, top_k: int, upcycle: bool, router_kwargs: dict, num_null_experts=None
) -> Router:
    if isinstance(router, Router):  # a template: each layer gets its own copy with a fresh gate
        r = copy.deepcopy(router)
        r.gate.reset_parameters()
    elif callable(router) and not isinstance(router, str):
        r = router()
        if not isinstance(r, Router):
            raise TypeError(f"router factory must return a moebal.Router, got {type(r).__name__}")
    else:
        options = dict(router_kwargs)
        if upcycle:  # an explicit renormalize=False is the user's and is refused below
            options.setdefault("renormalize", True)
        r = make_router(router, d_model, num_experts, top_k, num_null_experts=num_null_experts, **options)
    make_router(r, d_model, num_experts, top_k)  # validates the sizes
    if upcycle and (not r.renormalize or r.scale != 1.0):
        raise ConversionError(
            f"upcycling needs top-k weights that sum to 1 (renormalize=True, scale=1.0); the router has "
            f"renormalize={r.renormalize}, scale={r.scale}"
        )
    return r


def _build_moe(spec: DenseSpec, num_experts, top_k, router, upcycle, moe_kwargs, router_kwargs) -> MoE:
    kw = dict(moe_kwargs)
    d_ff = kw.pop("d_ff", spec.d_ff)
    activation = kw.pop("activation", spec.activation)
    ffn_bias = kw.pop("ffn_bias", spec.bias)
    if upcycle:
        wrong = {
            k: (v, want)
            for k, v, want in (("d_ff", d_ff, spec.d_ff), ("activation", activation, spec.activation),
                               ("ffn_bias", ffn_bias, spec.bias))
            if v != want
        }
        if kw.get("num_shared_experts", 0):
            wrong["num_shared_experts"] = (kw["num_shared_experts"], 0)
        if wrong:
            raise ConversionError(
                "upcycling copies the dense FFN into every expert, so these must match it "
                + ", ".join(f"{k}={v!r} (dense: {want!r})" for k, (v, want) in wrong.items())
                + "; pass upcycle=False for freshly initialised experts"
            )
    r = _router_for(router, spec.d_model, num_experts, top_k, upcycle, router_kwargs, kw.get("num_null_experts"))
    args = (spec.d_model, d_ff, num_experts, top_k)
    if spec.residual:
        return MoEWithResidual(*args, router=r, activation=activation, ffn_bias=ffn_bias, dropout=spec.dropout, **kw)
    if spec.dropout > 0:
        return MoEWithDropout(*args, router=r, activation=activation, ffn_bias=ffn_bias, dropout=spec.dropout, **kw)
    return MoE(*args, router=r, activation=activation, ffn_bias=ffn_bias, **kw)


def _place_like(moe: MoE, ffn: nn.Module, spec: DenseSpec) -> MoE:
    """Same device and training mode as ``ffn``; experts in its dtype, the router kept fp32."""
    ref = _params_of(ffn, spec)[0]
    moe.to(device=ref.device)
    for part in (moe.experts, moe.shared):
        if part is not None:
            part.to(dtype=ref.dtype)
    return moe.train(ffn.training)


def _is_moe_block(module: nn.Module) -> bool:
    names = dict(module.named_children())
    return "experts" in names and ("gate" in names or "router" in names)


def _classify(child: nn.Module):
    """What a decoder layer's child is: a DenseSpec, a ConversionError (FFN-shaped but not
    representable), a reason string (already an MoE) or None (not an FFN)."""
    if isinstance(child, MoE):
        return f"already a moebal.MoE ({type(child).__name__})"
    if _is_moe_block(child):
        return f"already an MoE block ({type(child).__name__}); convert it with moebal.hf.convert_moe_blocks"
    try:
        return match_dense_ffn(child)
    except ConversionError as err:
        return err


def _scan(model: nn.Module) -> list:
    """Decoder layer stacks and, per layer, its FFNs as ``(path, module, what)`` with what
    :func:`_classify` says. An FFN living on the layer itself (OPT) is looked for only when
    no child is one; its module is the layer and its path names where the MoE goes."""
    stacks = []
    for list_name, layer_list in find_layer_lists(model):
        entries = []
        for i, layer in enumerate(layer_list):
            prefix = f"{list_name}.{i}" if list_name else str(i)
            found = []
            for child_name, child in layer.named_children():
                what = _classify(child)
                if what is not None:
                    found.append((f"{prefix}.{child_name}", child, what))
            if not found:
                try:
                    spec = match_dense_ffn(layer, inline=True)
                except ConversionError as err:
                    spec = err
                if spec is not None:
                    where = spec.inline[0] if isinstance(spec, DenseSpec) else "(inline FFN)"
                    found.append((f"{prefix}.{where}", layer, spec))
            entries.append((i, prefix, layer, found))
        if any(found for *_, found in entries):
            stacks.append((list_name, entries))
    return stacks


def _params_of(ffn: nn.Module, spec: DenseSpec) -> list[torch.Tensor]:
    """The FFN's own parameters (only its children's, for an FFN living on the layer)."""
    if spec.inline:
        return [p for n in spec.inline for p in getattr(ffn, n).parameters()]
    return list(ffn.parameters())


def _refuse_meta_weights(stacks: list, wanted: list[int] | None) -> None:
    """Upcycling copies the dense weights: refuse, before touching anything, FFNs whose
    weights live on the meta device (shapes only, no values to copy)."""
    meta = [
        path
        for _, entries in stacks
        for i, _, _, found in entries
        if wanted is None or i in wanted
        for path, ffn, spec in found
        if isinstance(spec, DenseSpec) and any(p.is_meta for p in _params_of(ffn, spec))
    ]
    if meta:
        raise ValueError(
            f"upcycle=True copies each dense FFN into every expert, but {', '.join(meta)} "
            f"{'has its' if len(meta) == 1 else 'have their'} weights on the meta device (shapes only, no values). "
            "Load the dense weights first (from_pretrained, or model.to_empty(device=...) then "
            "load_state_dict(...)) and swap after; or pass upcycle=False for fresh experts, then "
            "model.to_empty(device=...) and reset_parameters() or load_state_dict(...)."
        )


def _nothing_matched(model: nn.Module) -> ConversionError:
    seen = describe_mlp_like(model)
    if not find_layer_lists(model):
        where = "no decoder layer list (an nn.ModuleList of same-class layers)"
    else:
        where = "no decoder layer list with a recognisable FFN"
    saw = ("; MLP-like modules seen: " + "; ".join(seen)) if seen else "; no MLP-like module (two or more projections)"
    return ConversionError(
        f"{where} in {type(model).__name__}{saw}. Describe an FFN moebal does not know with "
        "moebal.hf.register_ffn(name, w_in=..., w_out=..., act=... or activation=..., gated=..., dropout=...)"
    )


def swap_ffn(
    model: nn.Module,
    num_experts: int,
    top_k: int,
    router: str | Router | Callable[[], Router] = "aux_loss",
    layers: Iterable[int] | None = None,
    upcycle: bool = True,
    router_kwargs: dict | None = None,
    **moe_kwargs,
) -> SwapReport:
    """Replace the dense FFN of each decoder layer of ``model`` with a ``moebal.MoE``.

    Args:
        model: a transformers model (or any module whose layers sit in an ``nn.ModuleList``).
        num_experts, top_k: E and K of every new layer.
        router: ``"aux_loss"``, ``"loss_free"``, ``"base"``, a ``moebal.Router`` used as a
            template (each layer gets a deep copy with a freshly initialised gate), or a
            zero-argument factory returning a Router.
        layers: indices of the decoder layers to swap (default: every layer with a dense FFN).
        upcycle: copy the dense weights into every expert (sparse upcycling) and force
            renormalised top-k weights, so the model's output is unchanged at initialisation
            as long as no capacity drops tokens. False: freshly initialised experts.
            With ``top_k=1`` the renormalised weight is always 1, so the router then learns
            only from its balancing policy, not from the task loss: prefer ``top_k >= 2``.
        router_kwargs: options of a named router, as :func:`moebal.router.make_router` takes
            them (the policy's fields and Router arguments), e.g.
            ``router="loss_free", router_kwargs={"rate": 1e-2, "update": "manual"}``.
            A ``TypeError`` with a Router instance or factory (configure those directly).
        **moe_kwargs: passed to ``moebal.MoE`` (``capacity_factor``, ``backend``, ``d_ff``, ...).

    Returns:
        A :class:`SwapReport`: (layer index, module path, old class, new class) per
        replacement, plus each layer left alone and why. The model's ``attention_mask``
        and ``input_ids`` reach every new layer (:func:`moebal.hf.attach_token_source`):
        padding is neither routed nor counted. An FFN living on the decoder layer (OPT's
        ``fc1``/``fc2``) becomes an MoE at ``fc1``, with ``nn.Identity`` at its activation
        and ``fc2``; its row reads ``OPTDecoderLayer.fc1/activation_fn/fc2``.

    Raises:
        ConversionError: nothing matched (the message lists the MLP-like modules it saw),
        a requested layer has no dense FFN, or an FFN has a structure moebal cannot
        represent; raised before anything is replaced.
        ValueError: ``upcycle=True`` on FFNs whose weights are on the meta device (nothing
        to copy); the model is left untouched.
        TypeError: ``router_kwargs`` with a Router instance or factory, or an option the
        named router does not take.
    """
    router_kwargs = dict(router_kwargs or {})
    if router_kwargs and not isinstance(router, str):
        raise TypeError(
            f"router_kwargs {sorted(router_kwargs)} configure a named router ('aux_loss', 'loss_free', 'base'); "
            f"router is a {type(router).__name__}: set the options on the Router itself"
        )
    wanted = None if layers is None else sorted(set(int(i) for i in layers))
    stacks = _scan(model)
    if not stacks:
        raise _nothing_matched(model)
    if wanted is not None:
        size = max(len(entries) for _, entries in stacks)
        bad = [i for i in wanted if not 0 <= i < size]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {size} decoder layers")

    report, todo = SwapReport(), []
    for _, entries in stacks:  # every check before the first replacement
        for i, prefix, layer, found in entries:
            if wanted is not None and i not in wanted:
                report.skipped.append((i, prefix, "not in layers"))
                continue
            for path, child, spec in found:
                if isinstance(spec, ConversionError):
                    raise ConversionError(f"layer {i}, {path}: {spec}")
                if isinstance(spec, str):
                    report.skipped.append((i, path, spec))
            dense = [(i, path, child, spec) for path, child, spec in found if isinstance(spec, DenseSpec)]
            if not dense:
                if wanted is not None:
                    raise ConversionError(
                        f"layer {i} ({type(layer).__name__}) has no dense FFN moebal recognises; children: "
                        + ", ".join(f"{n}: {type(c).__name__}" for n, c in layer.named_children())
                    )
                if not found:
                    report.skipped.append((i, prefix, "no dense FFN recognised"))
            todo += dense
    if upcycle:
        _refuse_meta_weights(stacks, wanted)

    for i, path, ffn, spec in todo:
        moe = _build_moe(spec, num_experts, top_k, router, upcycle, moe_kwargs, router_kwargs)
        if upcycle:
            src = _FFNView(ffn, spec.inline) if spec.inline else ffn
            router_keys = [k for k in moe.state_dict() if k.startswith("router.")]
            translate(src, moe, _upcycle_rules(spec, num_experts), fresh=router_keys,
                      what=f"upcycling {path} ({type(ffn).__name__})")
        moe = _place_like(moe, ffn, spec)
        old = type(ffn).__name__
        if spec.inline:
            old = f"{old}.{'/'.join(spec.inline[i] for i in (0, 2, 1))}"
            for name in spec.inline[1:]:
                setattr(ffn, name, nn.Identity())
        set_submodule(model, path, moe)
        report.replaced.append(Replacement(i, path, old, type(moe).__name__, upcycle))
    if not report.replaced:
        raise ConversionError("swap_ffn replaced nothing:\n" + str(report))
    attach_token_source(model)
    return report
