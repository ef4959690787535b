"""Training checkpoints that survive crashes and resume bit-exactly, with no pickle anywhere.

A checkpoint is a folder `checkpoints/step-00000100/` holding
- `config.json`, `model.safetensors`: an llmlab model checkpoint (`llmlab.load_model` reads it);
- `optimizer.safetensors`: every optimizer state tensor, keyed `state.<param index>.<name>`;
- `rng.safetensors`: torch CPU (and CUDA) generator states;
- `state.json`: step, counters, optimizer hyper-parameters and the Python and NumPy RNG states.
It is written inside a hidden temporary folder, every file fsynced, then renamed into place in
one atomic step: a crash at any moment leaves the previous checkpoints intact and at worst a
`.tmp-*` folder, which the next resume deletes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from llmlab.common import LlmlabError, atomic_write_text, fsync_dir
from llmlab.models.io import copy_tokenizer_files, load_state_into, read_state_dict, save_model, save_safetensors

STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointWriteError(LlmlabError):
    pass


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep_last: int = 3, tokenizer_dir: str | os.PathLike | None = None,
                    save_weights: Callable[[nn.Module, Path], object] = save_model) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`.

    With `tokenizer_dir`, its tokenizer files are copied in too, so the checkpoint alone is enough
    for `llmlab generate`. `save_weights(model, folder)` writes the weights: the whole model by
    default, or only what trains (a LoRA adapter).

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
            copy_tokenizer_files(tokenizer_dir, tmp)
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for i, s in opt["state"].items():
            _flatten(s, f"state.{i}.", tensors, scalars)
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_safetensors(rng, tmp / "rng.safetensors")
        py_version, py_state, py_gauss = random.getstate()
        np_state = np.random.get_state()
        full = {**state, "step": step, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
                "python_rng": [py_version, list(py_state), py_gauss],
                "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        atomic_write_text(tmp / "state.json", json.dumps(full))
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
                    load_weights: Callable[[nn.Module, Path], object] | None = None) -> dict:
    """Restore weights, optimizer state and every RNG from `path`; returns the saved `state.json`.
    `load_weights(model, folder)` reads what `save_checkpoint`'s `save_weights` wrote."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LlmlabError(f"{path / 'state.json'}: cannot resume from this checkpoint ({e})") from None
    if load_weights is None:
        load_state_into(model, read_state_dict(path), str(path))
    else:
        load_weights(model, path)
    opt_state = _unflatten({**load_file(path / "optimizer.safetensors"), **state.get("optimizer_scalars", {})})
    # JSON turned tuples such as AdamW's betas into lists; give them back their type
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, py_state, gauss = state["python_rng"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state
