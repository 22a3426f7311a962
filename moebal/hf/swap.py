"""swap_ffn: replace the dense FFNs of a transformers model with moebal.MoE layers.

Sparse upcycling (Komatsuzaki et al., ICLR 2023): every expert starts as a copy of the
dense FFN and the router is fresh. With top-k weights renormalised to sum 1 every token
gets ``sum_k w_k * FFN(x) = FFN(x)``, so the upcycled model computes the dense model's
logits at initialisation (up to float rounding; exactly so with a dropless layer).

FFNs are recognised by structure and module type, not by class name:

- gated (Llama, Mistral, Qwen2, Qwen3, ...): ``gate_proj``/``up_proj``/``down_proj``
  ``nn.Linear`` plus a SiLU ``act_fn`` -> SwiGLU experts; optional biases (``mlp_bias``).
- GPT-2: ``c_fc``/``c_proj`` ``Conv1D`` (weights already laid out for ``x @ W``), a GELU
  ``act`` and ``dropout`` -> GELU experts with biases. GPT-2's ``gelu_new`` is the tanh
  approximation: the experts use ``activation="gelu_tanh"``, which agrees with it to a
  few fp32 ulps (torch's fused kernel vs HF's Python formula), not bit for bit.
- ``fc1``/``fc2`` ``nn.Linear`` with ``activation_fn`` (Phi) -> GELU experts with biases.

A module with any other child (a norm inside the MLP, say) is not matched, so no part of
an FFN is ever dropped unseen. Dropout on the FFN output is kept (:class:`MoEWithDropout`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from moebal.hf._keys import ConversionError, Rule, same, transpose_last2, translate
from moebal.hf._models import Replacement, SwapReport, activation_name, find_layer_lists, set_submodule
from moebal.hf.tokens import attach_token_source
from moebal.layer import MoE
from moebal.router import Router, make_router

__all__ = ["swap_ffn", "MoEWithDropout", "DenseSpec", "match_dense_ffn"]


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


@dataclass(frozen=True)
class DenseSpec:
    """A dense FFN recognised by structure: sizes, activation, and how its keys map to experts."""

    kind: str  # "gated", "conv1d" or "fc"
    d_model: int
    d_ff: int
    activation: str  # moebal activation name
    bias: bool
    dropout: float
    w_in: tuple[str, ...]  # state-dict keys forming w_in (gate then up for gated)
    w_out: str
    b_in: tuple[str, ...]
    b_out: str | None
    layout: str  # "linear" ([out, in], needs a transpose) or "conv1d" ([in, out])


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(m, Conv1D)


def _has_bias(*mods) -> bool:
    flags = {m.bias is not None for m in mods}
    if len(flags) > 1:
        names = [type(m).__name__ for m in mods]
        raise ConversionError(f"some projections of the FFN have biases and some not: {names}")
    return flags.pop()


def _dropout_p(module: nn.Module, name: str | None) -> float:
    if name is None or not hasattr(module, name):
        return 0.0
    drop = getattr(module, name)
    if not isinstance(drop, nn.Dropout):
        raise ConversionError(f"{type(module).__name__}.{name} is {type(drop).__name__}, expected nn.Dropout")
    return float(drop.p)


# (kind, projection names, activation attribute, dropout attribute, projection test)
_PATTERNS = (
    ("gated", ("gate_proj", "up_proj", "down_proj"), "act_fn", None, _is_linear),
    ("conv1d", ("c_fc", "c_proj"), "act", "dropout", _is_conv1d),
    ("fc", ("fc1", "fc2"), "activation_fn", None, _is_linear),
)


def match_dense_ffn(module: nn.Module) -> DenseSpec | None:
    """The :class:`DenseSpec` of ``module`` when it is a dense FFN moebal knows, else None.

    Raises :class:`ConversionError` for a module that has an FFN's structure but something
    moebal cannot represent (e.g. a GeGLU gate, an activation moebal lacks).
    """
    children = dict(module.named_children())
    for kind, projs, act_attr, drop_attr, is_proj in _PATTERNS:
        if not all(p in children and is_proj(children[p]) for p in projs):
            continue
        allowed = set(projs) | {act_attr} | ({drop_attr} if drop_attr else set())
        extra = sorted(set(children) - allowed)
        if extra or act_attr not in children:
            raise ConversionError(
                f"{type(module).__name__} looks like a {kind} FFN but has children moebal would drop or lacks "
                f"its activation: unexpected {extra or '-'}, activation {act_attr!r} present: {act_attr in children}"
            )
        act = activation_name(children[act_attr])
        name = type(module).__name__
        if kind == "gated":
            gate, up, down = (children[p] for p in projs)
            if act != "silu":
                raise ConversionError(
                    f"{name}: gated FFN with activation {type(children[act_attr]).__name__}; moebal's gated "
                    "experts are SwiGLU (SiLU gate) only"
                )
            bias = _has_bias(gate, up, down)
            return DenseSpec(
                kind, gate.in_features, gate.out_features, "swiglu", bias, 0.0,
                ("gate_proj.weight", "up_proj.weight"), "down_proj.weight",
                ("gate_proj.bias", "up_proj.bias") if bias else (), "down_proj.bias" if bias else None, "linear",
            )
        if act not in ("gelu", "gelu_tanh"):
            raise ConversionError(
                f"{name}: FFN activation {type(children[act_attr]).__name__} is not one moebal has "
                "(SwiGLU, exact GELU, tanh GELU)"
            )
        fc_in, fc_out = (children[p] for p in projs)
        bias = _has_bias(fc_in, fc_out)
        if kind == "conv1d":
            d_model, d_ff = fc_in.weight.shape
        else:
            d_ff, d_model = fc_in.weight.shape
        return DenseSpec(
            kind, d_model, d_ff, act, bias, _dropout_p(module, drop_attr),
            (f"{projs[0]}.weight",), f"{projs[1]}.weight",
            (f"{projs[0]}.bias",) if bias else (), f"{projs[1]}.bias" if bias else None,
            "conv1d" if kind == "conv1d" else "linear",
        )
    return None


def _upcycle_rules(spec: DenseSpec, num_experts: int) -> list[Rule]:
    """Rules copying the dense weights into every expert (``[E, ...]`` stacks for ``x @ W``)."""
    E = num_experts
    orient = same if spec.layout == "conv1d" else transpose_last2

    def w_in(*ws):
        return torch.cat([orient(w) for w in ws], dim=1).unsqueeze(0).expand(E, -1, -1)

    def w_out(w):
        return orient(w).unsqueeze(0).expand(E, -1, -1)

    def b_in(*bs):
        return torch.cat(bs).unsqueeze(0).expand(E, -1)

    def b_out(b):
        return b.unsqueeze(0).expand(E, -1)

    rules = [Rule(spec.w_in, ("experts.w_in_EDH",), w_in), Rule((spec.w_out,), ("experts.w_out_EFD",), w_out)]
    if spec.bias:
        rules += [Rule(spec.b_in, ("experts.b_in_EH",), b_in), Rule((spec.b_out,), ("experts.b_out_ED",), b_out)]
    return rules


def _router_for(router, d_model: int, num_experts: int, top_k: int, upcycle: bool) -> Router:
    if isinstance(router, Router):  # a template: each layer gets its own copy with a fresh gate
        r = copy.deepcopy(router)
        r.gate.reset_parameters()
    elif callable(router) and not isinstance(router, str):
        r = router()
        if not isinstance(r, Router):
            raise TypeError(f"router factory must return a moebal.Router, got {type(r).__name__}")
    else:
        r = make_router(router, d_model, num_experts, top_k)
        if upcycle:
            r.renormalize = True
    make_router(r, d_model, num_experts, top_k)  # validates the sizes
    if upcycle and (not r.renormalize or r.scale != 1.0):
        raise ConversionError(
            f"upcycling needs top-k weights that sum to 1 (renormalize=True, scale=1.0); the router has "
            f"renormalize={r.renormalize}, scale={r.scale}"
        )
    return r


def _build_moe(spec: DenseSpec, num_experts, top_k, router, upcycle, moe_kwargs) -> MoE:
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
    r = _router_for(router, spec.d_model, num_experts, top_k, upcycle)
    args = (spec.d_model, d_ff, num_experts, top_k)
    if spec.dropout > 0:
        return MoEWithDropout(*args, router=r, activation=activation, ffn_bias=ffn_bias, dropout=spec.dropout, **kw)
    return MoE(*args, router=r, activation=activation, ffn_bias=ffn_bias, **kw)


def _place_like(moe: MoE, ffn: nn.Module) -> MoE:
    """Same device and training mode as ``ffn``; experts in its dtype, the router kept fp32."""
    ref = next(ffn.parameters())
    moe.to(device=ref.device)
    for part in (moe.experts, moe.shared):
        if part is not None:
            part.to(dtype=ref.dtype)
    return moe.train(ffn.training)


def _is_moe_block(module: nn.Module) -> bool:
    names = dict(module.named_children())
    return "experts" in names and ("gate" in names or "router" in names)


def _scan(model: nn.Module) -> list:
    """Decoder layer stacks and, per layer, its FFN-like children with what each one is:
    a :class:`DenseSpec`, a ConversionError (FFN-shaped but not representable), or a
    reason string (already an MoE)."""
    stacks = []
    for list_name, layer_list in find_layer_lists(model):
        entries = []
        for i, layer in enumerate(layer_list):
            prefix = f"{list_name}.{i}" if list_name else str(i)
            found = []
            for child_name, child in layer.named_children():
                path = f"{prefix}.{child_name}"
                if isinstance(child, MoE):
                    found.append((path, child, f"already a moebal.MoE ({type(child).__name__})"))
                elif _is_moe_block(child):
                    found.append((path, child, f"already an MoE block ({type(child).__name__}); convert it "
                                               "with moebal.hf.convert_moe_blocks"))
                else:
                    try:
                        spec = match_dense_ffn(child)
                    except ConversionError as err:
                        spec = err
                    if spec is not None:
                        found.append((path, child, spec))
            entries.append((i, prefix, layer, found))
        if any(found for *_, found in entries):
            stacks.append((list_name, entries))
    return stacks


def _refuse_meta_weights(stacks: list, wanted: list[int] | None) -> None:
    """Upcycling copies the dense weights: refuse, before touching anything, FFNs whose
    weights live on the meta device (shapes only, no values to copy)."""
    meta = [
        path
        for _, entries in stacks
        for i, _, _, found in entries
        if wanted is None or i in wanted
        for path, ffn, spec in found
        if isinstance(spec, DenseSpec) and any(p.is_meta for p in ffn.parameters())
    ]
    if meta:
        raise ValueError(
            f"upcycle=True copies each dense FFN into every expert, but {', '.join(meta)} "
            f"{'has its' if len(meta) == 1 else 'have their'} weights on the meta device (shapes only, no values). "
            "Load the dense weights first (from_pretrained, or model.to_empty(device=...) then "
            "load_state_dict(...)) and swap after; or pass upcycle=False for fresh experts, then "
            "model.to_empty(device=...) and reset_parameters() or load_state_dict(...)."
        )


def swap_ffn(
    model: nn.Module,
    num_experts: int,
    top_k: int,
    router: str | Router | Callable[[], Router] = "aux_loss",
    layers: Iterable[int] | None = None,
    upcycle: bool = True,
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
        **moe_kwargs: passed to ``moebal.MoE`` (``capacity_factor``, ``backend``, ``d_ff``, ...).

    Returns:
        A :class:`SwapReport`: (layer index, module path, old class, new class) per
        replacement, plus each layer left alone and why. The model's ``attention_mask``
        and ``input_ids`` reach every new layer (:func:`moebal.hf.attach_token_source`):
        padding is neither routed nor counted.

    Raises:
        ConversionError: nothing matched, a requested layer has no dense FFN, or an FFN
        has a structure moebal cannot represent.
        ValueError: ``upcycle=True`` on FFNs whose weights are on the meta device (nothing
        to copy); the model is left untouched.
    """
    wanted = None if layers is None else sorted(set(int(i) for i in layers))
    stacks = _scan(model)
    if not stacks:
        raise ConversionError(
            f"no decoder layer list with a recognisable FFN in {type(model).__name__}; moebal matches gated "
            "gate/up/down MLPs, GPT-2 Conv1D MLPs and fc1/fc2 MLPs"
        )
    if wanted is not None:
        size = max(len(entries) for _, entries in stacks)
        bad = [i for i in wanted if not 0 <= i < size]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {size} decoder layers")

    if upcycle:
        _refuse_meta_weights(stacks, wanted)

    report = SwapReport()
    for _, entries in stacks:
        for i, prefix, layer, found in entries:
            if wanted is not None and i not in wanted:
                report.skipped.append((i, prefix, "not in layers"))
                continue
            dense = [(path, child, spec) for path, child, spec in found if isinstance(spec, DenseSpec)]
            for path, child, spec in found:
                if isinstance(spec, ConversionError):
                    raise ConversionError(f"layer {i}, {path}: {spec}")
                if isinstance(spec, str):
                    report.skipped.append((i, path, spec))
            if not dense:
                if wanted is not None:
                    raise ConversionError(
                        f"layer {i} ({type(layer).__name__}) has no dense FFN moebal recognises; children: "
                        + ", ".join(f"{n}: {type(c).__name__}" for n, c in layer.named_children())
                    )
                if not found:
                    report.skipped.append((i, prefix, "no dense FFN recognised"))
                continue
            for path, ffn, spec in dense:
                moe = _build_moe(spec, num_experts, top_k, router, upcycle, moe_kwargs)
                if upcycle:
                    router_keys = [k for k in moe.state_dict() if k.startswith("router.")]
                    translate(ffn, moe, _upcycle_rules(spec, num_experts), fresh=router_keys,
                              what=f"upcycling {path} ({type(ffn).__name__})")
                moe = _place_like(moe, ffn)
                set_submodule(model, path, moe)
                report.replaced.append(Replacement(i, path, type(ffn).__name__, type(moe).__name__, upcycle))
    if not report.replaced:
        raise ConversionError("swap_ffn replaced nothing:\n" + str(report))
    attach_token_source(model)
    return report
