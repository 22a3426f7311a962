"""Train one small MoE language model per balancing policy and measure balance and loss.

Every policy starts from the same initial weights (the same seed before construction)
and sees the same batches in the same order; only the router's balancer differs.

Measured per policy:
- ``val_bpb``: validation cross-entropy in bits per byte (model.eval(): BASE routes greedily).
- ``maxvio_global``: MaxVio of the expert counts summed over the validation batches,
  per layer, averaged over layers (Wang et al. 2024).
- ``maxvio_batch``: per-step MaxVio of each training batch, averaged over the last 20 %
  of the steps and over layers.
- ``dropped_frac``: share of routed pairs that the capacity dropped in training (0 when
  dropless); ``overflow_frac_cf1``: the share a capacity factor of 1.0 would have dropped,
  over the same steps as ``maxvio_batch``.
- ``tokens_per_s``: training tokens per second, wall clock of the training loop.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import moebal
from moebal.backend import explain_auto
from moebal.compare.corpus import Corpus, load_corpus
from moebal.compare.model import ModelConfig, MoELM
from moebal.compare.policies import DEFAULT_POLICIES, Policy, parse_policy
from moebal.stats import BalanceMeter, max_violation

__all__ = ["CompareConfig", "train_policy", "run_compare"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CompareConfig:
    steps: int = 300
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_tokens: int = 131072
    last_frac: float = 0.2  # window of training steps that MaxVio_batch averages over
    seed: int = 0
    device: str = "cpu"
    log_every: int = 50
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        for name in ("steps", "batch", "seq_len", "val_tokens", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 < self.last_frac <= 1:
            raise ValueError(f"last_frac must be in (0, 1], got {self.last_frac!r}")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        tokens, k, E = self.batch * self.seq_len, self.model.top_k, self.model.num_experts
        if tokens * k % E:
            raise ValueError(
                f"batch*seq_len*top_k = {tokens}*{k} must be a multiple of num_experts={E} "
                "so that BASE can give every expert the same number of tokens"
            )

    @property
    def last_steps(self) -> int:
        return max(1, round(self.last_frac * self.steps))

    def to_dict(self) -> dict:
        return asdict(self)


def _lr_at(cfg: CompareConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, cfg: CompareConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _overflow_frac(load_E: torch.Tensor, top_k: int, num_tokens: int, capacity_factor: float = 1.0) -> float:
    """Share of routed pairs beyond ``ceil(cf * T * K / E)`` per expert."""
    E = load_E.numel()
    capacity = math.ceil(capacity_factor * num_tokens * top_k / E)
    return float((load_E - capacity).clamp(min=0).sum()) / max(1, num_tokens * top_k)


def build_model(cfg: CompareConfig, policy: Policy) -> MoELM:
    """The model for ``policy``, initialised from ``cfg.seed`` (identical for every policy)."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    return MoELM(m, lambda: policy.make_router(m.d_model, m.num_experts, m.top_k))


@torch.no_grad()
def evaluate(model: MoELM, corpus: Corpus, cfg: CompareConfig) -> dict:
    """Validation bits per byte and balance (eval mode: BASE routes greedily)."""
    device = torch.device(cfg.device)
    model.eval()
    meter = BalanceMeter()
    total_nats, total_tokens = 0.0, 0
    for inputs_BS, targets_BS in corpus.val_batches(cfg.batch, cfg.seq_len, cfg.val_tokens):
        logits = model(inputs_BS.to(device))
        total_nats += float(F.cross_entropy(logits.flatten(0, 1), targets_BS.to(device).flatten(), reduction="sum"))
        total_tokens += targets_BS.numel()
        for name, layer in model.moe_layers():
            meter.update(name, layer.last_stats.load)
    model.train()
    layers = [name for name, _ in model.moe_layers()]
    return {
        "val_loss_nats": total_nats / total_tokens,
        "val_bpb": total_nats / total_tokens / math.log(2),
        "val_tokens": total_tokens,
        "maxvio_global": meter.maxvio_global(),
        "maxvio_global_per_layer": [meter.maxvio_global(n) for n in layers],
        "val_maxvio_batch": meter.maxvio_batch(),
        "val_load": [meter.summed_load(n).tolist() for n in layers],
    }


def train_policy(policy: Policy, corpus: Corpus, cfg: CompareConfig, progress: Progress | None = None) -> dict:
    """Train one model with ``policy`` and return its measurements (plain Python values)."""
    device = torch.device(cfg.device)
    model = build_model(cfg, policy).to(device)
    model.train()
    opt = _optimizer(model, cfg)
    layers = model.moe_layers()
    meter = BalanceMeter()
    losses, step_maxvio, overflow, routed, dropped = [], [], [], 0, 0
    tokens_per_step = cfg.batch * cfg.seq_len
    batches = corpus.train_batches(cfg.batch, cfg.seq_len, cfg.seed)
    _sync(device)
    start = time.perf_counter()
    for step in range(cfg.steps):
        inputs_BS, targets_BS = next(batches)
        inputs_BS, targets_BS = inputs_BS.to(device), targets_BS.to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        logits = model(inputs_BS)
        lm_loss = F.cross_entropy(logits.flatten(0, 1), targets_BS.flatten())
        loss = lm_loss + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        vios = []
        for name, layer in layers:
            stats = layer.last_stats
            load = stats.load.detach().cpu()
            meter.update(name, load)
            vios.append(float(max_violation(load)))
            overflow.append(_overflow_frac(load, cfg.model.top_k, tokens_per_step))
            routed += int(load.sum())
            dropped += int(load.sum() - stats.kept.detach().cpu().sum())
        losses.append(float(lm_loss.detach()))
        step_maxvio.append(sum(vios) / len(vios))
        if progress and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            elapsed = time.perf_counter() - start
            rate = (step + 1) * tokens_per_step / elapsed
            eta = (cfg.steps - step - 1) * elapsed / (step + 1)
            recent = losses[-cfg.log_every:]
            progress(
                f"[{policy.name}] step {step + 1}/{cfg.steps}  loss {sum(recent) / len(recent):.3f} "
                f"({sum(recent) / len(recent) / math.log(2):.3f} bpb)  maxvio_batch {step_maxvio[-1]:.3f}  "
                f"{rate:,.0f} tok/s  eta {eta:.0f}s"
            )
    _sync(device)
    train_seconds = time.perf_counter() - start

    eval_start = time.perf_counter()
    result = evaluate(model, corpus, cfg)
    eval_seconds = time.perf_counter() - eval_start
    last = cfg.last_steps
    names = [name for name, _ in layers]
    n_layers = len(layers)
    result.update(
        {
            "maxvio_batch": meter.maxvio_batch(last=last),
            "maxvio_batch_per_layer": [meter.maxvio_batch(n, last=last) for n in names],
            "maxvio_global_train": meter.maxvio_global(),
            "dropped_frac": dropped / max(1, routed),
            "overflow_frac_cf1": sum(overflow[-last * n_layers:]) / (last * n_layers),
            "tokens_per_s": cfg.steps * tokens_per_step / train_seconds,
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "final_train_loss": sum(losses[-last:]) / last,
            "history": {"loss": losses, "maxvio_batch": step_maxvio},
            "loss_free_bias": _biases(model),
        }
    )
    if progress:
        progress(
            f"[{policy.name}] done in {train_seconds:.0f}s (+{eval_seconds:.0f}s eval)  val {result['val_bpb']:.4f} bpb  "
            f"MaxVio_global {result['maxvio_global']:.3f}  MaxVio_batch {result['maxvio_batch']:.3f}"
        )
    return {**policy.to_dict(), **result}


def _biases(model: MoELM) -> list[list[float]] | None:
    biases = [layer.router.expert_bias for _, layer in model.moe_layers()]
    if any(b is None for b in biases):
        return None
    return [b.detach().cpu().tolist() for b in biases]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_device(device: str) -> str:
    """Validate ``device`` ("cpu" or "cuda[:i]"); raise ValueError saying why it cannot run."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
            raise ValueError(f"{device!r}: CUDA is not available (torch {torch.__version__} is {build})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def device_info(device: str) -> dict:
    import os
    import platform

    dev = torch.device(device)
    info = {"device": device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine()}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
    else:
        info["name"] = platform.processor() or platform.machine()
    info["backend"] = list(explain_auto(dev))
    return info


def versions() -> dict:
    import platform

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"moebal": moebal.__version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def run_compare(
    cfg: CompareConfig | None = None,
    policies: list[Policy] | None = None,
    corpus: Corpus | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train every policy and return the full results (what ``results.json`` holds)."""
    cfg = cfg or CompareConfig()
    policies = policies or [parse_policy(n) for n in DEFAULT_POLICIES]
    check_device(cfg.device)
    start = time.perf_counter()
    corpus = corpus or load_corpus()
    if progress:
        d = corpus.describe()
        progress(
            f"corpus: {d['train_files']} train files ({d['train_bytes']:,} bytes), "
            f"{d['val_files']} validation files ({d['val_bytes']:,} bytes)"
        )
    results = [train_policy(p, corpus, cfg, progress) for p in policies]
    return {
        "versions": versions(),
        "device": device_info(cfg.device),
        "config": cfg.to_dict(),
        "corpus": corpus.describe(),
        "policies": results,
        "total_seconds": time.perf_counter() - start,
    }
