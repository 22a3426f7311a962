"""Backend choice for dispatch/combine: ``"torch"`` or ``"triton"``.

``"auto"`` picks Triton for CUDA tensors and torch otherwise; the environment variable
``MOEBAL_BACKEND`` (``torch``/``triton``) overrides ``"auto"`` only. An explicit request is
never downgraded: ``"triton"`` on CPU tensors raises unless ``TRITON_INTERPRET=1``. When it
is ``MOEBAL_BACKEND`` that asked for Triton, the error names the variable, not an argument.
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["BACKENDS", "resolve_backend", "explain_auto"]

BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _env_override() -> str | None:
    raw = os.environ.get("MOEBAL_BACKEND", "")
    env = raw.strip().lower()
    if not env or env == "auto":
        return None
    if env not in ("torch", "triton"):
        raise ValueError(f"MOEBAL_BACKEND must be 'torch', 'triton' or 'auto' (or unset), got {raw!r}")
    return env


def _triton_blocker(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device``'s tensors here, or None when they can."""
    if not _triton_available():
        return "triton is not installed"
    if device.type != "cuda" and not _interpreting():
        return (
            f"Triton kernels need CUDA tensors (these are {device.type} tensors), or TRITON_INTERPRET=1 "
            "set before moebal is imported to run them (slowly) on the CPU"
        )
    return None


def explain_auto(device: torch.device | str) -> tuple[str, str]:
    """What ``"auto"`` resolves to on ``device``, and why (for ``moebal info``)."""
    device = torch.device(device)
    env = _env_override()
    if env is not None:
        return env, f"MOEBAL_BACKEND={env} overrides 'auto'"
    if device.type == "cuda":
        if _triton_available():
            return "triton", "CUDA tensor and triton is installed"
        return "torch", "CUDA tensor but triton is not installed"
    return "torch", f"{device.type} tensor: Triton kernels run only on CUDA (or under TRITON_INTERPRET=1 when asked explicitly)"


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Resolve a backend request for tensors on ``device``; raise when it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    forced = False
    if backend == "auto":  # explain_auto's choice, without building its message (this runs thrice a forward)
        env = _env_override()
        forced = env is not None
        backend = env if forced else "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        why = _triton_blocker(device)
        if why is not None and forced:  # the user never passed backend='triton': name what did
            raise RuntimeError(
                f"MOEBAL_BACKEND=triton in the environment makes backend='auto' use Triton, but {why}. "
                "Unset MOEBAL_BACKEND or set it to 'torch' or 'auto'."
            )
        if why is not None:
            raise RuntimeError(f"backend='triton' was requested, but {why}. Use backend='torch' or 'auto' instead.")
    return backend
