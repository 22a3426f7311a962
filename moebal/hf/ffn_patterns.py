"""Dense FFN patterns: how :func:`moebal.hf.swap_ffn` recognises an FFN and maps it to experts.

An :class:`FFNPattern` is declarative: the child names of the input and output
projections (``nn.Linear``, its subclasses, or transformers' ``Conv1D``), the child that
applies the nonlinearity (or the moebal activation when the forward calls a function),
whether the FFN is gated (``act(gate) * up``; two projections or one fused gate-up), the
output dropout, and two shapes of FFN other than ``y = FFN(x)``: Bloom's
``forward(x, residual)`` that adds the residual itself, and OPT's FFN that lives on the
decoder layer (``fc1 -> activation_fn -> fc2`` inside ``OPTDecoderLayer``, no MLP module).
:func:`register_ffn` adds a pattern for an FFN moebal does not know; registered patterns
are tried before the built-in ones.

Built in (``BUILTIN_PATTERNS``), each checked against the model's own forward by
``tests/test_hf_archs.py``:

========== ======================================= =================================
name       projections, activation child           models
========== ======================================= =================================
gated      gate_proj + up_proj, down_proj, act_fn  Llama, Mistral, Qwen2/3, Gemma 1-3
fused      gate_up_proj (gate first), down_proj,   Phi-3
           activation_fn
c_fc       c_fc, c_proj, act; dropout or           GPT-2 (Conv1D), GPTBigCode,
           residual_dropout                        Starcoder2 (Linear)
h_to_4h    dense_h_to_4h, dense_4h_to_h, act       GPT-NeoX, Falcon
bloom      dense_h_to_4h, dense_4h_to_h,           Bloom (adds the residual inside)
           gelu_impl; hidden_dropout
fc_in      fc_in, fc_out, act; dropout             GPT-J
fc         fc1, fc2, activation_fn                 Phi
inline_fc  fc1, fc2, activation_fn on the layer    OPT
========== ======================================= =================================

Activations: a SiLU gate gives ``"swiglu"``, a tanh-GELU gate (Gemma's
``gelu_pytorch_tanh``) ``"geglu"``; ungated ``"gelu"``, ``"gelu_tanh"`` (GPT-2's
``gelu_new``, Bloom's GELU) or ``"relu"`` (OPT). Anything else (an exact-GELU gate, a
dropout between the activation and the output projection, a module child no pattern
names) raises :class:`ConversionError`: no part of an FFN is ever dropped unseen.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from moebal.experts import ACTIVATIONS, GATED_ACTIVATIONS
from moebal.hf._keys import ConversionError
from moebal.hf._models import activation_name, find_layer_lists

__all__ = [
    "FFNPattern", "DenseSpec", "BUILTIN_PATTERNS", "register_ffn", "unregister_ffn", "ffn_patterns",
    "match_dense_ffn", "describe_mlp_like",
]

_FUSED_ORDERS = ("gate_up", "up_gate")
# the nonlinearity a child applies -> the experts' activation, gated or not
_GATED_OF = {"silu": "swiglu", "gelu_tanh": "geglu"}
_PLAIN = ("gelu", "gelu_tanh", "relu")


@dataclass(frozen=True)
class FFNPattern:
    """How to find one kind of dense FFN by its children, and what it computes.

    The FFN computes ``y = w_out(act(w_in(x)))``, or gated ``y = w_out(act(gate(x)) * up(x))``.

    Args:
        name: names the pattern in the registry and in :class:`DenseSpec`.
        w_in: child name of the input projection, or ``(gate, up)`` for a gated FFN with two.
        w_out: child name of the output projection.
        act: child name of the module applying the nonlinearity (to the gate when gated);
            its type names the activation (SiLU, GELU, tanh GELU, ReLU and transformers'
            equivalents).
        activation: the experts' activation (one of ``moebal.experts.ACTIVATIONS``) when no
            child applies it (the forward calls ``F.gelu``, say). With ``act`` too, the two
            must agree.
        gated: ``act(gate) * up``; implied by a ``(gate, up)`` pair. With one ``w_in`` it is
            a fused gate-up projection, split in ``fused_order``.
        fused_order: ``"gate_up"`` (first half is the gate, Phi-3) or ``"up_gate"``.
        dropout: names of the output dropout, an ``nn.Dropout`` child or a float attribute
            the forward applies to its output; the first present is used, none present is 0.
        residual: the forward is ``forward(x, residual)`` and returns
            ``residual + dropout(FFN(x))`` (Bloom).
        inline: the projections are children of the decoder layer itself, whose forward runs
            ``w_out(act(w_in(x)))`` (OPT). The swap puts the MoE at ``w_in`` and an
            ``nn.Identity`` at ``act`` and ``w_out``; only ungated FFNs with an ``act`` child.
    """

    name: str
    w_in: str | tuple[str, ...]
    w_out: str
    act: str | None = None
    activation: str | None = None
    gated: bool = False
    fused_order: str = "gate_up"
    dropout: str | tuple[str, ...] = ()
    residual: bool = False
    inline: bool = False

    def __post_init__(self):
        w_in = (self.w_in,) if isinstance(self.w_in, str) else tuple(self.w_in)
        dropout = (self.dropout,) if isinstance(self.dropout, str) else tuple(self.dropout)
        object.__setattr__(self, "w_in", w_in)
        object.__setattr__(self, "dropout", dropout)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        names = [*w_in, self.w_out] + ([self.act] if self.act else []) + list(dropout)
        if not all(isinstance(n, str) and n and "." not in n for n in names):
            raise ValueError(f"child names must be non-empty strings without '.', got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"child names must differ, got {names}")
        if len(w_in) not in (1, 2):
            raise ValueError(f"w_in must be one projection or a (gate, up) pair, got {w_in}")
        if len(w_in) == 2 and not self.gated:
            object.__setattr__(self, "gated", True)
        if self.fused_order not in _FUSED_ORDERS:
            raise ValueError(f"fused_order must be one of {_FUSED_ORDERS}, got {self.fused_order!r}")
        if self.act is None and self.activation is None:
            raise ValueError(f"pattern {self.name!r}: give act (the activation's child) or activation (its name)")
        if self.activation is not None:
            allowed = GATED_ACTIVATIONS if self.gated else tuple(a for a in ACTIVATIONS if a not in GATED_ACTIVATIONS)
            if self.activation not in allowed:
                raise ValueError(
                    f"pattern {self.name!r}: activation must be one of {allowed} for a "
                    f"{'gated' if self.gated else 'plain'} FFN, got {self.activation!r}"
                )
        if self.inline and (self.gated or self.act is None or self.residual or dropout):
            raise ValueError(
                f"pattern {self.name!r}: an inline FFN must be ungated with an act child, no residual and no "
                "dropout (the layer keeps its own forward; only w_in, act and w_out are replaced)"
            )

    @property
    def children(self) -> tuple[str, ...]:
        """The child names the FFN consists of (projections and activation)."""
        return (*self.w_in, self.w_out) + ((self.act,) if self.act else ())


@dataclass(frozen=True)
class DenseSpec:
    """A dense FFN recognised by a pattern: sizes, activation, and how its keys map to experts."""

    kind: str  # the FFNPattern's name
    d_model: int
    d_ff: int
    activation: str  # moebal activation name
    bias: bool
    dropout: float
    w_in: tuple[str, ...]  # state-dict keys forming w_in (gate then up for a gated pair)
    w_out: str
    b_in: tuple[str, ...]
    b_out: str | None
    layout: str  # "linear" ([out, in], needs a transpose) or "conv1d" ([in, out])
    fused_order: str | None = None  # a fused gate-up w_in: "gate_up" or "up_gate"
    residual: bool = False  # forward(x, residual) -> residual + dropout(FFN(x))
    inline: tuple[str, ...] = ()  # an FFN on the decoder layer: its children, w_in first


BUILTIN_PATTERNS = (
    FFNPattern("gated", ("gate_proj", "up_proj"), "down_proj", act="act_fn"),
    FFNPattern("fused", "gate_up_proj", "down_proj", act="activation_fn", gated=True),
    FFNPattern("c_fc", "c_fc", "c_proj", act="act", dropout=("dropout", "residual_dropout")),
    FFNPattern("h_to_4h", "dense_h_to_4h", "dense_4h_to_h", act="act"),
    FFNPattern("bloom", "dense_h_to_4h", "dense_4h_to_h", act="gelu_impl", dropout="hidden_dropout", residual=True),
    FFNPattern("fc_in", "fc_in", "fc_out", act="act", dropout="dropout"),
    FFNPattern("fc", "fc1", "fc2", act="activation_fn"),
    FFNPattern("inline_fc", "fc1", "fc2", act="activation_fn", inline=True),
)

_REGISTERED: dict[str, FFNPattern] = {}


def register_ffn(pattern: str | FFNPattern, /, *, replace: bool = False, **fields) -> FFNPattern:
    """Teach :func:`moebal.hf.swap_ffn` a dense FFN: ``register_ffn(FFNPattern(...))`` or
    ``register_ffn(name, w_in=..., w_out=..., act=..., ...)`` with :class:`FFNPattern`'s fields.

    Registered patterns are tried before the built-in ones, in registration order. A name
    already registered raises ``ValueError`` unless ``replace=True``. Returns the pattern.

    Example, for ``ToyFFN`` with children ``inp`` (Linear D->2F, gate half first), ``outp``
    (Linear F->D) and a forward ``outp(F.silu(g) * u)`` with ``g, u = inp(x).chunk(2, -1)``::

        moebal.hf.register_ffn("toy", w_in="inp", w_out="outp", activation="swiglu", gated=True)
    """
    if isinstance(pattern, FFNPattern):
        if fields:
            raise TypeError(f"give an FFNPattern or its fields, not both (got {sorted(fields)} too)")
    else:
        pattern = FFNPattern(pattern, **fields)
    if pattern.name in _REGISTERED and not replace:
        raise ValueError(f"an FFN pattern named {pattern.name!r} is registered; pass replace=True to replace it")
    _REGISTERED[pattern.name] = pattern
    return pattern


def unregister_ffn(name: str) -> FFNPattern:
    """Remove a pattern :func:`register_ffn` added (``KeyError`` if none has that name)."""
    if name not in _REGISTERED:
        raise KeyError(f"no registered FFN pattern named {name!r}; registered: {sorted(_REGISTERED)}")
    return _REGISTERED.pop(name)


def ffn_patterns() -> tuple[FFNPattern, ...]:
    """Every pattern in the order ``swap_ffn`` tries them: registered first, then built in."""
    return tuple(_REGISTERED.values()) + BUILTIN_PATTERNS


# --- matching ------------------------------------------------------------------------------


def _proj_layout(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return "conv1d" if isinstance(m, Conv1D) else None


def _required_inputs(module: nn.Module) -> int | None:
    """How many tensors ``module.forward`` requires (positional, no default), None if unknown."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def _dropout_p(module: nn.Module, names: tuple[str, ...], where: str) -> float:
    for name in names:
        if not hasattr(module, name):
            continue
        drop = getattr(module, name)
        if isinstance(drop, nn.Dropout):
            return float(drop.p)
        if isinstance(drop, (int, float)) and not isinstance(drop, bool):
            return float(drop)
        raise ConversionError(f"{where}.{name} is {type(drop).__name__}, expected nn.Dropout or a float probability")
    return 0.0


def _activation(p: FFNPattern, owner: nn.Module, where: str) -> str:
    """The experts' activation: from the act child's type, checked against ``p.activation``
    (a child of a type moebal does not know is taken at the pattern's word)."""
    if p.act is None:
        return p.activation
    act_mod = getattr(owner, p.act)
    act = activation_name(act_mod)
    kind = type(act_mod).__name__
    if act is None and p.activation is not None:
        return p.activation
    if p.gated:
        got = _GATED_OF.get(act)
        if got is None:
            raise ConversionError(
                f"{where}: gated FFN with activation {kind}; moebal's gated experts are SwiGLU (SiLU gate) and "
                "GeGLU (tanh-GELU gate) only"
            )
    else:
        got = act if act in _PLAIN else None
        if got is None:
            raise ConversionError(
                f"{where}: FFN activation {kind} is not one moebal has (SwiGLU, GeGLU, exact GELU, tanh GELU, ReLU)"
            )
    if p.activation is not None and p.activation != got:
        raise ConversionError(
            f"{where}: pattern {p.name!r} declares activation={p.activation!r}, but {kind} is {got!r}"
        )
    return got


def _match(p: FFNPattern, module: nn.Module, user: bool) -> DenseSpec | None:
    """``p``'s spec of ``module``; None when ``module`` lacks a child ``p`` names (or, for a
    built-in pattern, a projection is neither nn.Linear nor Conv1D); ConversionError when
    it has them all but something moebal cannot represent."""
    children = dict(module.named_children())
    name = type(module).__name__
    projs = [*p.w_in, p.w_out]
    if not all(n in children for n in p.children):
        return None
    layouts = {n: _proj_layout(children[n]) for n in projs}
    if None in layouts.values():
        if not user:
            return None
        bad = {n: type(children[n]).__name__ for n, lay in layouts.items() if lay is None}
        raise ConversionError(f"{name} (pattern {p.name!r}): projections {bad} are not nn.Linear or Conv1D")
    if len(set(layouts.values())) > 1:
        raise ConversionError(f"{name}: projections mix nn.Linear and Conv1D: {layouts}")
    layout = layouts[p.w_out]
    if not p.inline:
        allowed = set(p.children) | {d for d in p.dropout if isinstance(children.get(d), nn.Dropout)}
        extra = sorted(set(children) - allowed)
        if extra:
            raise ConversionError(
                f"{name} looks like a {p.name!r} FFN but has children moebal would drop: {extra} "
                f"(it knows {sorted(allowed)})"
            )
        n_in = _required_inputs(module)
        if n_in is not None and n_in != (2 if p.residual else 1):
            want = "forward(x, residual) adding the residual itself" if p.residual else "forward(x)"
            raise ConversionError(f"{name}: pattern {p.name!r} expects {want}, but its forward requires {n_in} inputs")
    act_drop = getattr(module, "activation_dropout", 0.0)
    if isinstance(act_drop, nn.Dropout):
        act_drop = act_drop.p
    if isinstance(act_drop, (int, float)) and act_drop > 0:
        raise ConversionError(
            f"{name}: activation_dropout={act_drop} drops hidden units between the activation and {p.w_out}; "
            "moebal's experts have no dropout inside"
        )
    activation = _activation(p, module, name)

    mods = [children[n] for n in projs]
    flags = {m.bias is not None for m in mods}
    if len(flags) > 1:
        raise ConversionError(f"{name}: some projections of the FFN have biases and some not: {projs}")
    bias = flags.pop()

    def in_out(m):  # (in, out) features of a projection
        return tuple(m.weight.shape[::-1]) if layout == "linear" else tuple(m.weight.shape)

    d_model, h = in_out(mods[0])
    fused = p.gated and len(p.w_in) == 1
    d_ff = h // 2 if fused else h
    shapes = [in_out(m) for m in mods]
    want = [(d_model, h)] * len(p.w_in) + [(d_ff, d_model)]
    if shapes != want or (fused and h % 2):
        raise ConversionError(f"{name}: projection (in, out) sizes {dict(zip(projs, shapes))} do not chain D->F->D")
    return DenseSpec(
        p.name, d_model, d_ff, activation, bias, 0.0 if p.inline else _dropout_p(module, p.dropout, name),
        tuple(f"{n}.weight" for n in p.w_in), f"{p.w_out}.weight",
        tuple(f"{n}.bias" for n in p.w_in) if bias else (), f"{p.w_out}.bias" if bias else None, layout,
        fused_order=p.fused_order if fused else None, residual=p.residual, inline=p.children if p.inline else (),
    )


def match_dense_ffn(module: nn.Module, inline: bool = False) -> DenseSpec | None:
    """The :class:`DenseSpec` of ``module`` when a pattern matches it, else None.

    ``inline=False`` tries the patterns of FFN modules (a decoder layer's ``mlp``),
    ``inline=True`` those of FFNs living on the decoder layer itself. Raises
    :class:`ConversionError` for a module that has a pattern's projections but something
    moebal cannot represent (an exact-GELU gate, an extra child, mismatched sizes).
    """
    user = set(_REGISTERED)
    for p in ffn_patterns():
        if p.inline == inline:
            spec = _match(p, module, p.name in user)
            if spec is not None:
                return spec
    return None


def describe_mlp_like(model: nn.Module, limit: int = 6) -> list[str]:
    """What an FFN might be, once per layer class: the modules in the first layer (itself
    included) that hold two or more projections, attention left out, as
    ``path (Class: child: Type, ...)``; one deeper than a child of the layer is marked
    nested (``swap_ffn`` replaces only the layer's children, or projections on the layer)."""
    seen, out = set(), []
    for list_name, layers in find_layer_lists(model):
        layer = layers[0]
        if type(layer) in seen:
            continue
        seen.add(type(layer))
        prefix = f"{list_name}.0" if list_name else "0"
        skip: list[str] = []
        for sub, mod in layer.named_modules():
            if any(sub == s or sub.startswith(s + ".") for s in skip):
                continue
            if "attn" in sub.rpartition(".")[2].lower() or "attention" in type(mod).__name__.lower():
                skip.append(sub)
                continue
            kids = dict(mod.named_children())
            if sum(_proj_layout(c) is not None for c in kids.values()) >= 2:
                desc = ", ".join(f"{n}: {type(c).__name__}" for n, c in kids.items())
                nested = " [nested: not a child of the layer]" if sub.count(".") >= 1 else ""
                out.append(f"{prefix}{'.' if sub else ''}{sub} ({type(mod).__name__}: {desc}){nested}")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])
