"""moebal.bench: time the MoE layer against its dense-equivalent FFN and peer MoEs.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k.

Everything is timed side by side in one process: for each (config, dtype, mode) the
implementations run in interleaved rounds (the starting one rotates each round) and each
keeps its fastest round, so a neighbour's load or a frequency change hits them all alike.
The yardstick is the dense SwiGLU FFN of hidden size K*F, which does the same active
FLOPs as the MoE's experts: ``ratio = time(impl) / time(dense)``, 1.0 being the practical
limit. All MoEs share one router (softmax top-K, renormalised, no balancing loss) with the
same random gate, which routes random tokens roughly evenly.

Entry points: ``run_layer_bench(...) -> dict`` (JSON-ready), ``format_table(result)``,
``save_json(result, path)`` and ``plot(json_path, png_path)`` (matplotlib, imported lazily).
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = [
    "LayerConfig", "CONFIGS", "DTYPES", "MODES", "run_layer_bench", "format_table", "save_json", "plot",
    "load_peers_module", "build_impls", "make_inputs", "run_once", "gemm_floor", "TIMERS",
]

SCHEMA = "moebal.bench.layer/1"
# "cpu": CPU time of this process (time.process_time, user + system, so page faults count):
# with one thread it is the work done, and it does not grow when other processes share
# the cores, which wall time does. "wall": time.perf_counter. "auto": cpu for one thread,
# wall otherwise (threads that wait or spin make CPU time meaningless).
TIMERS = ("auto", "cpu", "wall")
_CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclass(frozen=True)
class LayerConfig:
    """One benchmark shape: T tokens through an MoE of E experts (hidden F each), top-K."""

    name: str
    tokens: int  # T
    d_model: int  # D
    d_ff: int  # F
    num_experts: int  # E
    top_k: int  # K

    def __post_init__(self):
        for field in ("tokens", "d_model", "d_ff", "num_experts", "top_k"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LayerConfig.{field} must be an int >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"LayerConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")

    @property
    def active_flops_fwd(self) -> int:
        """FLOPs of the experts' (= the dense-equivalent FFN's) forward: 3 GEMMs of T x D x KF."""
        return 6 * self.tokens * self.d_model * self.top_k * self.d_ff


CONFIGS = {
    "A": LayerConfig("A", 4096, 512, 256, 64, 8),  # many small experts (fine-grained, DeepSeek-like)
    "B": LayerConfig("B", 2048, 1024, 3584, 8, 2),  # few big experts (Mixtral-like)
    "C": LayerConfig("C", 1024, 256, 512, 16, 2),  # small layer: overheads show
    "tiny": LayerConfig("tiny", 64, 32, 16, 8, 2),  # smoke tests
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")


# --- building the implementations ---------------------------------------------------------


def load_peers_module():
    """``benchmarks/peers.py`` of a source checkout, or None when moebal runs from a wheel."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("moebal_bench_peers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def _build(cfg: LayerConfig, seed: int, peers, moebal_paths: Iterable[str]):
    """fp32 modules: {name: module}, the reference MoE first, then dense, then peers."""
    import moebal
    from moebal.layer import DenseFFN

    torch.manual_seed(seed)
    E, K = cfg.num_experts, cfg.top_k
    ref = moebal.MoE(cfg.d_model, cfg.d_ff, E, K, router=moebal.Router(cfg.d_model, E, K, balancer=None))
    mods = {}
    for path in moebal_paths:
        m = ref if not mods else _clone(ref)
        m.experts.path = path
        mods["moebal" if path == "auto" else f"moebal_{path}"] = m
    mods["dense"] = DenseFFN(cfg.d_model, K * cfg.d_ff, "swiglu")
    skipped = {}
    if peers:
        module = peers if not isinstance(peers, (bool, list, tuple)) else load_peers_module()
        if module is None:
            skipped["*"] = "benchmarks/peers.py not found (moebal installed without its source tree)"
        else:
            names = list(peers) if isinstance(peers, (list, tuple)) else None
            avail = module.available_peers()
            if names is None:
                names = list(avail)
            for name in names:
                if name not in avail:
                    skipped[name] = "not available here (is transformers installed?)"
            mods.update(module.build_peers(ref, [n for n in names if n in avail]))
    return ref, mods, skipped


def build_impls(config, dtype="fp32", peers=True, moebal_paths=("auto", "grouped"), seed: int = 0) -> dict:
    """The implementations ``run_layer_bench`` times, in ``dtype``: {name: module x [T, D] -> y}.

    ``"moebal"`` (and ``"moebal_<path>"`` for other expert paths), ``"dense"`` and the peers;
    all MoEs share the router gate and expert weights of the seeded reference.
    """
    cfg = _resolve_configs([config])[0]
    _, mods, _ = _build(cfg, seed, peers, moebal_paths)
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return {k: v.to(dt) for k, v in mods.items()}


def make_inputs(config, dtype="fp32", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [T, D] requiring grad, output gradient [T, D])`` as ``run_layer_bench`` draws them."""
    cfg = _resolve_configs([config])[0]
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(cfg.tokens, cfg.d_model, generator=gen)
    g = torch.randn(cfg.tokens, cfg.d_model, generator=gen)
    return x.to(dt).requires_grad_(True), g.to(dt)


def _clone(module):
    import copy

    return copy.deepcopy(module)


def _peer_errors(ref, mods, x_TD) -> dict[str, float]:
    """Max abs output difference of every implementation from the moebal reference."""
    out = {}
    with torch.no_grad():
        y_ref = ref(x_TD).float()
        for name, m in mods.items():
            if name == "dense" or m is ref:
                continue
            out[name] = (m(x_TD).float() - y_ref).abs().max().item()
    return out


# --- timing --------------------------------------------------------------------------------


def _zero_grads(m, x):
    for p in m.parameters():
        p.grad = None
    x.grad = None


def run_once(m, x, g, mode: str, timer: str = "wall") -> float:
    """One timed forward (``mode="fwd"``) or forward+backward of ``m`` on ``x``; seconds.

    ``timer`` is ``"wall"`` or ``"cpu"`` (see ``TIMERS``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    clock = _CLOCKS[timer]
    _zero_grads(m, x)
    t0 = clock()
    y = m(x)
    if mode == "fwd+bwd":
        y.backward(g)
    t = clock() - t0
    del y
    return t


def _time_round_robin(mods: dict, x, g, mode: str, repeats: int, warmup: int, timer: str) -> dict[str, list[float]]:
    names = list(mods)
    for _ in range(warmup):
        for n in names:
            run_once(mods[n], x, g, mode, timer)
    times = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            times[n].append(run_once(mods[n], x, g, mode, timer))
    for m in mods.values():
        _zero_grads(m, x)
    return times


def _stage_times(moe, x_TD, g_TD, repeats: int, timer: str = "wall") -> dict:
    """Fastest time of each stage of one ``moebal.MoE`` forward and backward, in seconds.

    The stages run as the layer runs them, cut apart by ``detach()`` so each backward can be
    timed alone; the per-stage sum is within a few percent of the whole-layer time.
    """
    from moebal.dispatch import combine_rows, dispatch_rows
    from moebal.plan import build_plan

    best: dict[str, float] = {}
    clock = _CLOCKS[timer]

    def keep(name, t):
        best[name] = min(best.get(name, float("inf")), t)

    for _ in range(repeats + 1):  # the first round warms up
        _zero_grads(moe, x_TD)
        t = [clock()]
        routing = moe.router(x_TD)
        t.append(clock())
        plan = build_plan(routing.indices, moe.num_experts, moe.capacity(x_TD.shape[0]), routing.weights, moe.drop_policy)
        t.append(clock())
        xs = dispatch_rows(x_TD, plan, moe.backend)
        t.append(clock())
        xs_in = xs.detach().requires_grad_(True)
        ys = moe.experts(xs_in, plan)
        t.append(clock())
        ys_in = ys.detach().requires_grad_(True)
        w_in = routing.weights.detach().requires_grad_(True)
        y = combine_rows(ys_in, plan, w_in, moe.backend)
        t.append(clock())
        y.backward(g_TD)
        t.append(clock())
        ys.backward(ys_in.grad)
        t.append(clock())
        xs.backward(xs_in.grad)
        t.append(clock())
        routing.weights.backward(w_in.grad)
        t.append(clock())
        names = ("fwd.router", "fwd.plan", "fwd.dispatch", "fwd.experts", "fwd.combine",
                 "bwd.combine", "bwd.experts", "bwd.dispatch", "bwd.router")
        for name, a, b in zip(names, t, t[1:]):
            keep(name, b - a)
        del routing, plan, xs, xs_in, ys, ys_in, w_in, y
    _zero_grads(moe, x_TD)
    fwd = {k[4:]: v for k, v in best.items() if k.startswith("fwd.")}
    bwd = {k[4:]: v for k, v in best.items() if k.startswith("bwd.")}
    return {"fwd_s": fwd, "bwd_s": bwd, "sum_s": sum(best.values())}


def _routing_stats(moe, x_TD) -> dict:
    from moebal import stats

    with torch.no_grad():
        idx = moe.router(x_TD).indices
    load = stats.expert_load(idx, moe.num_experts)
    return {"max_violation": float(stats.max_violation(load)), "min_load": int(load.min()), "max_load": int(load.max())}


def gemm_floor(config, dtype="fp32", repeats: int = 3, timer: str = "cpu") -> dict:
    """The practical limit of any per-expert-GEMM MoE here: its six GEMMs vs the dense FFN's.

    Times the forward and backward GEMMs alone (no routing, no activation, warm
    preallocated buffers), with every expert getting exactly T*K/E rows, and returns both
    times and ``ratio`` = per-expert / dense. A layer cannot beat this ratio by more than the
    dense FFN's own non-GEMM share.
    """
    cfg = _resolve_configs([config])[0]
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    T, D, F_, E, K = cfg.tokens, cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k
    if (T * K) % E:
        raise ValueError(f"gemm_floor needs T*K divisible by E, got {cfg}")
    R, H, rows = T * K, 2 * F_, T * K // E
    new = lambda *shape: torch.randn(*shape, dtype=dt)  # noqa: E731
    x, w_in, w_out, a, g, gh = new(T, D), new(2 * K * F_, D), new(D, K * F_), new(T, K * F_), new(T, D), new(T, 2 * K * F_)
    outs = [torch.empty(T, 2 * K * F_, dtype=dt), torch.empty(T, D, dtype=dt), torch.empty(T, K * F_, dtype=dt),
            torch.empty(D, K * F_, dtype=dt), torch.empty(T, D, dtype=dt), torch.empty(2 * K * F_, D, dtype=dt)]

    def dense():
        torch.mm(x, w_in.t(), out=outs[0])
        torch.mm(a, w_out.t(), out=outs[1])
        torch.mm(g, w_out, out=outs[2])
        torch.mm(g.t(), a, out=outs[3])
        torch.mm(gh, w_in, out=outs[4])
        torch.mm(gh.t(), x, out=outs[5])

    xs, ws_in, ws_out, a_s, g_s, gh_s = new(R, D), new(E, D, H), new(E, F_, D), new(R, F_), new(R, D), new(R, H)
    outs_e = [torch.empty(R, H, dtype=dt), torch.empty(R, D, dtype=dt), torch.empty(R, F_, dtype=dt),
              torch.empty(E, F_, D, dtype=dt), torch.empty(R, D, dtype=dt), torch.empty(E, D, H, dtype=dt)]

    def per_expert():
        for e in range(E):
            r = slice(e * rows, (e + 1) * rows)
            torch.mm(xs[r], ws_in[e], out=outs_e[0][r])
            torch.mm(a_s[r], ws_out[e], out=outs_e[1][r])
            torch.mm(g_s[r], ws_out[e].t(), out=outs_e[2][r])
            torch.mm(a_s[r].t(), g_s[r], out=outs_e[3][e])
            torch.mm(gh_s[r], ws_in[e].t(), out=outs_e[4][r])
            torch.mm(xs[r].t(), gh_s[r], out=outs_e[5][e])

    clock = _CLOCKS[timer]
    best = {"dense": float("inf"), "per_expert": float("inf")}
    dense(), per_expert()
    for _ in range(repeats):
        for name, fn in (("dense", dense), ("per_expert", per_expert)):
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return {"config": cfg.name, "dtype": dtype if isinstance(dtype, str) else str(dt), "timer": timer,
            "dense_gemms_s": best["dense"], "per_expert_gemms_s": best["per_expert"],
            "ratio": best["per_expert"] / best["dense"]}


# --- the entry point -----------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    import moebal

    out = {"python": platform.python_version(), "torch": torch.__version__, "moebal": moebal.__version__}
    for pkg in ("transformers", "triton", "numpy"):
        if importlib.util.find_spec(pkg) is not None:
            try:
                out[pkg] = __import__(pkg).__version__
            except Exception:  # a broken optional install must not stop the benchmark
                out[pkg] = "unimportable"
    return out


def environment(threads) -> dict:
    """Device name, library versions and threading of this process (the JSON header)."""
    return {
        "device": {
            "type": "cpu",
            "name": _cpu_name(),
            "logical_cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn": torch.backends.mkldnn.is_available(),
        },
        "versions": _versions(),
        "threads": list(threads),
        "platform": f"{platform.system()} {platform.machine()}",
    }


def _resolve_configs(configs) -> list[LayerConfig]:
    out = []
    for c in configs:
        if isinstance(c, LayerConfig):
            out.append(c)
        elif c in CONFIGS:
            out.append(CONFIGS[c])
        else:
            raise ValueError(f"unknown config {c!r}; known: {sorted(CONFIGS)} or a LayerConfig")
    return out


def run_layer_bench(
    configs=("A", "B", "C"),
    dtypes=("fp32", "bf16"),
    modes=MODES,
    threads=1,
    peers=True,
    repeats: int = 5,
    warmup: int = 1,
    stages: bool = True,
    moebal_paths=("auto", "grouped"),
    seed: int = 0,
    timer: str = "auto",
    floor: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time moebal.MoE, the dense-equivalent SwiGLU FFN and peer MoEs side by side.

    Args:
        configs: names from ``CONFIGS`` ("A", "B", "C", "tiny") or ``LayerConfig``s.
        dtypes: "fp32" and/or "bf16" (modules and activations in that dtype).
        modes: "fwd" (forward with autograd recording, as in training) and/or "fwd+bwd".
        threads: an int or a sequence of ints; each is a full pass with
            ``torch.set_num_threads``.
        peers: True (all of ``benchmarks/peers.py`` that can run here), False, or a list
            of peer names.
        repeats: timed rounds; each implementation keeps its fastest.
        warmup: untimed rounds first (buffers, oneDNN primitives).
        stages: also time each stage of the moebal layer (router, plan, dispatch, experts,
            combine; forward and backward).
        moebal_paths: expert paths timed as separate rows: "auto" is the default layer
            ("moebal"), "grouped" the grouped_mm path ("moebal_grouped"), "loop".
        timer: "auto" (CPU time of the process with one thread, wall time with more),
            "cpu" or "wall"; see ``TIMERS``. The run records which it used.
        floor: also measure ``gemm_floor`` per config and dtype (into ``gemm_floor``).
        progress: called with a one-line message as each measurement finishes.

    Returns a JSON-ready dict: the environment, then ``runs`` (one per threads x config
    x dtype x mode with per-implementation times, tokens/s and ratios to dense) and
    ``stages``.
    """
    threads = [threads] if isinstance(threads, int) else list(threads)
    cfgs = _resolve_configs(configs)
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; known: {sorted(DTYPES)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; known: {MODES}")
    if timer not in TIMERS:
        raise ValueError(f"unknown timer {timer!r}; known: {TIMERS}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    say = progress or (lambda msg: None)
    result = {"schema": SCHEMA, **environment(threads), "settings": {
        "repeats": repeats, "warmup": warmup, "seed": seed, "timer": timer,
        "statistic": "fastest of interleaved rounds (the starting implementation rotates)",
        "fwd": "forward with autograd recording (training forward), output then dropped",
        "fwd+bwd": "forward + backward of a fixed random output gradient; grads of x and all weights",
        "dense": "DenseFFN(D, K*F, swiglu): two nn.Linear, same active FLOPs as the experts",
        "router": "moebal.Router softmax top-K renormalised, no balancing loss; peers copy its gate",
    }, "runs": [], "stages": [], "gemm_floor": [], "skipped_peers": {}}
    old_threads = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            clock = timer if timer != "auto" else ("cpu" if n_threads == 1 else "wall")
            for cfg in cfgs:
                ref32, mods32, skipped = _build(cfg, seed, peers, moebal_paths)
                result["skipped_peers"].update(skipped)
                x32, g32 = make_inputs(cfg, "fp32", seed)
                x32 = x32.detach()
                errors32 = _peer_errors(ref32, mods32, x32)
                routing = _routing_stats(ref32, x32)
                for dname in dtypes:
                    dtype = DTYPES[dname]
                    mods = mods32 if dtype == torch.float32 else {k: _clone(v).to(dtype) for k, v in mods32.items()}
                    ref = mods["moebal"] if "moebal" in mods else next(iter(mods.values()))
                    x = x32.to(dtype).requires_grad_(True)
                    g = g32.to(dtype)
                    errors = errors32 if dtype == torch.float32 else _peer_errors(ref, mods, x.detach())
                    for mode in modes:
                        times = _time_round_robin(mods, x, g, mode, repeats, warmup, clock)
                        run = _summarise(cfg, dname, mode, n_threads, times, errors, routing)
                        run["timer"] = clock
                        result["runs"].append(run)
                        say(_one_line(run))
                    if stages and "moebal" in mods:
                        st = _stage_times(mods["moebal"], x, g, repeats, clock)
                        result["stages"].append({"config": cfg.name, "dtype": dname, "threads": n_threads,
                                                 "timer": clock, **st})
                        say(f"stages {cfg.name} {dname} t={n_threads}: " + ", ".join(
                            f"{k} {v * 1e3:.1f}" for k, v in {**_prefixed(st)}.items()) + " ms")
                    del mods, x, g
                    gc.collect()
                    if floor and (cfg.tokens * cfg.top_k) % cfg.num_experts == 0:
                        fl = gemm_floor(cfg, dname, repeats, clock)
                        result["gemm_floor"].append({**fl, "threads": n_threads})
                        say(f"gemm floor {cfg.name} {dname} t={n_threads}: per-expert GEMMs {fl['ratio']:.3f} x dense GEMMs")
                del ref32, mods32
                gc.collect()
    finally:
        torch.set_num_threads(old_threads)
    return result


def _prefixed(st: dict) -> dict:
    return {**{f"fwd.{k}": v for k, v in st["fwd_s"].items()}, **{f"bwd.{k}": v for k, v in st["bwd_s"].items()}}


def _summarise(cfg, dname, mode, n_threads, times, errors, routing) -> dict:
    best = {n: min(ts) for n, ts in times.items()}
    med = {n: statistics.median(ts) for n, ts in times.items()}
    dense, dense_med = best.get("dense"), med.get("dense")
    impls = {}
    for n, ts in times.items():
        impls[n] = {
            "times_s": ts,
            "best_s": best[n],
            "median_s": med[n],
            "tokens_per_s": cfg.tokens / best[n],
            "ratio_to_dense": best[n] / dense if dense else None,
            "median_ratio_to_dense": med[n] / dense_med if dense_med else None,
        }
        if n in errors:
            impls[n]["max_abs_err_vs_moebal"] = errors[n]
    flops = cfg.active_flops_fwd * (3 if mode == "fwd+bwd" else 1)
    return {
        "config": asdict(cfg), "dtype": dname, "mode": mode, "threads": n_threads,
        "dense_gflops_per_s": flops / dense / 1e9 if dense else None,
        "routing": routing, "impls": impls,
    }


def _one_line(run) -> str:
    ratios = ", ".join(
        f"{n} {v['ratio_to_dense']:.2f}" for n, v in run["impls"].items() if n != "dense" and v["ratio_to_dense"]
    )
    dense = run["impls"].get("dense", {}).get("best_s")
    head = f"{run['config']['name']} {run['dtype']} {run['mode']} t={run['threads']} ({run.get('timer', 'wall')})"
    return f"{head}: dense {dense * 1e3:.1f} ms; x dense: {ratios}" if dense else f"{head}: {ratios}"


# --- reporting -----------------------------------------------------------------------------


def format_table(result: dict) -> str:
    """A plain-text table: per threads and dtype, rows config x mode, columns ratio to dense."""
    lines = []
    dev = result.get("device", {})
    vers = result.get("versions", {})
    lines.append(f"device: {dev.get('name')} ({dev.get('cpu_capability')}); torch {vers.get('torch')}"
                 + (f", transformers {vers['transformers']}" if "transformers" in vers else ""))
    groups: dict[tuple, list] = {}
    for run in result["runs"]:
        groups.setdefault((run["threads"], run["dtype"]), []).append(run)
    for (n_threads, dname), runs in groups.items():
        names = []
        for run in runs:
            names += [n for n in run["impls"] if n != "dense" and n not in names]
        header = ["config", "mode", "dense ms", "dense GF/s"] + names
        rows = [header]
        for run in runs:
            d = run["impls"].get("dense", {})
            row = [run["config"]["name"], run["mode"], f"{d.get('best_s', float('nan')) * 1e3:.1f}",
                   f"{run.get('dense_gflops_per_s') or float('nan'):.0f}"]
            for n in names:
                v = run["impls"].get(n)
                row.append(f"{v['ratio_to_dense']:.2f}" if v and v["ratio_to_dense"] else "-")
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        timer = runs[0].get("timer", "wall")
        lines.append(f"\nthreads={n_threads} dtype={dname}  ({timer} time / dense-equivalent {timer} time; lower is better)")
        for r in rows:
            lines.append("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if result.get("stages"):
        lines.append("\nmoebal stages (ms, fastest round): forward | backward")
        for st in result["stages"]:
            fwd = " ".join(f"{k} {v * 1e3:.1f}" for k, v in st["fwd_s"].items())
            bwd = " ".join(f"{k} {v * 1e3:.1f}" for k, v in st["bwd_s"].items())
            lines.append(f"  {st['config']} {st['dtype']} t={st['threads']}: {fwd} | {bwd}")
    if result.get("skipped_peers"):
        lines.append("\nskipped peers: " + "; ".join(f"{k}: {v}" for k, v in result["skipped_peers"].items()))
    return "\n".join(lines)


def save_json(result: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def plot(json_path, png_path) -> None:
    """Bar chart of time / dense time per config, one panel per (threads, dtype, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    result = json.loads(Path(json_path).read_text())
    panels: dict[tuple, list] = {}
    for run in result["runs"]:
        panels.setdefault((run["threads"], run["dtype"], run["mode"]), []).append(run)
    keys = sorted(panels)
    ncols = 2
    nrows = max(1, (len(keys) + ncols - 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        runs = panels[key]
        configs = [r["config"]["name"] for r in runs]
        names = []
        for r in runs:
            names += [n for n in r["impls"] if n != "dense" and n not in names]
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            vals = [(r["impls"].get(n) or {}).get("ratio_to_dense") or 0.0 for r in runs]
            pos = [c + (i - (len(names) - 1) / 2) * width for c in range(len(configs))]
            bars = ax.bar(pos, vals, width, label=n)
            for b, v in zip(bars, vals):
                if v:
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.set_xticks(range(len(configs)), configs)
        ax.set_ylabel("time / dense-equivalent")
        threads, dname, mode = key
        ax.set_title(f"{mode}, {dname}, {threads} thread(s), {runs[0].get('timer', 'wall')} time")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    dev = result.get("device", {}).get("name", "")
    fig.suptitle(f"MoE layer vs dense SwiGLU FFN of equal active FLOPs ({dev}, torch {result['versions']['torch']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
