"""A moebal model as transformers' own MoE architecture, and saving/loading swapped models.

:func:`to_native` turns a swapped (``swap_ffn``) or converted (``convert_moe_blocks``) model
into the transformers MoE model with the same forward and no moebal module in it:

- Llama, Mistral -> Mixtral (every layer MoE, softmax top-k renormalised, no shared
  experts). The dense config carries over field by field (attention, head_dim, norms,
  rope_parameters, vocab, tie_word_embeddings, sliding_window, ...); a field Mixtral lacks
  is refused unless it has the value Mixtral computes with (Llama's ``attention_bias``,
  ``mlp_bias``: False).
- Qwen2 -> Qwen2-MoE: every block has a sigmoid-gated shared expert (swap with
  ``num_shared_experts=1, shared_gate=True``); ``norm_topk_prob`` = the router's
  ``renormalize``; dense layers become ``mlp_only_layers``. Sliding-window layers refused.
- Qwen3 -> Qwen3-MoE: no shared experts; ``mlp_only_layers``; a sliding window only on
  every layer or none (Qwen3-MoE has no per-layer ``layer_types``).
- A converted Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 -> its own architecture
  (:func:`~moebal.hf.to_hf_moe_block`; DeepSeek-V3's dense layers must come first).
  Sigmoid routing with a loss-free bias is DeepSeek-V3's block alone: only a DeepSeek-V3
  model exports it.

:class:`ConversionError` names every property in the way: capacity factor, null experts,
hash routing, non-SwiGLU experts (GPT-2, Phi), expert biases, output dropout, ``top_k=1``
unrenormalised (Mixtral), layers of different sizes, dense layers Mixtral cannot keep,
unapplied loss-free counts. The forward carries over; training-time policy behaviour
(balancing losses, BASE's assignment, noisy logits) has no HF counterpart
(``router_aux_loss_coef`` takes an ``AuxLoss`` alpha). Exact in fp32; in low precision HF
keeps the router in the model dtype.

:func:`save_pretrained` is ``model.save_pretrained`` plus a ``moebal`` record in
``config.json`` (format, moebal version; per swapped layer its path, sizes, activation,
capacity factor, shared experts, drop policy, router and policy fields, repr). A function,
not a hook in the model's own save: the record is taken from the layers when saving (one
kept on the config goes stale when a layer changes) and no transformers method is patched.
:func:`from_pretrained` loads the dense architecture with transformers, re-runs
``swap_ffn(..., upcycle=False)`` with the recorded arguments and loads the layers' tensors
(loss-free biases and pending counts too) bit for bit. Plain transformers loading
(``AutoModelForCausalLM.from_pretrained``) gives the *dense* model: its LOAD REPORT lists
the moebal tensors UNEXPECTED and the dense MLP weights MISSING (randomly initialised); the
config keeps its ``moebal`` key. Use :func:`from_pretrained`, or save ``to_native(model)``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import warnings

import torch
from torch import nn

import moebal
import moebal.policies as _policies
from moebal.hf._keys import ConversionError
from moebal.hf._models import find_layer_lists
from moebal.hf.blocks import hf_block_family, to_hf_moe_block
from moebal.hf.swap import MoEWithDropout, match_dense_ffn, swap_ffn
from moebal.layer import MoE
from moebal.policies import AuxLoss, HashRouting, LossFree, Policy
from moebal.router import Router

__all__ = ["to_native", "save_pretrained", "from_pretrained"]

_DENSE_TARGET = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
           "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "deepseek_v3": "DeepseekV3"}
_NAME = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "deepseek_v3": "DeepSeek-V3"}
_SKIP = {"_name_or_path", "architectures", "model_type", "transformers_version", "output_attentions",
         "pretraining_tp"}  # pretraining_tp: read by no transformers 5 forward
_IMPLIED = {"mixtral": {"attention_bias": False, "mlp_bias": False}}  # source fields the target computes as
_GETATTR = {"qwen2_moe": {"head_dim"}, "qwen3_moe": {"head_dim"}}  # read by the target's modules, not declared
_FORMAT = 1


def _moe_layers(model: nn.Module) -> tuple[nn.ModuleList, dict[int, tuple[str, MoE]]]:
    """The decoder stack holding the moebal layers, and its layer index -> (path, layer)."""
    found, stacks = {}, []
    for list_name, layers in find_layer_lists(model):
        here = {i: (f"{list_name}.{i}.{n}" if list_name else f"{i}.{n}", c)
                for i, layer in enumerate(layers) for n, c in layer.named_children() if isinstance(c, MoE)}
        stacks += [layers] if here else []
        found.update(here)
    if not found:
        raise ConversionError(f"{type(model).__name__} holds no moebal.MoE layer in a decoder layer list")
    if len(stacks) > 1 or sum(isinstance(m, MoE) for m in model.modules()) != len(found):
        raise ConversionError(f"{type(model).__name__}: moebal.MoE layers outside one decoder stack's direct children")
    return stacks[0], found


def _layer_problems(moe: MoE, target: str) -> list[str]:
    r, name, free = moe.router, _NAME.get(target, target), moe.router.policy(LossFree) is not None
    softmax = target in ("mixtral", "qwen2_moe", "qwen3_moe")
    dropout = moe.dropout.p if isinstance(moe, MoEWithDropout) else 0.0
    checks = [
        (type(moe) not in (MoE, MoEWithDropout), f"class {type(moe).__name__} (moebal.MoE or MoEWithDropout expected)"),
        (moe.capacity_factor is not None, f"capacity_factor={moe.capacity_factor} (HF MoE blocks are dropless)"),
        (r.num_null_experts, f"num_null_experts={r.num_null_experts} (HF MoE blocks have no null experts)"),
        (isinstance(r.selector, HashRouting), "hash routing (HashRouting): HF routers choose experts by score"),
        (moe.experts.activation != "swiglu", f"activation={moe.experts.activation!r} (HF MoE experts are SwiGLU)"),
        (moe.experts.b_in_EH is not None, "expert biases (ffn_bias=True; HF MoE experts have none)"),
        (dropout > 0, f"output dropout p={dropout} (HF MoE blocks have none)"),
        (softmax and (r.score != "softmax" or free),
         f"score={r.score!r}{' with a loss-free bias' * free} ({name} routes by softmax with no bias; sigmoid + "
         "loss-free bias is DeepSeek-V3's block, exportable only from a DeepSeek-V3 model)"),
        (softmax and r.scale != 1.0, f"scale={r.scale} ({name} has no routed scaling factor)"),
        (softmax and r.top_groups is not None and r.top_groups < r.num_groups,
         f"group-limited routing (num_groups={r.num_groups}, top_groups={r.top_groups})"),
        (target == "mixtral" and not r.renormalize,
         f"top_k={moe.top_k} without renormalisation (Mixtral renormalises the top-k weights)"),
        (target in ("mixtral", "qwen3_moe") and moe.shared is not None, f"shared experts ({name} has none)"),
        (target == "qwen2_moe" and (moe.shared is None or moe.shared_gate is None),
         "no gated shared expert (every Qwen2-MoE block has one: swap with num_shared_experts=1, shared_gate=True)"),
        (target != "mixtral" and moe.jitter_noise, f"jitter_noise={moe.jitter_noise} (only Mixtral has router jitter)"),
        (free and bool((r.load_counts != 0).any()),
         "loss-free counts not yet applied to the bias (HF has no such state: call moebal.update_biases(model) first)"),
    ]
    return [message for bad, message in checks if bad]


def _by_layer(layers: dict[int, tuple[str, MoE]], target: str) -> list[str]:
    """Each layer problem once, with the layers it applies to."""
    where: dict[str, list[int]] = {}
    for i, (_, moe) in sorted(layers.items()):
        for p in _layer_problems(moe, target):
            where.setdefault(p, []).append(i)
    return [f"layer{'s' * (len(ix) > 1)} {', '.join(map(str, ix))}: {p}" for p, ix in where.items()]


def _facts(moe: MoE) -> dict:
    """What a dense model's target config says once for every sparse layer."""
    r = moe.router
    return {"num_experts": moe.num_experts, "top_k": moe.top_k, "d_ff": moe.d_ff, "renormalize": r.renormalize,
            "shared_d_ff": None if moe.shared is None else moe.shared.w_out.in_features,
            "jitter_noise": moe.jitter_noise}


def _window(source: str, d: dict, problems: list[str]) -> tuple[dict, set]:
    """Sliding-window fields of a Qwen config as the MoE target's: (target kwargs, source keys consumed)."""
    if source not in ("qwen2", "qwen3"):
        return {}, set()
    kinds = set(d.get("layer_types") or ["full_attention"])
    consumed = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
    if kinds == {"full_attention"}:  # Qwen2-MoE takes Qwen2's layer_types; Qwen3-MoE has none
        kw = {"use_sliding_window": False, **({k: d[k] for k in ("layer_types", "max_window_layers")}
                                              if source == "qwen2" else {})}
    elif source == "qwen3" and kinds == {"sliding_attention"}:
        kw = {"use_sliding_window": True, "sliding_window": d["sliding_window"]}
    else:
        problems.append(f"layer_types={d.get('layer_types')} (sliding-window layers: {_NAME[_DENSE_TARGET[source]]} "
                        "cannot run the same layers with the same window)")
        return {}, consumed
    return kw, consumed


def _dense_config(config, target: str, moe: MoE, dense_layers: list[int], problems: list[str]):
    import transformers

    cfg_cls = getattr(transformers, f"{_PREFIX[target]}Config")
    known = {f.name for f in dataclasses.fields(cfg_cls)} | _GETATTR.get(target, set())
    d = config.to_dict()
    kw, consumed = _window(config.model_type, d, problems)
    implied = _IMPLIED.get(target, {})
    for key, value in d.items():
        if key in _SKIP or key in consumed or (key == "intermediate_size" and target == "mixtral"):
            continue
        if key in known:
            kw[key] = value
        elif key in implied and value != implied[key]:
            problems.append(f"{key}={value!r} ({cfg_cls.__name__} has no {key}; its model computes as {key}="
                            f"{implied[key]!r})")
        elif key not in implied:
            problems.append(f"{key}={value!r} has no counterpart in {cfg_cls.__name__}")
    f, r = _facts(moe), moe.router
    aux = r.policy(AuxLoss)
    moe_kw = {"num_experts_per_tok": f["top_k"], "output_router_logits": False,
              **({"router_aux_loss_coef": aux.alpha} if aux is not None else {})}
    if target == "mixtral":
        moe_kw.update(num_local_experts=f["num_experts"], intermediate_size=f["d_ff"],
                      router_jitter_noise=f["jitter_noise"])
    else:
        moe_kw.update(num_experts=f["num_experts"], moe_intermediate_size=f["d_ff"], norm_topk_prob=f["renormalize"],
                      decoder_sparse_step=1, mlp_only_layers=dense_layers)
        if target == "qwen2_moe":
            moe_kw.update(shared_expert_intermediate_size=f["shared_d_ff"] or 0, qkv_bias=True)
    if problems:
        return None
    cfg = cfg_cls(**kw, **moe_kw)
    changed = {k: getattr(cfg, k, None) for k, v in {**kw, **moe_kw}.items() if getattr(cfg, k, None) != v
               and not (k == "sliding_window" and not kw.get("use_sliding_window", True))}  # no window used
    if changed:
        problems.append(f"{cfg_cls.__name__} turns " + ", ".join(f"{k} into {v!r}" for k, v in changed.items()))
    return cfg


def _family_config(config, family: str, sparse: set[int], n: int, problems: list[str]):
    cfg = copy.deepcopy(config)
    cfg.__dict__.pop("moebal", None)
    dense = [i for i in range(n) if i not in sparse]
    if family in ("qwen2_moe", "qwen3_moe"):
        cfg.mlp_only_layers, cfg.decoder_sparse_step = dense, 1
    elif family == "deepseek_v3":
        if dense != list(range(len(dense))):
            problems.append(f"dense layers {dense} are not the first ones (DeepSeek-V3 keeps only its first "
                            "first_k_dense_replace layers dense)")
        cfg.first_k_dense_replace = len(dense)
    elif dense:
        problems.append(f"layers {dense} are dense (Mixtral makes every layer MoE)")
    return cfg


def to_native(model: nn.Module) -> nn.Module:
    """The transformers MoE model computing what the swapped or converted ``model`` computes.

    A new, plain transformers model (no moebal module or hook) in ``model``'s training mode
    and device: the other weights copied bit for bit, the MoE layers rebuilt by
    :func:`~moebal.hf.to_hf_moe_block`; ``model`` is unchanged. What maps where and what is
    refused: see the module docstring.

    Raises:
        TypeError: ``model`` is not a transformers model.
        ConversionError: nothing to export, or a property the native architecture cannot
        represent (every one found is named).
    """
    import transformers

    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, transformers.PreTrainedConfig):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    stack, layers = _moe_layers(model)
    source = config.model_type
    target = _DENSE_TARGET.get(source, source if source in _NAME else None)
    problems = _by_layer(layers, target)
    if target is None:
        problems.append(f"model_type={source!r} has no native MoE architecture moebal exports to (it knows "
                        f"{sorted(_DENSE_TARGET)} -> Mixtral/Qwen2-MoE/Qwen3-MoE, and those MoE families themselves)")
        raise ConversionError("to_native: " + "; ".join(problems))
    if source in _DENSE_TARGET:
        facts, first = {i: _facts(moe) for i, (_, moe) in layers.items()}, min(layers)
        problems += [f"layer {i} differs from layer {first} in " + ", ".join(
            f"{k} ({v!r} vs {facts[first][k]!r})" for k, v in f.items() if v != facts[first][k])
            + f" (one {_NAME[target]} config describes all)" for i, f in sorted(facts.items()) if f != facts[first]]
        dense = [i for i in range(len(stack)) if i not in layers]
        if target == "mixtral" and dense:
            problems.append(f"layers {dense} are dense (swapped only partially; Mixtral makes every layer MoE)")
        cfg = _dense_config(config, target, layers[first][1], dense, problems)
    else:
        sparse = set(layers) | {i for i, layer in enumerate(stack) if any(
            hf_block_family(c) is not None for c in layer.children())}
        cfg = _family_config(config, target, sparse, len(stack), problems)
    name = type(model).__name__
    native_cls = getattr(transformers, _PREFIX[target] + name[len(_PREFIX[source]):], None) \
        if name.startswith(_PREFIX[source]) else None
    if native_cls is None:
        problems.append(f"no transformers class for {name} in {_NAME[target]}")
    if problems:
        raise ConversionError("to_native: " + "; ".join(problems))

    ref = model.get_input_embeddings().weight
    native = native_cls._from_config(cfg, dtype=ref.dtype, attn_implementation=config._attn_implementation)
    native.to(ref.device)
    paths = {path for path, _ in layers.values()}

    def outside(key: str) -> bool:
        return not any(key.startswith(p + ".") for p in paths)

    src = {k: v for k, v in model.state_dict().items() if outside(k)}
    dst = {k: v for k, v in native.state_dict().items() if outside(k)}
    bad = sorted(k for k in src.keys() & dst.keys() if src[k].shape != dst[k].shape)
    if src.keys() != dst.keys() or bad:
        raise ConversionError(
            f"to_native: {native_cls.__name__} does not hold {name}'s other weights: only in {name}: "
            f"{sorted(src.keys() - dst.keys()) or '-'}; only in {native_cls.__name__}: "
            f"{sorted(dst.keys() - src.keys()) or '-'}; shapes differ: {bad or '-'}")
    native.load_state_dict(src, strict=False)
    for i, (path, moe) in sorted(layers.items()):
        slot = native.get_submodule(path)
        if hf_block_family(slot) is None:
            raise ConversionError(f"to_native: layer {i}: {native_cls.__name__} builds a {type(slot).__name__} at "
                                  f"{path}, not an MoE block")
        slot.load_state_dict(to_hf_moe_block(moe, type(slot), native.config).state_dict(), strict=True)
    if getattr(model, "generation_config", None) is not None:
        native.generation_config = copy.deepcopy(model.generation_config)
    return native.train(model.training)


# --- saving and loading swapped models ---------------------------------------------------------


def _jsonable(value, where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, where) for v in value]
    raise ConversionError(f"{where}={value!r} ({type(value).__name__}) cannot be recorded in config.json")


def _policy_record(p: Policy) -> dict:
    name = type(p).__name__
    if getattr(_policies, name, None) is not type(p):
        raise ConversionError(f"balancing policy {name} is not one of moebal.policies: it cannot be rebuilt on load")
    fields = [f.name for f in dataclasses.fields(p) if f.init]
    return {"type": name, **{f: _jsonable(getattr(p, f), f"{name}.{f}") for f in fields}}


def _layer_record(i: int, path: str, moe: MoE) -> dict:
    r, F_ = moe.router, moe.d_ff
    shared = 0 if moe.shared is None else moe.shared.w_out.in_features
    n_shared = 0 if not shared else shared // F_ if shared % F_ == 0 else 1
    balancer = r.balancer
    return {
        "layer": i, "path": path, "class": type(moe).__name__,
        "dropout": moe.dropout.p if isinstance(moe, MoEWithDropout) else None,
        "num_experts": moe.num_experts, "top_k": moe.top_k, "d_model": moe.d_model, "d_ff": F_,
        "activation": moe.experts.activation, "ffn_bias": moe.experts.b_in_EH is not None,
        "capacity_factor": moe.capacity_factor, "drop_policy": moe.drop_policy,
        "num_shared_experts": n_shared, "shared_d_ff": None if n_shared * F_ == shared else shared,
        "shared_gate": moe.shared_gate is not None, "jitter_noise": moe.jitter_noise,
        "null_expert": moe.null_expert, "backend": moe.backend, "experts_path": moe.experts.path,
        "router": {
            "score": r.score, "renormalize": r.renormalize, "scale": r.scale, "z_loss": r.z_loss,
            "num_groups": r.num_groups, "top_groups": r.top_groups, "num_null_experts": r.num_null_experts,
            "balancer": None if balancer is None else [_policy_record(p) for p in balancer]
            if isinstance(balancer, (tuple, list)) else _policy_record(balancer),
            "balancer_sequence": type(balancer).__name__ if isinstance(balancer, (tuple, list)) else None,
        },
        "repr": repr(moe),
    }


def save_pretrained(model: nn.Module, path: str | os.PathLike, **kwargs) -> dict:
    """``model.save_pretrained(path, **kwargs)`` with the swap recorded under ``config.json``'s ``moebal`` key.

    Returns the record. The model's config is left as it was.

    Raises:
        TypeError: ``model`` is not a transformers model.
        ConversionError: no moebal layer, a layer that is not a swapped dense FFN of the
        architecture (a converted HF MoE block: save ``to_native(model)`` instead), or a
        router setting that cannot be written to JSON.
    """
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    _, layers = _moe_layers(model)
    config = copy.deepcopy(model.config)
    config.__dict__.pop("moebal", None)
    with torch.device("meta"):
        dense = type(model)(config)  # what the architecture holds at each swapped path
    for i, (where, moe) in sorted(layers.items()):
        owner, _, name = where.rpartition(".")
        spec = match_dense_ffn(dense.get_submodule(where))
        if spec is None:  # an FFN on the decoder layer itself (OPT): its MoE sits at the first projection
            spec = match_dense_ffn(dense.get_submodule(owner), inline=True)
            spec = spec if spec is not None and spec.inline[0] == name else None
        if spec is None or spec.d_model != moe.d_model:
            raise ConversionError(
                f"layer {i} ({where}): {type(model).__name__} has a {type(dense.get_submodule(where)).__name__} there, "
                "not the dense FFN swap_ffn replaces, so from_pretrained could not rebuild it; for a converted HF MoE "
                "model save moebal.hf.to_native(model) with its own save_pretrained")
    record = {"format": _FORMAT, "version": moebal.__version__,
              "layers": [_layer_record(i, where, moe) for i, (where, moe) in sorted(layers.items())]}
    json.dumps(record, allow_nan=True)  # fails here, not halfway through the save
    old = model.config.__dict__.get("moebal")
    model.config.moebal = record
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        del model.config.moebal
        if old is not None:
            model.config.moebal = old
    return record


def _router(rec: dict) -> Router:
    r = rec["router"]

    def policy(p):
        cls = getattr(_policies, p["type"], None)
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise ConversionError(f"recorded policy {p['type']!r} is not one of moebal.policies")
        return cls(**{k: torch.tensor(v["tensor"], dtype=getattr(torch, v["dtype"])) if isinstance(v, dict) else v
                      for k, v in p.items() if k != "type"})  # a tensor field: see _jsonable

    bal = r["balancer"]
    seq = {"tuple": tuple, "list": list}.get(r["balancer_sequence"])
    balancer = None if bal is None else seq(policy(p) for p in bal) if seq else policy(bal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # top_k=1 with renormalize=True: warned when first built
        return Router(rec["d_model"], rec["num_experts"], rec["top_k"], score=r["score"], balancer=balancer,
                      z_loss=r["z_loss"], renormalize=r["renormalize"], scale=r["scale"], num_groups=r["num_groups"],
                      top_groups=r["top_groups"], num_null_experts=r["num_null_experts"])


_SWAP_ARGS = ("d_ff", "activation", "ffn_bias", "capacity_factor", "drop_policy", "num_shared_experts", "shared_d_ff",
              "shared_gate", "jitter_noise", "null_expert", "backend")


def _read_tensors(path: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    files = ["model.safetensors"] if os.path.isfile(os.path.join(path, "model.safetensors")) else None
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    if files is None:
        raise ValueError(f"path={path!r} holds no model.safetensors (or its index); moebal.hf.from_pretrained reads "
                         "the safetensors checkpoints save_pretrained writes")
    out = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)})
    return out


def _no_load_report(record: logging.LogRecord) -> bool:
    """A log filter dropping transformers' LOAD REPORT: from_pretrained checks those keys itself."""
    return "LOAD REPORT" not in str(record.msg)


def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Rebuild a model saved with :func:`save_pretrained`: the dense architecture loaded by
    transformers (``kwargs`` go to its ``from_pretrained``: ``dtype``, ``attn_implementation``,
    ...), each recorded layer swapped again (``swap_ffn(..., upcycle=False)``) and filled
    from the checkpoint bit for bit. The returned model's config has no ``moebal`` key.

    Raises:
        TypeError: ``path`` is not a string or path, or ``config`` is passed.
        ValueError: ``path`` is not a local directory, has no ``moebal`` record, or the
        record is of an unknown format.
        ConversionError: the checkpoint and the record disagree (keys, classes, reprs).
    """
    import transformers

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if "config" in kwargs:
        raise TypeError("from_pretrained takes no config: the architecture and the swap come from path's config.json")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path={path!r} is not a directory (download a hub checkpoint first, e.g. "
                         "huggingface_hub.snapshot_download)")
    config = transformers.AutoConfig.from_pretrained(path)
    record = config.__dict__.pop("moebal", None)
    if record is None:
        raise ValueError(f"path={path!r}: config.json has no 'moebal' record, so it is no swapped model saved with "
                         "moebal.hf.save_pretrained (one saved by its own save_pretrained: load the dense model, "
                         "swap_ffn(..., upcycle=False) as before, load_state_dict)")
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        found = record.get("format") if isinstance(record, dict) else record
        raise ValueError(f"path={path!r}: moebal record format {found!r}; this moebal reads format {_FORMAT}")
    archs = config.architectures or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"path={path!r}: config.architectures={archs!r} names no transformers class")
    mu_logger = logging.getLogger("transformers.modeling_utils")
    mu_logger.addFilter(_no_load_report)
    try:
        model, info = cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    finally:
        mu_logger.removeFilter(_no_load_report)

    recs, groups = record["layers"], {}  # layers swapped alike are swapped by one swap_ffn call
    for rec in recs:
        alike = {k: v for k, v in rec.items() if k not in ("layer", "path", "repr", "dropout")}
        groups.setdefault(json.dumps(alike, sort_keys=True), []).append(rec)
    for group in groups.values():
        rec = group[0]
        report = swap_ffn(model, rec["num_experts"], rec["top_k"], router=_router(rec),
                          layers=[g["layer"] for g in group], upcycle=False, **{k: rec[k] for k in _SWAP_ARGS})
        if sorted(r.path for r in report) != sorted(g["path"] for g in group):
            raise ConversionError(f"{path}: the record swaps {[g['path'] for g in group]}, swap_ffn replaced "
                                  f"{[r.path for r in report]}")
    prefixes = tuple(rec["path"] + "." for rec in recs)
    tensors, now = _read_tensors(path, prefixes), model.state_dict().keys()  # swapped away: fine to miss
    stray = [k for k in info["missing_keys"] if k in now and not k.startswith(prefixes)] + sorted(
        set(info["unexpected_keys"]) - set(tensors))
    if stray:
        raise ConversionError(f"{path}: keys neither the dense model nor the moebal record explains: {sorted(stray)}")
    for rec in recs:
        moe, p = model.get_submodule(rec["path"]), rec["path"] + "."
        if type(moe).__name__ != rec["class"]:
            raise ConversionError(f"{rec['path']}: swap_ffn built {type(moe).__name__}, the record says {rec['class']}")
        if rec["dropout"] is not None:
            moe.dropout.p = rec["dropout"]
        moe.experts.path = rec["experts_path"]
        try:
            moe.load_state_dict({k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}, strict=True)
        except RuntimeError as err:
            raise ConversionError(f"{path}: layer {rec['path']} does not match its saved tensors: {err}") from None
        if repr(moe) != rec["repr"]:
            raise ConversionError(f"{rec['path']} rebuilt as\n{moe!r}\nbut was saved as\n{rec['repr']}")
    return model
