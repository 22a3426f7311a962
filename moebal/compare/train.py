"""Train one small MoE language model per balancing policy and measure balance and loss.

Every policy starts from the same initial weights (the same seed before construction)
and sees the same batches in the same order; only the router's balancer differs.

Measured per policy:
- ``val_bpb``: validation cross-entropy in bits per byte on the held-out files
  (model.eval(): BASE routes greedily); ``val_in_bpb`` on held-out chunks of the training
  files (the training distribution, never trained on).
- ``maxvio_global``: MaxVio of the expert counts summed over the validation batches,
  per layer, averaged over layers (Wang et al. 2024), on the held-out files;
  ``maxvio_global_in`` on the held-out training chunks, where the paper measures it.
- ``maxvio_batch``: per-step MaxVio of each training batch, averaged over the last 20 %
  of the steps and over layers.
- ``dropped_frac``: share of routed pairs that the capacity dropped in training (0 when
  dropless); ``overflow_frac_cf1``: the share a capacity factor of 1.0 would have dropped,
  over the same steps as ``maxvio_batch``.
- ``tokens_per_s``: training tokens per second, wall clock of the training loop.

Also recorded: ``maxvio_global_train`` (training counts summed over every step),
``maxvio_global_train_last`` (summed over the last 20 % of steps) and
``maxvio_global_train_eval`` (eval mode, as many training bytes as validation bytes), which
separate an early transient and a train/validation shift from the balance reached;
``score_spread_per_layer``
(max - min over experts of the mean validation router score: the range a loss-free bias
must cover, to compare with ``steps * rate``); and the final loss-free biases.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

import moebal
from moebal.backend import explain_auto
from moebal.compare.corpus import Corpus, load_corpus
from moebal.compare.model import ModelConfig, MoELM
from moebal.compare.policies import DEFAULT_POLICIES, Policy, parse_policy
from moebal.stats import BalanceMeter, max_violation

__all__ = ["CompareConfig", "train_policy", "run_compare", "summarize"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CompareConfig:
    steps: int = 300
    batch: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_tokens: int = 65536
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
    """Linear warmup (at most a tenth of the run), then cosine decay to ``min_lr_ratio * lr``."""
    warmup = min(cfg.warmup, cfg.steps // 10)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
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


def build_model(cfg: CompareConfig, policy: Policy, train_tokens: torch.Tensor | None = None) -> MoELM:
    """The model for ``policy``, initialised from ``cfg.seed`` (identical for every policy);
    ``train_tokens`` (the training split) fit a hash policy's table."""
    m = cfg.model
    layer_cfg = replace(m, top_k=policy.layer_top_k(m.top_k, m.num_experts))  # dynamic k: K is the most per token
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(cfg.seed)
        return MoELM(layer_cfg, lambda: policy.make_router(m.d_model, m.num_experts, m.top_k, train_tokens))


def _eval_pass(model: MoELM, batches, device: torch.device, meter: BalanceMeter, score_sum_LE: torch.Tensor):
    """Forward ``batches`` in eval mode: (summed cross-entropy in nats, tokens); fills ``meter`` and scores."""

    def record_scores(i: int):
        def hook(_module, _inputs, routing) -> None:
            if routing.scores is not None:  # a gate-free hash router has no scores; null experts' columns are cut
                score_sum_LE[i] += routing.scores.detach()[:, : score_sum_LE.shape[1]].sum(0).double().cpu()

        return hook

    layers = model.moe_layers()
    hooks = [layer.router.register_forward_hook(record_scores(i)) for i, (_, layer) in enumerate(layers)]
    total_nats, total_tokens = 0.0, 0
    model.eval()
    try:
        for inputs_BS, targets_BS in batches:
            logits = model(inputs_BS.to(device))
            total_nats += float(F.cross_entropy(logits.flatten(0, 1), targets_BS.to(device).flatten(), reduction="sum"))
            total_tokens += targets_BS.numel()
            for name, layer in layers:
                meter.update(name, layer.last_stats.load)
    finally:
        for hook in hooks:
            hook.remove()
        model.train()
    return total_nats, total_tokens


@torch.no_grad()
def evaluate(model: MoELM, corpus: Corpus, cfg: CompareConfig) -> dict:
    """Validation bits per byte and balance, in eval mode (BASE routes greedily).

    The same balance measure is also taken on as many training bytes, so that a shift
    between the splits can be told apart from the balance a policy reached.
    """
    device = torch.device(cfg.device)
    names = [name for name, _ in model.moe_layers()]
    E = cfg.model.num_experts
    val_meter, train_meter = BalanceMeter(), BalanceMeter()
    score_sum_LE = torch.zeros(len(names), E, dtype=torch.float64)  # validation router scores per expert
    nats, tokens = _eval_pass(
        model, corpus.val_batches(cfg.batch, cfg.seq_len, cfg.val_tokens), device, val_meter, score_sum_LE
    )
    _eval_pass(
        model, corpus.val_batches(cfg.batch, cfg.seq_len, cfg.val_tokens, split="train"), device, train_meter,
        torch.zeros(len(names), E, dtype=torch.float64),
    )
    in_dist = {}
    if corpus.val_in is not None:  # held-out chunks of the training files: the training distribution
        in_meter = BalanceMeter()
        nats_in, tokens_in = _eval_pass(
            model, corpus.val_batches(cfg.batch, cfg.seq_len, cfg.val_tokens, split="val_in"), device, in_meter,
            torch.zeros(len(names), E, dtype=torch.float64),
        )
        in_dist = {
            "val_in_bpb": nats_in / tokens_in / math.log(2),
            "maxvio_global_in": in_meter.maxvio_global(),
            "maxvio_global_in_per_layer": [in_meter.maxvio_global(n) for n in names],
        }
    mean_score_LE = score_sum_LE / tokens
    return {
        **in_dist,
        "val_loss_nats": nats / tokens,
        "val_bpb": nats / tokens / math.log(2),
        "val_tokens": tokens,
        "maxvio_global": val_meter.maxvio_global(),
        "maxvio_global_per_layer": [val_meter.maxvio_global(n) for n in names],
        "val_maxvio_batch": val_meter.maxvio_batch(),
        "maxvio_global_train_eval": train_meter.maxvio_global(),
        "val_load": [val_meter.summed_load(n).tolist() for n in names],
        # routed (token, expert) pairs per token and layer: top_k, fewer with null experts, any for dynamic k
        "val_experts_per_token": sum(int(val_meter.summed_load(n).sum()) for n in names) / max(1, tokens * len(names)),
        # max - min over experts of the mean router score: the range a loss-free bias must span
        "score_spread_per_layer": (mean_score_LE.max(1).values - mean_score_LE.min(1).values).tolist(),
    }


def train_policy(policy: Policy, corpus: Corpus, cfg: CompareConfig, progress: Progress | None = None) -> dict:
    """Train one model with ``policy`` and return its measurements (plain Python values)."""
    device = torch.device(cfg.device)
    model = build_model(cfg, policy, corpus.train if policy.kind == "hash" else None).to(device)
    model.train()
    opt = _optimizer(model, cfg)
    layers = model.moe_layers()
    meter = BalanceMeter()
    losses, step_maxvio, overflow, routed, dropped = [], [], [], 0, 0
    last = cfg.last_steps
    last_load_LE = torch.zeros(len(layers), cfg.model.num_experts, dtype=torch.int64)  # summed over the last steps
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

        # one device-to-host copy per step: loads and kept counts of every layer
        load_LE, kept_LE = torch.stack(
            [torch.stack((layer.last_stats.load, layer.last_stats.kept)) for _, layer in layers], dim=1
        ).cpu()
        vios = []
        for (name, _), load_E in zip(layers, load_LE):
            meter.update(name, load_E)
            vios.append(float(max_violation(load_E)))
            overflow.append(_overflow_frac(load_E, cfg.model.top_k, tokens_per_step))
        if step >= cfg.steps - last:
            last_load_LE += load_LE
        routed += int(load_LE.sum())
        dropped += int(load_LE.sum() - kept_LE.sum())
        losses.append(float(lm_loss.detach()))
        step_maxvio.append(_mean(vios))
        if progress and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            elapsed = time.perf_counter() - start
            rate = (step + 1) * tokens_per_step / elapsed
            eta = (cfg.steps - step - 1) * elapsed / (step + 1)
            loss_avg = _mean(losses[-cfg.log_every:])
            progress(
                f"[{policy.name}] step {step + 1}/{cfg.steps}  loss {loss_avg:.3f} ({loss_avg / math.log(2):.3f} bpb)  "
                f"maxvio_batch {_mean(step_maxvio[-cfg.log_every:]):.3f}  {rate:,.0f} tok/s  eta {eta:.0f}s"
            )
    _sync(device)
    train_seconds = time.perf_counter() - start

    eval_start = time.perf_counter()
    if progress:
        progress(f"[{policy.name}] evaluating: {cfg.val_tokens:,} validation bytes and as many training bytes")
    result = evaluate(model, corpus, cfg)
    eval_seconds = time.perf_counter() - eval_start
    names = [name for name, _ in layers]
    n_layers = len(layers)
    result.update(
        {
            "maxvio_batch": meter.maxvio_batch(last=last),
            "maxvio_batch_per_layer": [meter.maxvio_batch(n, last=last) for n in names],
            "maxvio_global_train": meter.maxvio_global(),
            "maxvio_global_train_last": _mean([float(max_violation(load_E)) for load_E in last_load_LE]),
            "dropped_frac": dropped / max(1, routed),
            "experts_per_token": routed / max(1, cfg.steps * tokens_per_step * n_layers),  # routed pairs per token, training
            "overflow_frac_cf1": _mean(overflow[-last * n_layers:]),
            "tokens_per_s": cfg.steps * tokens_per_step / train_seconds,
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "final_train_loss": _mean(losses[-last:]),
            "history": {"loss": losses, "maxvio_batch": step_maxvio},
            "loss_free_bias": _biases(model),
        }
    )
    if progress:
        progress(
            f"[{policy.name}] done in {train_seconds:.0f}s (+{eval_seconds:.0f}s eval)  "
            f"val {result['val_bpb']:.4f} bpb  "
            f"MaxVio_global {result['maxvio_global']:.3f}  MaxVio_batch {result['maxvio_batch']:.3f}"
        )
    return {**policy.to_dict(), **result}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


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
    seeds: list[int] | None = None,
) -> dict:
    """Train every policy (once per seed) and return the full results (what ``results.json`` holds).

    ``seeds`` (default ``[cfg.seed]``): each seed re-initialises every model and reorders
    the batches. ``policies`` holds the first seed's runs; with several seeds ``runs``
    holds every seed's and ``summary`` each policy's mean, sample standard deviation,
    min and max over the seeds (:func:`summarize`).
    """
    cfg = cfg or CompareConfig()
    policies = policies or [parse_policy(n) for n in DEFAULT_POLICIES]
    seeds = [cfg.seed] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds!r}")
    check_device(cfg.device)
    start = time.perf_counter()
    corpus = corpus or load_corpus()
    if progress:
        d = corpus.describe()
        progress(
            f"corpus: {d['train_files']} train files ({d['train_bytes']:,} bytes), "
            f"{d['val_files']} validation files ({d['val_bytes']:,} bytes)"
        )
    runs = []
    for i, seed in enumerate(seeds):
        if progress and len(seeds) > 1:
            progress(f"seed {seed} ({i + 1}/{len(seeds)})")
        seed_cfg = replace(cfg, seed=seed)
        runs.append([train_policy(p, corpus, seed_cfg, progress) for p in policies])
    out = {
        "versions": versions(),
        "device": device_info(cfg.device),
        "config": cfg.to_dict(),
        "corpus": corpus.describe(),
        "seeds": seeds,
        "policies": runs[0],
    }
    if len(seeds) > 1:
        out["runs"] = runs
        out["summary"] = summarize(runs)
    out["total_seconds"] = time.perf_counter() - start
    return out


SUMMARY_KEYS = ("val_bpb", "val_in_bpb", "maxvio_global", "maxvio_global_in", "maxvio_global_train_last", "maxvio_batch", "dropped_frac",
                "overflow_frac_cf1", "tokens_per_s", "val_experts_per_token")


def summarize(runs: list[list[dict]]) -> list[dict]:
    """Per policy and measure over the seeds' runs: ``mean``, ``sd`` (sample standard
    deviation, n - 1; 0 for one seed), ``min``, ``max``."""
    out = []
    for i, first in enumerate(runs[0]):
        stats = {}
        for key in SUMMARY_KEYS:
            values = [run[i][key] for run in runs if run[i].get(key) is not None]
            if not values:
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            stats[key] = {"mean": mean, "sd": math.sqrt(var), "min": min(values), "max": max(values)}
        out.append({"name": first["name"], "seeds": len(runs), **stats})
    return out
