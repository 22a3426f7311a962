"""TokenSource: hand a transformers model's ``attention_mask`` and ``input_ids`` to its moebal layers.

Shape legend: B batch, S tokens of this forward (the current ones under a KV cache),
P tokens already in the cache; ``mask_BX`` is ``[B, P + S]`` (HF's 2-D mask), ``ids_BS`` is ``[B, S]``.

A swapped FFN is called as ``mlp(hidden_states)``: the decoder layer passes it neither the
padding mask nor the token ids. :func:`attach_token_source` hooks the model's entry points
(every module in it whose ``forward`` takes ``attention_mask`` and ``input_ids`` or
``inputs_embeds`` and that holds a moebal layer: ``LlamaForCausalLM`` and its
``LlamaModel``, say) and sets ``token_source`` on every ``moebal.MoE``. A layer called
without ``token_mask``/``token_ids`` asks ``token_source.tokens(x.shape[:-1])``.

- The forward pre-hook records the call's mask and ids (keywords or positional) as a
  :class:`_Frame` pushed on a stack; the forward hook (``always_call=True``) pops it. The
  innermost entry point running wins (a base model called by its causal-LM head records
  the same tensors; in an encoder-decoder each stack sees its own mask).
- ``attention_mask`` must be HF's 2-D ``[B, P + S]`` (bool, or ints/floats with nonzero =
  real token); the layer gets its last S columns, so KV-cache generation and left padding
  work. A 4-D or otherwise unmappable mask raises ``ValueError``: a mask is never dropped.
- Activation checkpointing recomputes a layer inside the backward pass, after the forward
  hook has popped the frame, and possibly after other forwards ran
  (``loss = model(a).loss + model(b).loss``). A finished frame therefore stays alive on
  the autograd graph of its forward's outputs, with the range of autograd sequence numbers
  that forward's nodes took. A recompute runs while the engine executes a node of the
  first pass (non-reentrant: the node whose saved tensor it rebuilds; reentrant: the
  ``CheckpointFunctionBackward``), so that node's sequence number names the frame, in
  both modes and whatever the order of forwards and backwards.
- Under ``torch.compile`` the hooks only push and pop, so ``fullgraph=True`` traces them
  (inference, and training without checkpointing). With transformers' checkpointing on
  (it graph-breaks, and its layers recompute in eager code) they run eagerly and record
  the sequence numbers as above. Checkpointing moebal cannot see under compile
  (``checkpoint_wrapper``, say) makes a recompute raise rather than guess its mask.
- A layer with a ``token_source`` called outside any hooked forward gets no mask; one
  whose input is not ``[B, S, D]`` or ``[B * S, D]`` for the forward's batch (a vision
  tower's MoE under a text mask) raises ``ValueError``.
- ``copy.deepcopy`` and pickling copy the hooks with the model: they are small objects
  holding the source, so the copy's hooks and layers share the copy's source. A copied
  source starts empty.
"""
from __future__ import annotations

import collections
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from moebal.layer import MoE
from moebal.recompute import in_backward

__all__ = ["TokenSource", "attach_token_source", "detach_token_source"]

_KEY = "moebal.token_frame"  # where a finished frame hangs in its output's grad_fn.metadata


def _params(cls: type) -> tuple[str, ...]:
    """Names of ``cls.forward``'s parameters after ``self``, in positional order."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def _is_entry_point(module: nn.Module) -> bool:
    names = _params(type(module))
    return "attention_mask" in names and ("input_ids" in names or "inputs_embeds" in names)


def _argument(params: tuple[str, ...], args: tuple, kwargs: dict, name: str):
    if name in kwargs:
        return kwargs[name]
    if name in params and params.index(name) < len(args):
        return args[params.index(name)]
    return None


@dataclass(eq=False)
class _Frame:
    """One hooked forward's tokens, and which autograd nodes it created."""

    owner: int  # id() of the hooked module
    depth: int  # frames under it on the stack
    mask_BX: torch.Tensor | None  # bool [B, P + S], True = real token
    ids_BS: torch.Tensor | None  # int [B, S]
    batch: int | None  # B and S of this forward's inputs (None: no tensor said)
    seq: int | None
    start: int = 0  # autograd sequence numbers of the nodes this forward created: [start, end)
    end: int = 0
    all_real: bool | None = None  # the mask holds no padding: read once, on the first no-grad CPU request

    def _no_padding(self) -> bool:
        """Whether a no-gradient eager CPU forward may drop its all-True mask: the same outputs,
        without the masking ops (a decode step's layers then take their unmasked fast path)."""
        if torch.is_grad_enabled() or self.mask_BX.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        if self.all_real is None:
            self.all_real = bool(self.mask_BX.all())
        return self.all_real

    def _fit(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
        B, S = self.batch, self.seq
        if tuple(shape) not in ((B, S), (B * S,)):
            return None
        t_BS = t[:, t.shape[1] - S:]
        return t_BS if len(shape) == 2 else t_BS.reshape(-1)

    def tokens(self, shape: torch.Size):
        mask = None
        if self.mask_BX is not None:
            fits = tuple(shape) in ((self.batch, self.seq), (self.batch * self.seq,))
            mask = None if fits and self._no_padding() else self._fit(self.mask_BX, shape)
            if mask is None and not fits:
                raise ValueError(
                    f"a moebal layer's input has token shape {tuple(shape)}, but the model's attention_mask "
                    f"{tuple(self.mask_BX.shape)} covers a batch of {self.batch} x {self.seq} current tokens: "
                    f"the layer must see [{self.batch}, {self.seq}, D] or [{self.batch * self.seq}, D] rows. "
                    "Pass token_mask to the layer yourself, or call moebal.hf.detach_token_source(model)"
                )
        ids = None if self.ids_BS is None else self._fit(self.ids_BS, shape)
        return mask, ids


def _frame(module: nn.Module, params: tuple[str, ...], args: tuple, kwargs: dict, depth: int) -> _Frame:
    mask, ids = _argument(params, args, kwargs, "attention_mask"), _argument(params, args, kwargs, "input_ids")
    embeds = _argument(params, args, kwargs, "inputs_embeds")
    name = type(module).__name__
    if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dim() != 2):
        ids = None  # not HF's [B, S] ids: a layer that needs them (hash routing) raises
    if ids is not None:
        batch, seq = ids.shape
    elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        batch, seq = embeds.shape[:2]
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
        batch, seq = mask.shape  # no inputs to size the forward: assume no cached tokens
    else:
        batch = seq = None
    if mask is not None:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(
                f"{name} got attention_mask of shape {shape}; moebal layers need HF's 2-D padding mask "
                "[batch, past + current tokens] (1 = real token) to leave padding out of routing. "
                "Pass a 2-D mask, or call moebal.hf.detach_token_source(model) and give each layer token_mask"
            )
        if batch is None or mask.shape[0] != batch or mask.shape[1] < seq:
            raise ValueError(
                f"{name} got attention_mask of shape {shape} for inputs of {batch} x {seq} tokens; a 2-D mask "
                "must be [batch, past + current tokens]"
            )
        mask = mask if mask.dtype == torch.bool else mask != 0
    return _Frame(id(module), depth, mask, ids, batch, seq)


def _output_nodes(output) -> list:
    if isinstance(output, torch.Tensor):
        values = [output]
    elif isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        values = []
    return [v.grad_fn for v in values if isinstance(v, torch.Tensor) and v.grad_fn is not None]


def _run_eager(fn, *args) -> None:  # made eager-only by _make_eager_only
    fn(*args)


def _recomputed(source: TokenSource) -> _Frame | None:  # reads the autograd engine: eager-only (_make_eager_only)
    """The finished frame whose forward created the autograd node executing now: the one a
    checkpoint's recompute belongs to. None outside a backward pass."""
    if not in_backward():
        return None
    node = torch._C._current_autograd_node()
    frames = []
    if node is not None:
        seq_nr = node._sequence_nr()
        frames = [f for f in (r() for r in source._done) if f is not None and f.start <= seq_nr < f.end]
    if not frames and source._unranged:
        raise RuntimeError(
            "a moebal layer is recomputed in the backward pass (activation checkpointing), but the model's forward "
            "ran under torch.compile with checkpointing moebal could not see, so the layer cannot tell which "
            "forward's attention_mask it belongs to. Enable checkpointing through transformers "
            "(model.gradient_checkpointing_enable()), or pass token_mask to the layers yourself"
        )
    return max(frames, key=lambda f: (f.start, f.depth), default=None)


def _needs_eager_hooks(module: nn.Module) -> bool:
    """Under torch.compile, a forward with transformers' checkpointing on (it graph-breaks,
    so its layers recompute in eager code) records its autograd nodes in eager hooks;
    others stay traceable (fullgraph inference and training without checkpointing)."""
    return (
        torch.compiler.is_compiling() and torch.is_grad_enabled()
        and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())
    )


class TokenSource:
    """The padding mask and token ids of the forward running now, for a model's moebal layers.

    Made and hooked in by :func:`attach_token_source`; layers read it through
    :meth:`tokens`.
    """

    _UNHELD = 8  # finished frames kept strongly when no output tensor carries their graph

    def __init__(self):
        _make_eager_only()  # a source exists (attached, copied or unpickled) before any layer reads it
        self._stack: list[_Frame] = []  # hooked forwards running now, innermost last
        self._done: list[weakref.ref] = []  # finished frames a checkpoint recompute may need
        self._unheld: collections.deque = collections.deque(maxlen=self._UNHELD)
        self._unranged = False  # a compiled forward with grad ran without recording its nodes

    def __getstate__(self):
        return {}  # forwards in flight and graphs belong to the original

    def __setstate__(self, state):
        self.__init__()

    def tokens(self, shape: torch.Size) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(token_mask, token_ids)`` for a layer whose input has token shape ``shape``.

        ``shape`` is ``x.shape[:-1]``: ``[B, S]``, or ``[B * S]`` for a block that flattens
        the batch. ``token_mask`` is bool of exactly ``shape`` (True = real token) or None
        when the model got no mask; ``token_ids`` is the int ids of exactly ``shape``, or
        None (inputs_embeds, or a shape they do not fit). Outside a hooked forward and its
        checkpoint recomputes both are None.

        Raises:
            ValueError: the model got a mask and ``shape`` is not its batch's token shape.
        """
        frame = self._stack[-1] if self._stack else _recomputed(self)
        return (None, None) if frame is None else frame.tokens(shape)

    def _pre_hook(self, module: nn.Module, params: tuple[str, ...], args: tuple, kwargs: dict) -> None:
        owner = id(module)
        for i, f in enumerate(self._stack):  # a frame of this module left by a forward that never returned
            if f.owner == owner:
                del self._stack[i:]
                break
        frame = _frame(module, params, args, kwargs, len(self._stack))
        if not torch.compiler.is_compiling():
            frame.start = torch._C._autograd._get_sequence_nr()
        elif torch.is_grad_enabled():
            self._unranged = True
        self._stack.append(frame)

    def _post_hook(self, module: nn.Module, args: tuple, output) -> None:
        if not self._stack or self._stack[-1].owner != id(module):
            return  # the pre-hook raised before pushing
        frame = self._stack.pop()
        if torch.compiler.is_compiling():
            return
        frame.end = torch._C._autograd._get_sequence_nr()
        if frame.end == frame.start:
            return  # no autograd node: nothing can recompute this forward
        nodes = _output_nodes(output)
        for node in nodes:  # the frame lives as long as the graph that may recompute it
            node.metadata[_KEY] = frame
        if not nodes:
            self._unheld.append(frame)
        self._done = [r for r in self._done if r() is not None] + [weakref.ref(frame)]


def _entry_points(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules()
        if _is_entry_point(m) and any(isinstance(layer, MoE) for layer in m.modules())
    ]


class _PreHook:
    """Forward pre-hook feeding ``source``; an object rather than a closure so that pickling
    and ``copy.deepcopy`` of the model copy it, with the source, along with the layers."""

    def __init__(self, source: TokenSource, params: tuple[str, ...]):
        self.source, self.params = source, params  # params: the hooked forward's, read at attach time

    def __call__(self, module, args, kwargs):
        if _needs_eager_hooks(module):
            _run_eager(self.source._pre_hook, module, self.params, args, kwargs)
        else:
            self.source._pre_hook(module, self.params, args, kwargs)


class _PostHook:
    def __init__(self, source: TokenSource):
        self.source = source

    def __call__(self, module, args, output):
        if _needs_eager_hooks(module):
            _run_eager(self.source._post_hook, module, args, output)
        else:
            self.source._post_hook(module, args, output)


def _hooks(module: nn.Module) -> tuple[list, list]:
    """This module's TokenSource pre-hooks and forward hooks, as (hook id, source) pairs."""
    return ([(hid, h.source) for hid, h in module._forward_pre_hooks.items() if isinstance(h, _PreHook)],
            [(hid, h.source) for hid, h in module._forward_hooks.items() if isinstance(h, _PostHook)])


def _unhook(module: nn.Module, keep: TokenSource | None) -> None:
    pre, post = _hooks(module)
    for hid, source in pre:
        if source is not keep:
            module._forward_pre_hooks.pop(hid)
            module._forward_pre_hooks_with_kwargs.pop(hid, None)
    for hid, source in post:
        if source is not keep:
            module._forward_hooks.pop(hid)
            module._forward_hooks_always_called.pop(hid, None)


_EAGER_ONLY = []


def _make_eager_only() -> None:
    """Wrap ``_run_eager`` and ``_recomputed`` in ``torch.compiler.disable`` (always eager,
    also when a compiled layer calls them). Done on the first attach, not at import:
    ``torch.compiler.disable`` imports torch._dynamo, and with it triton, which importing
    moebal must not do (a later ``TRITON_INTERPRET=1`` would then be ignored)."""
    global _run_eager, _recomputed
    if not _EAGER_ONLY:
        _run_eager, _recomputed = torch.compiler.disable(_run_eager), torch.compiler.disable(_recomputed)
        _EAGER_ONLY.append(True)


def attach_token_source(model: nn.Module) -> TokenSource:
    """Make ``model``'s moebal layers see its ``attention_mask`` and ``input_ids``.

    Hooks each entry point of ``model`` (itself included) that holds a ``moebal.MoE`` and
    sets ``token_source`` on every ``moebal.MoE`` in it. Idempotent: a model already hooked
    keeps its source (call again after swapping more layers to reach the new ones).
    ``swap_ffn`` and ``convert_moe_blocks`` call it.

    Returns:
        The model's :class:`TokenSource`.
    """
    entries = _entry_points(model)
    found = [source for m in entries for _, source in _hooks(m)[0]]
    source = found[0] if found else TokenSource()
    for m in entries:
        _unhook(m, keep=source)
        pre, post = _hooks(m)
        if not pre:
            m.register_forward_pre_hook(_PreHook(source, _params(type(m))), with_kwargs=True)
        if not post:
            m.register_forward_hook(_PostHook(source), always_call=True)
    for m in model.modules():
        if isinstance(m, MoE):
            m.token_source = source
    return source


def detach_token_source(model: nn.Module) -> None:
    """Undo :func:`attach_token_source`: remove the hooks and every layer's ``token_source``."""
    for m in model.modules():
        _unhook(m, keep=None)
        if isinstance(m, MoE):
            m.token_source = None
