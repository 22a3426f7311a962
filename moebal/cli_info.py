"""``moebal info``: versions, the device, the backend ``"auto"`` picks and the expert path table in force."""
from __future__ import annotations

import sys

__all__ = ["add_info", "backend_env_problem"]


def add_info(sub, device_type) -> None:
    """The ``info`` subcommand; ``device_type`` parses ``--device``."""
    p = sub.add_parser("info", help="versions, device and which backend 'auto' picks",
                       description="Print moebal/torch/triton versions, the device and the backend 'auto' picks, "
                                   "and why.")
    p.add_argument("--device", type=device_type, default=None,
                   help="device to explain (default: cuda if present, else cpu)")
    p.set_defaults(run=_run_info, parser=p)


def _expert_paths_line() -> str:
    """Which measured CPU path table ``path="auto"`` follows here (inference without gradients)."""
    from moebal import expert_paths

    kind, table = expert_paths.CPU_KIND, expert_paths.active_rule().table
    if not table:
        return (f"CPU kind {kind!r} has no measured table: inference takes 'loop' "
                "(moebal.expert_paths.calibrate() measures one)")
    threads = sorted({t for _, t, _ in table})
    source = "the shipped table" if expert_paths.active_rule() is expert_paths.DEFAULT_RULE else "a rule set by use_rule"
    return (f"CPU kind {kind!r}: {source}, {len(table)} cells (threads "
            + ", ".join("1" if t == 1 else "2+" for t in threads) + "; moebal.prepare_decode for inference)")


def _run_info(args, parser) -> int:
    import platform

    import torch

    from moebal.backend import explain_auto
    from moebal.compare.train import versions

    v = versions()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = [
        ("moebal", v["moebal"]),
        ("torch", v["torch"] + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)")),
        ("triton", v["triton"] or "not installed"),
        ("python", f"{v['python']} on {platform.system()} {platform.machine()}"),
        ("cuda available", f"yes, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "no"),
    ]
    if torch.device(device).type == "cuda":
        rows.append(("device", f"{device}: {torch.cuda.get_device_name(torch.device(device))}"))
    else:
        rows.append(("device", f"{device}: {platform.processor() or platform.machine()}, "
                               f"{torch.get_num_threads()} torch threads"))
    problem = backend_env_problem(device)
    try:
        backend, reason = explain_auto(device)
        rows.append(("backend 'auto'", f"{backend} — {reason}" + (" (cannot run here: see stderr)" if problem else "")))
    except ValueError as err:  # a bad MOEBAL_BACKEND value
        rows.append(("backend 'auto'", f"error: {err}"))
    rows.append(("expert paths", _expert_paths_line()))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    from moebal.compare.policies import POLICY_NAMES

    print("balancing policies (moebal compare --policies NAME,...):")
    name_width = max(len(n) for n in POLICY_NAMES)
    for name, what in POLICY_NAMES.items():
        print(f"  {name.ljust(name_width)}  {what}")
    if problem:
        print(f"moebal info: warning: {problem}", file=sys.stderr)
    return 0


def backend_env_problem(device: str) -> str | None:
    """Why ``backend="auto"`` fails on ``device`` here (a bad or unrunnable MOEBAL_BACKEND), or None."""
    from moebal.backend import resolve_backend

    try:
        resolve_backend("auto", device)
    except (ValueError, RuntimeError) as err:
        return str(err)
    return None
