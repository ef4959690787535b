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
                    state: dict, keep_last: int = 3, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`.

    With `tokenizer_dir`, its tokenizer files are copied in too, so the checkpoint alone is enough
    for `llmlab generate`.

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
        save_model(model, tmp)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        opt = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous()
                   for i, s in opt["state"].items() for k, v in s.items()}
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_safetensors(rng, tmp / "rng.safetensors")
        py_version, py_state, py_gauss = random.getstate()
        np_state = np.random.get_state()
        full = {**state, "step": step, "param_groups": opt["param_groups"],
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


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer state and every RNG from `path`; returns the saved `state.json`."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LlmlabError(f"{path / 'state.json'}: cannot resume from this checkpoint ({e})") from None
    load_state_into(model, read_state_dict(path), str(path))
    tensors = load_file(path / "optimizer.safetensors")
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        opt_state.setdefault(int(index), {})[name] = value
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
