"""Shared plumbing for every layer: user-facing errors, device and dtype choice, seeding,
atomic file writes, terminal styling and torch.distributed set-up.

Nothing here imports another llmlab module.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch


class LlmlabError(Exception):
    """Base class for errors llmlab reports to the user (clean message, exit code 1)."""


# --------------------------------------------------------------------------- devices


def choose_device(name: str = "auto", label: str = "device") -> torch.device:
    """Resolve "auto" to cuda > mps > cpu; otherwise check that the named device exists here.

    Raises:
        LlmlabError: `name` is not auto, cpu, cuda, cuda:N or mps, or names a device this machine
            lacks; the message starts with `label` (the option that named it) and lists what exists.
    """
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    count = torch.cuda.device_count() if cuda else 0
    here = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count)), *(["mps"] if mps else [])])
    kind, colon, index = name.partition(":") if isinstance(name, str) else ("", "", "")
    if kind not in ("cpu", "cuda", "mps") or (colon and not (kind == "cuda" and index.isdigit())):
        raise LlmlabError(f"{label}={name!r}: expected auto, cpu, cuda, cuda:N or mps (this machine has {here})")
    if (kind == "cuda" and (not cuda or (colon and int(index) >= count))) or (kind == "mps" and not mps):
        raise LlmlabError(f"{label}={name!r}: no such device on this machine (it has {here}); use auto to "
                          "take the best one there is")
    return torch.device(name)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def choose_dtype(name: str, device: torch.device, label: str = "dtype") -> torch.dtype:
    """Resolve a dtype name; "auto" is bf16 on GPUs that support it and fp32 elsewhere.

    CPUs without native bf16 run bf16 matmuls far slower than fp32, so "auto" never picks it there.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise LlmlabError(f"{label}={name!r}: unknown dtype; expected one of: auto, {', '.join(_DTYPES)}")
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

    A crash at any point leaves either the old file or the new one, never a half-written file (at
    worst a hidden `.NAME.PID.*.tmp` beside it, which `check_output` removes on the next run).
    On failure the temporary file is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
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
def atomic_dir(path: str | os.PathLike, *, merge: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success what it holds lands in `path`.

    An absent or empty `path` becomes the whole folder in one rename: a crash leaves nothing or
    everything. A non-empty `path` is refused (OutputError), unless `merge`: then each file is renamed
    over its namesake in `path`, and whatever else `path` holds is left alone, because llmlab never
    removes what it did not write. On failure the temporary folder, and the parents of `path` that
    had to be created, are removed again.
    """
    path = Path(path)
    created = [p for p in path.parents if not p.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the usual mode
        yield tmp
        fsync_dir(tmp)
        try:
            os.rename(tmp, path)  # POSIX: replaces an empty folder, fails on a non-empty one
        except OSError:
            if not (merge and path.is_dir()):
                raise OutputError(f"{path}: already exists and is not empty (filled meanwhile?); "
                                  "nothing was written") from None
            _merge_into(tmp, path)
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _merge_into(src: Path, dst: Path) -> None:
    """Move the tree `src` into the folder `dst`, file by file, each renamed over its namesake."""
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_dir() and not target.is_symlink():
                _merge_into(entry, target)
                continue
            if target.exists() or target.is_symlink():
                raise OutputError(f"{target}: is in the way of the folder llmlab writes there; "
                                  "move it away or choose another output")
            os.rename(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                raise OutputError(f"{target}: is a folder where llmlab writes a file; move it away "
                                  "or choose another output")
            os.replace(entry, target)
    fsync_dir(dst)


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


# --------------------------------------------------------------------------- outputs


class OutputError(LlmlabError):
    """An output target that llmlab refuses to write: it would destroy something, or cannot be written."""


def _temp_prefix(path: Path) -> str:
    """Hidden temporary names beside `path` carry the writer's pid, so that a later run can tell the
    debris of a killed writer from a write in progress (`clean_stale_temps`)."""
    return f".{path.name}.{os.getpid()}."


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of `path` left beside it: hidden `.NAME.PID.*.tmp` files and folders
    whose process is gone (and the pid-less `.NAME.*.tmp` of older llmlab versions). Returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}."
    removed = []
    for entry in path.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix):-len(".tmp")].split(".")
        if len(parts) == 2 and parts[0].isdigit() and pid_alive(int(parts[0])):
            continue  # a writer still at work
        if len(parts) not in (1, 2):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _resolve(path: Path, where: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop
        raise OutputError(f"{where}: cannot be resolved: a loop of symbolic links ({e})") from None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (on this machine); a zombie, ended but not yet reaped, does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):  # not Linux, or gone meanwhile
        return True


def check_output(path: str | os.PathLike, *, label: str, inputs: Sequence[str | os.PathLike | None] = (),
                 overwrite: bool = False, folder: bool = True) -> Path:
    """Check, before any work, that a writer may put its output at `path`; returns it as a Path.

    Refused with an OutputError that starts with `label` (the option that named the path):
    - a target equal to, inside, or containing one of `inputs` (what the writer reads);
    - a folder target that is a file, or a file target that is a folder;
    - an existing non-empty folder, or an existing file, unless `overwrite` (writers then replace
      only the files they write and leave the rest alone);
    - a target whose nearest existing parent is not a folder this process can create files in.
    The debris of killed writers of the same target is removed on the way (`clean_stale_temps`).
    """
    path = Path(path)
    where = f"{label} {path}"
    if str(path) == "":
        raise OutputError(f"{label}: empty path")
    resolved = _resolve(path, where)
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = _resolve(Path(item), f"input {item}")
        if resolved == source:
            raise OutputError(f"{where}: is the input {item}; choose another output")
        if resolved.is_relative_to(source):
            raise OutputError(f"{where}: is inside the input {item}; choose an output outside it")
        if source.is_relative_to(resolved):
            raise OutputError(f"{where}: contains the input {item}; choose an output that does not")
    try:
        exists = path.exists() or path.is_symlink()
        if folder and exists and not path.is_dir():
            raise OutputError(f"{where}: is a file, expected a folder")
        if not folder and path.is_dir():
            raise OutputError(f"{where}: is a folder, expected a file name")
        if exists and not overwrite and (not folder or any(path.iterdir())):
            what = "a non-empty folder" if folder else "a file"
            raise OutputError(f"{where}: already exists ({what}); pass --overwrite to write over it (llmlab "
                              "replaces only the files it writes) or choose another")
    except PermissionError as e:
        raise OutputError(f"{where}: cannot be read ({e.strerror})") from None
    parent = next(p for p in (path if folder and path.is_dir() else path.parent, *path.parents)
                  if p.exists() or p == p.parent)
    if not parent.is_dir():
        raise OutputError(f"{where}: {parent} is a file, so nothing can be created under it")
    try:  # access() is not enough: root passes it on read-only mounts and pseudo file systems
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
    except OSError as e:
        raise OutputError(f"{where}: cannot write in {parent} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    clean_stale_temps(path)
    return path


# --------------------------------------------------------------------------- terminal


def read_json_object(file: str | os.PathLike, error: type[Exception] = LlmlabError) -> dict:
    """The JSON object in `file`; `error("FILE: unreadable: why")` when it cannot be read, is not UTF-8
    JSON (or holds an integer of more than 4,300 digits), nests past the recursion limit, or is not an
    object."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{file}: unreadable: {e}") from None
    except RecursionError:
        raise error(f"{file}: unreadable: nested too deeply") from None
    if not isinstance(data, dict):
        raise error(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def finite_json(value):
    """`value` with every non-finite float as None, in nested dicts and lists too: strict JSON (and a
    browser's JSON.parse) has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


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
