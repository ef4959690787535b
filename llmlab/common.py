"""Shared plumbing for every layer: user-facing errors, device and dtype choice, seeding,
atomic file writes, terminal styling and torch.distributed set-up.

Nothing here imports another llmlab module.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


class LlmlabError(Exception):
    """Base class for errors llmlab reports to the user (clean message, exit code 1)."""


# --------------------------------------------------------------------------- devices


def choose_device(name: str = "auto") -> torch.device:
    """Resolve "auto" to cuda > mps > cpu; otherwise check that the named device exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlmlabError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """Resolve a dtype name; "auto" is bf16 on GPUs that support it and fp32 elsewhere.

    CPUs without native bf16 run bf16 matmuls far slower than fp32, so "auto" never picks it there.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise LlmlabError(f"unknown dtype {name!r}; expected one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    A crash at any point leaves either the old file or the new one, never a half-written file.
    On failure the temporary file is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` (a folder of outputs).

    The old folder is renamed aside, the new one into place, then the old one deleted: a crash
    leaves the old folder or the new one under `path` (at worst with a `.old` sibling), never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- terminal


def use_color(stream=sys.stdout) -> bool:
    """Colour only on a TTY and only when NO_COLOR is unset (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def style(text: str, code: str, stream=sys.stdout) -> str:
    """Wrap `text` in an ANSI SGR code ("1" bold, "2" dim, "31" red, "32" green) when colour is on."""
    return f"\033[{code}m{text}\033[0m" if use_color(stream) else text


# --------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment; (0, 0, 1) when not launched so."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world_size).

    Uses NCCL on CUDA and Gloo on CPU. A single process (no WORLD_SIZE) does nothing.
    """
    rank, local_rank, world_size = dist_info()
    if world_size == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size
