"""Synthetic multi-task regression with controlled task correlation (Ma et al. 2018's protocol).

Legend: N examples, D input dim, K tasks, M sine terms.

Two dense tasks and one data-sparse task read the same input ``x ~ N(0, I_D)``. Task k's
target is ``y_k = w_k.x + sum_m sin(alpha_m * w_k.x + beta_m) + noise`` with unit vectors
``w_0 = u_0``, ``w_1 = p u_0 + sqrt(1 - p^2) u_1`` (p: the dense tasks' correlation) and
``w_2 = q u_0 + sqrt(1 - q^2) u_2`` for the sparse task (u orthonormal; alpha, beta shared
by all tasks, as in the paper, so the tasks differ only through w). Lowering p makes the
two dense tasks' labels less correlated; the sparse task has labels on only a small
fraction of the training examples (all test examples are labelled). Targets are
standardised with the training mean and standard deviation of each task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["TaskData", "make_tasks", "TASK_NAMES"]

TASK_NAMES = ("dense-a", "dense-b", "sparse")


@dataclass
class TaskData:
    x_train: torch.Tensor  # [N, D]
    y_train: torch.Tensor  # [N, K]
    labelled_train: torch.Tensor  # bool [N, K]: which training labels exist
    x_test: torch.Tensor
    y_test: torch.Tensor
    label_corr: list[float]  # Pearson correlation of the test labels: (a, b), (a, sparse), (b, sparse)


def make_tasks(
    correlation: float,
    *,
    seed: int = 0,
    d_in: int = 64,
    n_train: int = 65536,
    n_test: int = 4096,
    sparse_fraction: float = 0.01,
    sparse_correlation: float = 0.7,
    sines: int = 10,
    noise: float = 0.1,
) -> TaskData:
    """The three tasks at dense-task correlation ``correlation`` in [-1, 1]."""
    for name, v in (("correlation", correlation), ("sparse_correlation", sparse_correlation)):
        if not -1.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [-1, 1], got {v!r}")
    if not 0.0 < sparse_fraction <= 1.0:
        raise ValueError(f"sparse_fraction must be in (0, 1], got {sparse_fraction!r}")
    if n_train < 2 or n_test < 2:
        raise ValueError(f"n_train and n_test must be >= 2, got n_train={n_train!r}, n_test={n_test!r}")
    if d_in < 3:
        raise ValueError(f"d_in must be >= 3 (three orthogonal task directions), got {d_in!r}")
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_in, 3, generator=g, dtype=torch.float64))  # [D, 3] orthonormal
    w = torch.stack([
        u[:, 0],
        correlation * u[:, 0] + math.sqrt(1 - correlation**2) * u[:, 1],
        sparse_correlation * u[:, 0] + math.sqrt(1 - sparse_correlation**2) * u[:, 2],
    ], 1)  # [D, K]
    alpha = torch.randn(sines, generator=g, dtype=torch.float64)
    beta = torch.randn(sines, generator=g, dtype=torch.float64)

    def draw(n: int):
        x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
        z = x @ w  # [N, K]
        y = z + torch.sin(alpha * z[..., None] + beta).sum(-1) + noise * torch.randn(z.shape, generator=g, dtype=torch.float64)
        return x, y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    labelled = torch.ones(n_train, 3, dtype=torch.bool)
    n_sparse = max(2, round(sparse_fraction * n_train))  # two labels at least: a standard deviation
    keep = torch.randperm(n_train, generator=g)[:n_sparse]
    labelled[:, 2] = False
    labelled[keep, 2] = True
    mean = torch.stack([y_tr[labelled[:, k], k].mean() for k in range(3)])
    std = torch.stack([y_tr[labelled[:, k], k].std() for k in range(3)])
    y_tr, y_te = (y_tr - mean) / std, (y_te - mean) / std
    c = torch.corrcoef(y_te.T)
    return TaskData(
        x_train=x_tr.float(), y_train=y_tr.float(), labelled_train=labelled,
        x_test=x_te.float(), y_test=y_te.float(),
        label_corr=[float(c[0, 1]), float(c[0, 2]), float(c[1, 2])],
    )
