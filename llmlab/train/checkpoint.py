"""Training checkpoints that survive crashes and resume bit-exactly, with nothing unpickled.

A checkpoint is a folder `checkpoints/step-00000100/` holding
- `config.json`, `model.safetensors`: an llmlab model checkpoint (`llmlab.load_model` reads it);
- `optimizer.safetensors`: every optimizer state tensor, keyed `state.<param index>.<name>`;
- `rng.safetensors`: torch CPU (and CUDA) generator states;
- `state.json`: step, counters, optimizer hyper-parameters, the Python and NumPy RNG states, the
  SHA-256 of every other file in the folder and of its own content.
It is written inside a hidden temporary folder, every file fsynced, then renamed into place in
one atomic step: a crash at any moment leaves the previous checkpoints intact and at worst a
`.tmp-*` folder, which the next resume deletes. What a crash cannot do, a disk or a copy can: the
checksums let `verify_checkpoint` tell a damaged checkpoint before anything is loaded from it
(hashing costs about 0.8 s per GB on a CPU with SHA instructions: 0.08 s on top of the 0.12 s that
writing 100 MB to the page cache takes, and as much again to verify on resume).

A run sharded with FSDP2 writes `save_sharded_checkpoint`'s kind instead: `dcp/` holds the model and
optimizer as torch.distributed.checkpoint wrote them from every rank (read back with
`llmlab.models.io.sharded_io`, which unpickles DCP's index only into its own record types), beside
config.json, rng.safetensors and state.json ("format": "sharded"), the marker written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from llmlab.common import LlmlabError, atomic_write_text, fsync_dir
from llmlab.models.io import (DCP_DIR, CheckpointError, copy_tokenizer_files, load_state_into, read_state_dict,
                              save_model, save_safetensors, sharded_io, write_model_config)
from llmlab.tokenizer import record_bos_convention

STEP_DIR = re.compile(r"^step-(\d{8})$")
# what every training checkpoint's state.json holds, whatever the loop adds
STATE_KEYS = ("step", "param_groups", "optimizer_scalars", "python_rng", "numpy_rng")
SHARDED_STATE_KEYS = ("step", "world_size", "python_rng", "numpy_rng")  # the optimizer is in dcp/
_HASH_BLOCK = 2**22


class CheckpointWriteError(LlmlabError):
    pass


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep_last: int = 3, tokenizer_dir: str | os.PathLike | None = None,
                    save_weights: Callable[[nn.Module, Path], object] = save_model,
                    add_bos: bool | None = None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`.

    With `tokenizer_dir`, its tokenizer files are copied in too, so the checkpoint alone is enough
    for `llmlab generate`; with `add_bos` as well, the copy records whether the model saw BOS before
    every document (`llmlab.tokenizer.record_bos_convention`), the data's convention rather than
    whatever the tokenizer folder said. `save_weights(model, folder)` writes the weights: the whole
    model by default, or only what trains (a LoRA adapter).

    Raises:
        CheckpointWriteError: a weight is NaN or inf (such a checkpoint is never written).
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step:08d}"
    if final.exists():  # this step is already saved (e.g. a periodic save, then a signal)
        return final
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointWriteError(f"refusing to save step {step}: non-finite values in {', '.join(bad[:5])}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=ckpt_dir))
    try:
        save_weights(model, tmp)
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, tmp, add_bos)
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for i, s in opt["state"].items():
            _flatten(s, f"state.{i}.", tensors, scalars)
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        _commit(tmp, final, {**state, "step": step, "param_groups": opt["param_groups"],
                             "optimizer_scalars": scalars})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict, keep_last: int = 3, tokenizer_dir: str | os.PathLike | None = None,
                            add_bos: bool | None = None) -> Path:
    """Checkpoint `step` of a run whose parameters and optimizer states are sharded over its processes
    (FSDP2). Every rank calls it: each writes its shards through torch.distributed.checkpoint into
    `dcp/` of a hidden folder; then rank 0 adds config.json, the tokenizer files (recording `add_bos`
    as `save_checkpoint` does), its RNG states and, last, state.json with the checksum of every file
    (a folder without state.json is not a checkpoint) and renames the folder into place. A kill at
    any moment leaves the previous checkpoints intact. The checkpoint resumes on any number of processes, and `llmlab.load_model` reads its weights whole.

    Raises:
        CheckpointWriteError: a weight is NaN or inf on some rank (nothing is written), or rank 0 could
            not finish the folder (every rank raises).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_dir = Path(ckpt_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    final = ckpt_dir / f"step-{step:08d}"
    if final.exists():  # already saved (a periodic save, then a signal); every rank sees the same folder
        return final
    bad = torch.tensor(float(any(not torch.isfinite(_local(p)).all() for p in model.parameters())))
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise CheckpointWriteError(f"refusing to save step {step}: non-finite values in the weights")
    tmp = ckpt_dir / f".tmp-step-{step:08d}-sharded"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save of the same step
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / DCP_DIR))
    dist.barrier()
    failed = torch.zeros(())
    if rank == 0:
        try:
            write_model_config(model.config, tmp)
            if tokenizer_dir is not None:
                _copy_tokenizer(tokenizer_dir, tmp, add_bos)
            _commit(tmp, final, {**state, "step": step, "format": "sharded", "world_size": world})
            for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            failed.fill_(1)
    dist.all_reduce(failed)
    if failed.item():
        raise CheckpointWriteError(f"step {step}: rank 0 could not finish the checkpoint in {ckpt_dir}")
    return final


def _commit(tmp: Path, final: Path, state: dict) -> None:
    """Finish checkpoint folder `tmp`: this process's RNG states, then state.json (`state`, the RNGs, the
    checksum of every file and its own), written last, and the rename that makes it `final`."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_safetensors(rng, tmp / "rng.safetensors")
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    full = {**state, "python_rng": [py_version, list(py_state), py_gauss],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "files": {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}}
    full["sha256"] = _state_digest(full)
    atomic_write_text(tmp / "state.json", json.dumps(full))
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (a DTensor under FSDP2), or the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state of a sharded checkpoint into this run's (sharded or whole) model."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    states = {"model": model_state, "optimizer": optimizer_state}
    reader, planner = sharded_io(path / DCP_DIR)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(states, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
    except Exception as e:  # DCP wraps every reader's and planner's error in a CheckpointException
        raise CheckpointError(f"{path / DCP_DIR}: does not fit this run's model and optimizer "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `ckpt_dir`, oldest first (temporary folders are not listed)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: str | os.PathLike, *, clean: bool = True) -> Path | None:
    """The newest complete checkpoint; with `clean`, removes the debris of interrupted writes on the
    way (only the process that writes checkpoints may clean: another's write may be in flight)."""
    ckpt_dir = Path(ckpt_dir)
    if clean and ckpt_dir.is_dir():
        for debris in ckpt_dir.glob(".tmp-step-*"):
            shutil.rmtree(debris, ignore_errors=True)
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check that the checkpoint at `path` is whole before anything is loaded from it; returns its state.

    The SHA-256 checksums that `save_checkpoint` recorded are recomputed, so a truncated file or a
    flipped byte is found. A checkpoint from before checksums were recorded is checked by opening
    each of its safetensors files instead, which finds truncation but not every flipped byte.

    Raises:
        CheckpointError: the message names the first damaged or missing file.
    """
    path = Path(path)
    file = path / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing (not a training checkpoint)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: damaged, not readable JSON ({e})") from None
    keys = SHARDED_STATE_KEYS if isinstance(state, dict) and state.get("format") == "sharded" else STATE_KEYS
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise CheckpointError(f"{file}: damaged or not a training checkpoint's state (no {', '.join(missing)})")
    if "sha256" in state and state["sha256"] != _state_digest(state):
        raise CheckpointError(f"{file}: damaged (its content no longer matches the checksum saved with it)")
    recorded = state.get("files")
    if not isinstance(recorded, dict):  # an older checkpoint: opening a file validates its header and length
        for f in sorted(path.glob("*.safetensors")):
            try:
                with safe_open(f, framework="pt") as opened:
                    opened.keys()
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: damaged ({e})") from None
        return state
    for name, digest in recorded.items():
        f = path / name
        try:
            actual = _sha256(f)
        except FileNotFoundError:
            raise CheckpointError(f"{f}: missing from the checkpoint") from None
        except OSError as e:
            raise CheckpointError(f"{f}: cannot be read ({e.strerror})") from None
        if actual != digest:
            raise CheckpointError(f"{f}: damaged (its SHA-256 differs from the one recorded when it was saved)")
    return state


def newest_intact_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[Path | None, dict | None,
                                                                   list[tuple[Path, CheckpointError]]]:
    """(the newest complete checkpoint that `verify_checkpoint` passes, its state, the newer ones passed
    over with their errors, newest first); the first two are None when no checkpoint is intact."""
    damaged = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, verify_checkpoint(path), damaged
        except CheckpointError as e:
            damaged.append((path, e))
    return None, None, damaged


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _state_digest(state: dict) -> str:
    """SHA-256 of state.json's content without its own checksum (JSON gives floats back exactly)."""
    rest = {k: v for k, v in state.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _copy_tokenizer(src: str | os.PathLike, dst: Path, add_bos: bool | None) -> None:
    copy_tokenizer_files(src, dst)
    if add_bos is not None and (dst / "tokenizer.json").is_file():
        record_bos_convention(dst, add_bos)


def _flatten(state: dict, prefix: str, tensors: dict, scalars: dict) -> None:
    """Optimizer state into safetensors-ready tensors and JSON scalars; nested dicts (an 8-bit
    optimizer's quantization state) get '/'-joined keys."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            tensors[prefix + k] = v.detach().cpu().contiguous()
        elif isinstance(v, dict):
            _flatten(v, f"{prefix}{k}/", tensors, scalars)
        else:
            scalars[prefix + k] = v


def _unflatten(items: dict) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for key, value in items.items():
        _, index, name = key.split(".", 2)
        node = out.setdefault(int(index), {})
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    load_weights: Callable[[nn.Module, Path], object] | None = None, state: dict | None = None) -> dict:
    """Restore weights, optimizer state and every RNG from `path`; returns the saved `state.json`.
    `load_weights(model, folder)` reads what `save_checkpoint`'s `save_weights` wrote. `state` is what
    `verify_checkpoint(path)` returned, when the caller has just checked the folder (hashing a large
    checkpoint twice takes time); otherwise it is checked here.

    Raises:
        CheckpointError: a file is damaged (`verify_checkpoint`), or the checkpoint does not fit this
            model or optimizer (another shape, optimizer or set of trained parameters).
    """
    path = Path(path)
    state = verify_checkpoint(path) if state is None else state
    if state.get("format") == "sharded":
        _load_sharded(path, model, optimizer)
        _restore_rng(path, state)
        return state
    if load_weights is None:
        load_state_into(model, read_state_dict(path), str(path))
    else:
        load_weights(model, path)
    file = path / "optimizer.safetensors"
    try:
        opt_state = _unflatten({**load_file(file), **state["optimizer_scalars"]})
        # JSON turned tuples such as AdamW's betas into lists; give them back their type
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in state["param_groups"]]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: damaged ({e})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: the optimizer state does not fit this run's optimizer ({e}); was "
                              "optim.name, freeze, peft or lora changed since it was saved?") from None
    _restore_rng(path, state)
    return state


def _restore_rng(path: Path, state: dict) -> None:
    file = path / "rng.safetensors"
    try:
        rng = load_file(file)
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{file}: damaged ({e})") from None
    try:
        version, py_state, gauss = state["python_rng"]
        random.setstate((version, tuple(py_state), gauss))
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path / 'state.json'}: damaged RNG state ({e})") from None
