"""The embedded corpus: bytes of the running interpreter's standard-library sources.

No downloads: every Python installation carries a few megabytes of its own source. Files
are the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` in sorted order, minus
third-party packages and the interpreter's own test suites (which are mostly data, not
code people write). Each file goes to validation when the sha256 of its relative POSIX
path falls in the first ``val_percent`` percent of the hash range, so the split depends on
the path alone: the same file lands on the same side on every machine and Python version.

The training files' joined stream is cut into 64 KiB chunks and every 20th is held out
(``val_in``): a validation split from the training distribution, as the loss-free paper
measures MaxVio_global, next to the held-out files (``val``), which differ in mix.

Tokens are bytes (vocabulary 256). Files are joined with a NUL byte, which never occurs in
source text, as a document separator.

Shape legend: B windows per batch, S window length (tokens predicted per window).
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Corpus", "load_corpus", "stdlib_files", "is_validation", "SKIP_DIRS"]

# Directory names skipped anywhere under the stdlib root.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SEPARATOR = 0  # NUL byte between files
# validation from the training distribution: chunk i of the joined training files is held
# out (never trained on) when i % HOLD_EVERY == HOLD_AT, 5 % of the training bytes
CHUNK, HOLD_EVERY, HOLD_AT = 65536, 20, 7


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Sorted relative POSIX paths of the corpus files under ``root`` (default: the stdlib)."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library directory not found: {root}")
    rels = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        rels.append(rel.as_posix())
    return sorted(rels)


def is_validation(rel_path: str, val_percent: float = 10.0) -> bool:
    """True when the file at ``rel_path`` belongs to the validation split."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_percent / 100.0 * 2**64


@dataclass
class Corpus:
    """Train and validation byte streams plus what they were made of."""

    root: str
    train_files: list[str]
    val_files: list[str]
    train: torch.Tensor  # uint8 [N_train]: the training files minus the held-out chunks
    val: torch.Tensor  # uint8 [N_val]: the validation files
    sha256: str  # of both streams, to tell whether two runs saw the same text
    val_in: torch.Tensor | None = None  # uint8: held-out chunks of the training files (same distribution)

    def describe(self) -> dict:
        return {
            "source": "standard-library *.py files of the running interpreter",
            "skip_dirs": sorted(SKIP_DIRS),
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
            "val_in_bytes": 0 if self.val_in is None else int(self.val_in.numel()),
            "val_in_rule": f"chunk i of {CHUNK:,} bytes of the training stream when i % {HOLD_EVERY} == {HOLD_AT}",
            "sha256": self.sha256,
        }

    def train_batches(self, batch: int, seq_len: int, seed: int):
        """Endless ``(inputs, targets)`` int64 ``[B, S]`` batches of shuffled train windows.

        The stream is cut into non-overlapping windows of ``S + 1`` bytes; a generator
        seeded with ``seed`` shuffles them once per epoch, so the order is the same for
        every policy and every run with the same seed.
        """
        windows_WS = _windows(self.train, seq_len)
        if windows_WS.shape[0] < batch:
            raise ValueError(f"train split has {windows_WS.shape[0]} windows of {seq_len + 1} bytes, need {batch}")
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(windows_WS.shape[0], generator=gen)
            for start in range(0, order.numel() - batch + 1, batch):
                chunk_BS = windows_WS[order[start:start + batch]].long()
                yield chunk_BS[:, :-1], chunk_BS[:, 1:]

    def val_batches(self, batch: int, seq_len: int, max_tokens: int | None = None, split: str = "val"):
        """Evaluation ``(inputs, targets)`` batches in stream order, at most ``max_tokens``.

        When the split holds more windows than ``max_tokens`` allows, windows are taken
        evenly spaced over the whole stream so every part of it is represented. Only
        full batches are used (BASE needs a fixed batch size); at least one is returned.
        ``split="train"`` samples the training stream the same way (to tell a shift
        between the splits from the balance a policy reached); ``split="val_in"`` reads
        the held-out chunks of the training files (validation from the training
        distribution, never trained on).
        """
        if split not in ("val", "val_in", "train"):
            raise ValueError(f"split must be 'val', 'val_in' or 'train', got {split!r}")
        stream = {"val": self.val, "val_in": self.val_in, "train": self.train}[split]
        if stream is None:
            raise ValueError("this corpus has no held-out training chunks (val_in)")
        windows_WS = _windows(stream, seq_len)
        count = windows_WS.shape[0]
        if max_tokens is not None:
            count = min(count, max(batch, max_tokens // seq_len))
        count -= count % batch
        if count < batch:
            raise ValueError(f"{split} split has {windows_WS.shape[0]} windows of {seq_len + 1} bytes, need {batch}")
        pick = torch.linspace(0, windows_WS.shape[0] - 1, count).round().long()
        chosen_WS = windows_WS[pick].long()
        for start in range(0, count, batch):
            chunk_BS = chosen_WS[start:start + batch]
            yield chunk_BS[:, :-1], chunk_BS[:, 1:]


def _windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = stream.numel() // (seq_len + 1)
    return stream[: n * (seq_len + 1)].view(n, seq_len + 1)


def _join(root: Path, rels: list[str]) -> bytes:
    parts = []
    for rel in rels:
        parts.append((root / rel).read_bytes())
        parts.append(bytes([SEPARATOR]))
    return b"".join(parts)


def load_corpus(root: str | Path | None = None, val_percent: float = 10.0) -> Corpus:
    """Read the corpus; deterministic for a given set of files."""
    if not 0 < val_percent < 100:
        raise ValueError(f"val_percent must be in (0, 100), got {val_percent!r}")
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = stdlib_files(root)
    val_files = [f for f in files if is_validation(f, val_percent)]
    train_files = [f for f in files if not is_validation(f, val_percent)]
    if not train_files or not val_files:
        raise ValueError(f"corpus under {root} has {len(train_files)} train and {len(val_files)} validation files")
    stream, val_bytes = _join(root, train_files), _join(root, val_files)
    chunks = [stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]
    train_bytes = b"".join(c for i, c in enumerate(chunks) if i % HOLD_EVERY != HOLD_AT)
    val_in_bytes = b"".join(c for i, c in enumerate(chunks) if i % HOLD_EVERY == HOLD_AT)
    digest = hashlib.sha256(train_bytes + b"\x00--split--\x00" + val_bytes + b"\x00--in--\x00" + val_in_bytes).hexdigest()
    to_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(str(root), train_files, val_files, to_tensor(train_bytes), to_tensor(val_bytes), digest,
                  to_tensor(val_in_bytes) if val_in_bytes else None)  # a corpus under 8 chunks holds none out
