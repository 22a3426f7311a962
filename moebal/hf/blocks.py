"""Converting transformers' MoE blocks to ``moebal.MoE`` and back, without loss.

Supported (transformers 5.x fused-expert layout: ``experts.gate_up_proj [E, 2F, D]``,
gate then up, and ``experts.down_proj [E, D, F]``; the ``is_transposed`` variant too):

- Mixtral: softmax -> top-k -> renormalise.
- Qwen2-MoE: softmax -> top-k -> renormalise iff ``norm_topk_prob``; plus a shared
  SwiGLU expert scaled by ``sigmoid(x w)`` (``MoE(shared_gate=True)``).
- Qwen3-MoE: as Qwen2-MoE without the shared expert.
- DeepSeek-V3: sigmoid scores; ``e_score_correction_bias`` chooses experts only (moebal's
  loss-free ``expert_bias``, so the router gets a ``LossFree`` balancer); renormalise iff
  ``norm_topk_prob``; ``routed_scaling_factor``; shared experts. Group-limited routing
  (``n_group > 1``, ``topk_group < n_group``) becomes ``Router(num_groups=n_group,
  top_groups=topk_group)``: both score a group by the sum of its two highest biased
  scores and mask the other groups' experts with -inf. With ``topk_group >= n_group``
  every group is kept and the router is plain top-k (the same choice).
- Mixtral's ``router_jitter_noise = eps > 0`` becomes ``MoE(jitter_noise=eps)``: in
  training both multiply the block's input by ``torch.empty_like(x).uniform_(1 - eps,
  1 + eps)`` before routing, so under the same RNG state they draw the same noise and
  compute the same output. Mixtral multiplies the caller's tensor in place; moebal does
  not modify its input. Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 blocks have no jitter (a
  block of theirs with a ``jitter_noise > 0`` attribute is refused).

Not representable, so conversion raises :class:`ConversionError`:

- Group-limited routing that transformers cannot run or that leaves a token fewer than
  ``top_k`` eligible experts: ``n_group`` not dividing the experts, groups of one expert
  (transformers scores a group by its top 2), or ``top_k > topk_group * E / n_group``
  (transformers would then pick masked experts).
- Mixtral jitter with ``eps >= 1`` (a noise factor could be negative or zero).
- Experts in per-expert ``ModuleList`` or interleaved gate/up layouts, post-expert norms,
  non-SiLU gates, and router classes not listed above.

Exactness: weights and buffers are copied bit for bit and routing makes the same choices;
outputs agree to float rounding (moebal sums the K expert outputs per token in a
different order than HF's per-expert ``index_add_``). Documented departures: moebal
computes router logits in fp32 where Mixtral/Qwen compute them in the model dtype, and
keeps the routing weights in fp32 where Qwen rounds them to the model dtype (both the
same in fp32 models); DeepSeek-V3 adds 1e-20 to the renormalising sum, which changes
nothing unless the chosen sigmoid scores sum below about 1e-13. Ties: where two experts
(or, with group-limited routing, two groups) score exactly alike at the top-k boundary,
moebal keeps the lower index and transformers' ``topk(sorted=False)`` promises no order,
so the choice may differ. transformers 4.x masked excluded groups with 0.0 instead of
-inf, which differs where a kept expert's biased score is negative; those releases keep
experts in a ``ModuleList``, which is refused anyway.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from moebal.hf._keys import ConversionError, Rule, same, transpose_last2, translate
from moebal.hf._models import Replacement, SwapReport, activation_name, find_layer_lists, set_submodule
from moebal.hf.tokens import attach_token_source
from moebal.layer import MoE
from moebal.router import AuxLoss, LinearAssignment, LossFree, Router

__all__ = ["from_hf_moe_block", "to_hf_moe_block", "convert_moe_blocks", "restore_moe_blocks", "hf_block_family"]

# family -> (module, router class); looked up lazily so transformers stays optional
_ROUTERS = {
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralTopKRouter"),
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeTopKRouter"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter"),
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3TopkRouter"),
}
# children each family's block has besides ``gate`` and ``experts``
_SHARED = {"mixtral": (), "qwen2_moe": ("shared_expert", "shared_expert_gate"), "qwen3_moe": (),
           "deepseek_v3": ("shared_experts",)}


def _router_class(family: str):
    module, name = _ROUTERS[family]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def hf_block_family(block: nn.Module) -> str | None:
    """``"mixtral"``, ``"qwen2_moe"``, ``"qwen3_moe"``, ``"deepseek_v3"`` or None."""
    gate = getattr(block, "gate", None)
    if gate is None or not hasattr(block, "experts"):
        return None
    for family in _ROUTERS:
        cls = _router_class(family)
        if cls is not None and type(gate) is cls:
            return family
    return None


@dataclass(frozen=True)
class _Semantics:
    """Everything about a block's forward that moebal must reproduce."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    score: str
    renormalize: bool
    scale: float
    has_bias_E: bool  # router selection bias (DeepSeek)
    shared_d_ff: int | None
    shared_gate: bool
    expert_bias: bool  # expert FFN biases
    transposed: bool
    groups: tuple[int, int | None] = (1, None)  # (num_groups, top_groups) that exclude groups, else (1, None)
    jitter: float = 0.0  # Mixtral's router jitter


def _check_experts(experts: nn.Module, where: str) -> tuple[bool, bool]:
    if not isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
        raise ConversionError(f"{where}: experts are not in the fused gate_up_proj/down_proj layout")
    if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
        raise ConversionError(f"{where}: experts use a gate/up layout moebal does not have (interleaved or ungated)")
    if getattr(experts, "has_post_expert_norm", False):
        raise ConversionError(f"{where}: experts apply a post-expert norm, which moebal does not have")
    act = getattr(experts, "act_fn", None)
    if act is None or activation_name(act) != "silu":
        raise ConversionError(f"{where}: expert activation {type(act).__name__} is not SiLU (SwiGLU)")
    return bool(getattr(experts, "has_bias", False)), bool(getattr(experts, "is_transposed", False))


def _check_shared_mlp(mlp: nn.Module, where: str) -> int:
    names = sorted(n for n, _ in mlp.named_children())
    if names != ["act_fn", "down_proj", "gate_proj", "up_proj"] or activation_name(mlp.act_fn) != "silu":
        raise ConversionError(f"{where}: shared expert {type(mlp).__name__} is not a bias-free SwiGLU MLP ({names})")
    if any(getattr(mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
        raise ConversionError(f"{where}: shared expert has biases; moebal's shared FFN has none")
    return mlp.gate_proj.out_features


def _semantics(block: nn.Module, family: str) -> _Semantics:
    where = type(block).__name__
    extra = sorted(set(dict(block.named_children())) - {"gate", "experts", *_SHARED[family]})
    if extra:
        raise ConversionError(f"{where}: children moebal would drop: {extra}")
    gate, experts = block.gate, block.experts
    expert_bias, transposed = _check_experts(experts, where)
    E, D = gate.weight.shape
    F_ = experts.down_proj.shape[1] if transposed else experts.down_proj.shape[2]
    score, renormalize, scale, bias_E = "softmax", True, 1.0, False
    shared_d_ff, shared_gate = None, False
    groups, jitter = (1, None), _jitter(block, family, where)
    if family in ("qwen2_moe", "qwen3_moe"):
        renormalize = bool(gate.norm_topk_prob)
    elif family == "deepseek_v3":
        score, renormalize, bias_E = "sigmoid", bool(gate.norm_topk_prob), True
        scale = float(gate.routed_scaling_factor)
        groups = _groups(gate, where)
    if family == "qwen2_moe":
        shared_d_ff, shared_gate = _check_shared_mlp(block.shared_expert, where), True
    elif family == "deepseek_v3":
        shared_d_ff = _check_shared_mlp(block.shared_experts, where)
    return _Semantics(D, F_, E, gate.top_k, score, renormalize, scale, bias_E, shared_d_ff, shared_gate,
                      expert_bias, transposed, groups, jitter)


def _jitter(block: nn.Module, family: str, where: str) -> float:
    """Mixtral's multiplicative input noise (0 when off; HF applies it only when > 0)."""
    eps = getattr(block, "jitter_noise", 0) or 0
    if eps <= 0:
        return 0.0
    if family != "mixtral":  # none of these has jitter in transformers 5.x: a block that does is unknown
        raise ConversionError(f"{where}: jitter_noise={eps}, but a {family} block has no jitter moebal knows of")
    if eps >= 1:
        raise ConversionError(
            f"{where}: router_jitter_noise={eps} >= 1 lets the noise factor U(1 - eps, 1 + eps) reach zero or below; "
            "moebal's jitter_noise must be in [0, 1)"
        )
    return float(eps)


def _groups(gate: nn.Module, where: str) -> tuple[int, int | None]:
    """``(n_group, topk_group)`` when group-limited routing excludes groups, else ``(1, None)``."""
    G, M, E, K = gate.num_group, gate.topk_group, gate.num_experts, gate.top_k
    if not isinstance(G, int) or not isinstance(M, int) or G < 1 or M < 1:
        raise ConversionError(f"{where}: n_group={G!r}, topk_group={M!r} must be ints >= 1")
    if G == 1 or M >= G:  # every group kept: plain top-k chooses the same experts
        return 1, None
    if E % G:
        raise ConversionError(f"{where}: n_group={G} does not divide the {E} experts")
    if E // G < 2:
        raise ConversionError(
            f"{where}: groups of one expert (n_group={G}, {E} experts): transformers scores a group by its "
            "top 2 experts and cannot run this block"
        )
    if K > M * (E // G):
        raise ConversionError(
            f"{where}: top_k={K} exceeds the {M * (E // G)} experts of the topk_group={M} kept groups; "
            "transformers would then choose among masked (-inf) experts"
        )
    return G, M


def _rules(family: str, sem: _Semantics) -> list[Rule]:
    """HF key(s) -> moebal key(s); the inverse direction swaps src/dst and uses ``_inverse``."""
    orient = same if sem.transposed else transpose_last2
    rules = [
        Rule(("gate.weight",), ("router.gate.weight",), same),
        Rule(("experts.gate_up_proj",), ("experts.w_in_EDH",), orient),
        Rule(("experts.down_proj",), ("experts.w_out_EFD",), orient),
    ]
    if sem.expert_bias:
        rules += [Rule(("experts.gate_up_proj_bias",), ("experts.b_in_EH",), same),
                  Rule(("experts.down_proj_bias",), ("experts.b_out_ED",), same)]
    if sem.has_bias_E:
        rules.append(Rule(("gate.e_score_correction_bias",), ("router.expert_bias",), same))
    shared = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}.get(family)
    if shared:
        rules += [
            Rule((f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"), ("shared.w_in.weight",),
                 lambda g, u: torch.cat([g, u], dim=0)),
            Rule((f"{shared}.down_proj.weight",), ("shared.w_out.weight",), same),
        ]
    if family == "qwen2_moe":
        rules.append(Rule(("shared_expert_gate.weight",), ("shared_gate.weight",), same))
    return rules


def _inverse(rule: Rule) -> Rule:
    if len(rule.src) == 2:  # the shared gate/up concatenation
        return Rule(rule.dst, rule.src, lambda w: tuple(w.chunk(2, dim=0)))
    return Rule(rule.dst, rule.src, rule.fn)  # same and transpose are their own inverses


def _default_balancer(family: str, block: nn.Module):
    if family == "deepseek_v3":
        return LossFree(rate=1e-3, update="manual")
    coef = getattr(getattr(block.experts, "config", None), "router_aux_loss_coef", None)
    return AuxLoss(alpha=float(coef)) if coef is not None else AuxLoss()


def from_hf_moe_block(
    block: nn.Module,
    balancer: AuxLoss | LossFree | LinearAssignment | None | str = "auto",
    backend: str = "auto",
) -> MoE:
    """A ``moebal.MoE`` computing what the transformers MoE ``block`` computes.

    Args:
        block: a Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-V3 MoE block.
        balancer: the router's training-time balancing policy (it does not change the
            forward). ``"auto"``: ``AuxLoss(config.router_aux_loss_coef)`` for softmax
            routers, ``LossFree(update="manual")`` for DeepSeek-V3, whose selection bias
            moebal stores only in a LossFree router.
        backend: dispatch/combine backend of the new layer.

    Raises:
        ConversionError: unsupported block, semantics moebal cannot represent, or any
        missing/unexpected/mis-shaped key.
    """
    family = hf_block_family(block)
    if family is None:
        gate = getattr(block, "gate", None)
        raise ConversionError(
            f"{type(block).__name__} (router {type(gate).__name__}) is not an MoE block moebal can convert; "
            f"supported: {', '.join(name for _, name in _ROUTERS.values())}"
        )
    sem = _semantics(block, family)
    if balancer == "auto":
        balancer = _default_balancer(family, block)
    loss_free = any(isinstance(p, LossFree) for p in (balancer if isinstance(balancer, (tuple, list)) else (balancer,)))
    if sem.has_bias_E and not loss_free:
        raise ConversionError(
            f"{type(block).__name__} chooses experts with e_score_correction_bias; moebal keeps that bias only "
            f"in a router with a LossFree balancer, got {balancer!r}"
        )
    num_groups, top_groups = sem.groups  # only DeepSeek-V3 has groups, and it needs LossFree (above)
    router = Router(sem.d_model, sem.num_experts, sem.top_k, score=sem.score, balancer=balancer,
                    renormalize=sem.renormalize, scale=sem.scale, num_groups=num_groups, top_groups=top_groups)
    moe = MoE(
        sem.d_model, sem.d_ff, sem.num_experts, sem.top_k, router=router, backend=backend,
        num_shared_experts=1 if sem.shared_d_ff else 0, shared_d_ff=sem.shared_d_ff,
        shared_gate=sem.shared_gate, ffn_bias=sem.expert_bias, jitter_noise=sem.jitter,
    )
    fresh = ["router.load_counts"] if loss_free else []
    if loss_free and not sem.has_bias_E:
        fresh.append("router.expert_bias")
    translate(block, moe, _rules(family, sem), fresh=fresh, what=f"{type(block).__name__} -> moebal.MoE")
    ref = next(block.parameters())
    return moe.to(device=ref.device).train(block.training)


def _zero_counts(counts: torch.Tensor) -> tuple:
    if bool((counts != 0).any()):
        raise ConversionError(
            "router.load_counts holds loads not yet applied to the bias (HF has no such state); call "
            "moebal.update_biases(model) or zero them before converting back"
        )
    return ()


def to_hf_moe_block(moe: MoE, block_cls: type, config) -> nn.Module:
    """Build ``block_cls(config)`` holding ``moe``'s weights; raises if it would compute anything else."""
    block = block_cls(config)
    family = hf_block_family(block)
    if family is None:
        raise ConversionError(f"{block_cls.__name__} is not an MoE block moebal can convert back to")
    sem = _semantics(block, family)
    r = moe.router
    have = _Semantics(
        moe.d_model, moe.d_ff, moe.num_experts, moe.top_k, r.score, r.renormalize, r.scale,
        r.policy(LossFree) is not None,
        moe.shared.w_out.in_features if moe.shared is not None else None, moe.shared_gate is not None,
        moe.experts.b_in_EH is not None, sem.transposed,
        (r.num_groups, r.top_groups) if r.top_groups is not None and r.top_groups < r.num_groups else (1, None),
        moe.jitter_noise,
    )
    diff = {k: (getattr(have, k), getattr(sem, k)) for k in sem.__dataclass_fields__
            if getattr(have, k) != getattr(sem, k)}
    if moe.capacity_factor is not None:
        diff["capacity_factor"] = (moe.capacity_factor, None)
    if moe.experts.activation != "swiglu":
        diff["activation"] = (moe.experts.activation, "swiglu")
    if diff:
        raise ConversionError(
            f"moebal.MoE -> {block_cls.__name__}: the layer computes something else than the block the config "
            "builds: " + ", ".join(f"{k}: layer {a!r}, block {b!r}" for k, (a, b) in diff.items())
        )
    rules = [_inverse(rule) for rule in _rules(family, sem)]
    if r.policy(LossFree) is not None:
        rules.append(Rule(("router.load_counts",), (), _zero_counts))
    translate(moe, block, rules, what=f"moebal.MoE -> {block_cls.__name__}")
    ref = next(moe.parameters())
    return block.to(device=ref.device).train(moe.training)


def _looks_like_block(module: nn.Module) -> bool:
    if isinstance(module, MoE):
        return False
    return hf_block_family(module) is not None or (
        hasattr(module, "experts") and (hasattr(module, "gate") or hasattr(module, "router"))
    )


def _why_plain(i: int, prefix: str, layer: nn.Module) -> tuple[int, str, str]:
    from moebal.hf.swap import match_dense_ffn

    for name, child in layer.named_children():
        if isinstance(child, MoE):
            return i, f"{prefix}.{name}", "already a moebal.MoE"
        try:
            dense = match_dense_ffn(child) is not None
        except ConversionError:
            dense = True
        if dense:
            return i, f"{prefix}.{name}", f"no MoE block ({type(child).__name__})"
    return i, prefix, "no MoE block"


def convert_moe_blocks(
    model: nn.Module, layers: Iterable[int] | None = None, balancer="auto", backend: str = "auto"
) -> SwapReport:
    """Replace every supported transformers MoE block of ``model`` with a ``moebal.MoE``.

    Raises :class:`ConversionError` when a block cannot be converted exactly (nothing is
    replaced then) or when there is nothing to convert.
    """
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        raise ConversionError(
            "model.config.output_router_logits is True: after conversion HF would find no router logits to "
            "build its aux loss from. Set it to False and add moebal.aux_loss(model) to the loss instead."
        )
    wanted = None if layers is None else set(int(i) for i in layers)
    todo, report = [], SwapReport()
    for list_name, layer_list in find_layer_lists(model):
        found, plain = [], []
        for i, layer in enumerate(layer_list):
            prefix = f"{list_name}.{i}" if list_name else str(i)
            blocks = [(f"{prefix}.{name}", child) for name, child in layer.named_children() if _looks_like_block(child)]
            if not blocks:
                plain.append((i, prefix, layer))
            elif wanted is not None and i not in wanted:
                report.skipped += [(i, path, "not in layers") for path, _ in blocks]
            else:
                found += [(i, path, child) for path, child in blocks]
        if found or (wanted is not None and report.skipped):
            report.skipped += [_why_plain(i, prefix, layer) for i, prefix, layer in plain]
            todo += found
    report.skipped.sort(key=lambda s: s[0])
    if not todo:
        raise ConversionError(f"no transformers MoE block found in {type(model).__name__} (layers={layers})")
    missing = sorted(wanted - {i for i, _, _ in todo}) if wanted is not None else []
    if missing:
        raise ConversionError(f"layers {missing} have no transformers MoE block to convert:\n{report}")
    converted = [(i, path, child, from_hf_moe_block(child, balancer, backend)) for i, path, child in todo]
    for i, path, child, moe in converted:  # all-or-nothing: swap in only once every block converted
        set_submodule(model, path, moe)
        report.replaced.append(Replacement(i, path, type(child).__name__, type(moe).__name__, False,
                                           type(child), getattr(child.experts, "config", None)))
    attach_token_source(model)  # the layers read the model's attention_mask and input_ids
    return report


def restore_moe_blocks(model: nn.Module, report: SwapReport) -> SwapReport:
    """Put back transformers blocks for the layers ``convert_moe_blocks`` replaced."""
    back = SwapReport()
    rebuilt = []
    for rep in report.replaced:
        if rep.old_type is None or rep.old_config is None:
            raise ConversionError(f"{rep.path}: the report does not say which HF block it replaced")
        rebuilt.append((rep, to_hf_moe_block(model.get_submodule(rep.path), rep.old_type, rep.old_config)))
    for rep, block in rebuilt:
        set_submodule(model, rep.path, block)
        back.replaced.append(Replacement(rep.layer, rep.path, rep.new_class, type(block).__name__))
    return back
