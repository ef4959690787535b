"""Model folders on disk: llmlab checkpoints and HF-format folders, in and out.

An llmlab checkpoint is `config.json` (`{"llmlab": {"family": ..., fields...}}`) plus
`model.safetensors`. An HF folder is `config.json` (with `model_type`) plus `model.safetensors`,
or shards named by `model.safetensors.index.json`. Pickled `pytorch_model.bin` files are refused
unless the caller opts in, and are then read with `torch.load(weights_only=True)`.
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from llmlab import config as configlib
from llmlab.common import LlmlabError, atomic_path, atomic_write_text
from llmlab.models import REGISTRY, ModelConfig, build_model
from llmlab.models.convert import (config_from_hf, config_to_hf, hf_to_llmlab_state, llmlab_to_hf_state,
                                   table_for)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DCP_DIR = "dcp"  # a sharded training checkpoint's model and optimizer, written by every rank (DCP)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


class CheckpointError(LlmlabError):
    pass


# --------------------------------------------------------------------------- reading


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder that `path` names: a folder with config.json (llmlab or HF format), or a
    run directory, whose `final/` folder (what fine-tuning exports) or else newest checkpoint is used."""
    path = Path(path)
    if not path.exists():
        raise LlmlabError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise LlmlabError(f"{path}: is a file; give a checkpoint folder or a run directory")
    if (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():
        return path / "final"
    ckpts = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / "config.json").is_file()) \
        if (path / "checkpoints").is_dir() else []
    if ckpts:
        return ckpts[-1]
    if (path / "adapter_config.json").is_file():
        raise LlmlabError(f"{path}: holds a LoRA adapter only; merge it into its base first "
                          f"(`llmlab convert BASE --adapter {path} --to llmlab --out MERGED`)")
    if (path / "checkpoints").is_dir():
        raise LlmlabError(f"{path}: a run directory without a complete checkpoint (checkpoints/ holds no step-* "
                          "folder with a config.json, and there is no final/)")
    raise LlmlabError(f"{path}: not a checkpoint (no config.json) nor a run directory (no checkpoints/ inside)")

def read_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(model config, "llmlab" | "hf") from a checkpoint folder's config.json."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        what = "a file" if Path(path).exists() else "nothing exists there"
        raise CheckpointError(f"{path}: not a directory ({what}; expected a checkpoint folder with config.json)")
    if not file.is_file():
        raise CheckpointError(f"{file}: {'not a file' if file.exists() else 'missing'} (a checkpoint folder needs "
                              "config.json)")
    data = _read_json(file, "not a valid model config")
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    if "llmlab" in data:
        fields = data["llmlab"]
        family = fields.get("family") if isinstance(fields, dict) else None
        if not isinstance(family, str) or family not in REGISTRY:
            raise CheckpointError(f"{file}: llmlab.family={family!r} is not one of {', '.join(REGISTRY)}")
        return configlib.from_dict(REGISTRY[family][0], fields, source=str(file)), "llmlab"
    return config_from_hf(data, where=str(file)), "hf"


def read_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: one safetensors file, safetensors shards with an index,
    or (only with allow_pickle) pickled weights loaded with weights_only=True."""
    path = Path(path)
    if (path / INDEX).is_file() or (path / PICKLE_WEIGHTS[1]).is_file():
        index_file = path / INDEX if (path / INDEX).is_file() else path / PICKLE_WEIGHTS[1]
        weight_map = read_shard_index(index_file)
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_file(path / shard, allow_pickle))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index_file}: tensors listed but absent from the shards: {missing[:10]}")
        return state
    if (path / DCP_DIR).is_dir() and not (path / WEIGHTS).exists():
        return read_sharded_weights(path / DCP_DIR)
    for name in (WEIGHTS, PICKLE_WEIGHTS[0]):
        if (path / name).is_file():
            return _read_file(path / name, allow_pickle)
        if (path / name).exists():  # a folder, a FIFO (reading would block), a device
            raise CheckpointError(f"{path / name}: not a regular file")
    raise CheckpointError(f"{path}: no weights found (expected {WEIGHTS} or {INDEX})")


# --------------------------------------------------------------------------- sharded checkpoints (DCP)


# what a DCP .metadata file may name: its own record types, torch's sizes, dtypes and layouts, a path
_DCP_GLOBALS = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                              torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def sharded_io(folder: Path):
    """(storage reader, load planner) for `torch.distributed.checkpoint.load` that unpickle nothing
    but data: DCP writes its index with pickle and loads non-tensor items with weights_only=False;
    here the index may name only DCP's own record types, and items load with weights_only=True."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            item = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
            else:
                self.state_dict[read_item.dest_index.fqn] = item

    return Reader(str(folder)), Planner()


def read_sharded_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a sharded checkpoint (`DCP_DIR`), gathered whole in this process, on the CPU.

    Raises:
        CheckpointError: the index is missing, damaged or names what a checkpoint does not hold.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader, planner = sharded_io(folder)
    try:
        metadata = reader.read_metadata()
        state = {name.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
                 for name, md in metadata.state_dict_metadata.items()
                 if name.startswith("model.") and isinstance(md, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": state}, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: not a readable sharded checkpoint ({type(e).__name__}: {e})") from None
    if not state:
        raise CheckpointError(f"{folder}: the sharded checkpoint holds no model tensors")
    return state


def _read_json(file: Path, invalid: str) -> object:
    """The JSON document in `file`; a CheckpointError "FILE: `invalid` (why)" when it cannot be read, is
    not UTF-8 JSON (or holds an integer of more than 4,300 digits) or nests past the recursion limit."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{file}: {invalid} (not valid JSON: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{file}: {invalid} (nested too deeply)") from None
    except OSError as e:
        raise CheckpointError(f"{file}: {invalid} (cannot be read: {e.strerror or e})") from None


def read_shard_index(index_file: Path) -> dict[str, str]:
    """The `weight_map` of a shard index: tensor name -> shard file name, a plain name in the index's folder.

    Raises:
        CheckpointError: the file is not JSON, has no weight_map of names to names, or names a shard
            elsewhere than its own folder.
    """
    data = _read_json(index_file, "not a valid shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index_file}: not a valid shard index (expected a weight_map of tensor names to "
                              "shard file names)")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_file}: shard name {shard!r} must be a plain file name")
    return weight_map


def _read_file(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: {'not a regular file' if file.exists() else 'missing'}")
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if not allow_pickle:
        raise CheckpointError(f"{file}: pickled weights can run code when loaded and are refused; "
                              "convert them to safetensors, or pass --allow-pickle if you trust the file "
                              "(it is then read with weights_only=True)")
    return _read_pickle(file)


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict read with weights_only=True: tensors and plain containers only. Whatever
    else the file holds is refused in llmlab's words: torch's own message suggests weights_only=False,
    which would run the file's code."""
    zipped = zipfile.is_zipfile(file)
    with open(file, "rb") as f:
        start = f.read(2)
    if not zipped and start == b"PK":
        raise CheckpointError(f"{file}: a damaged or truncated zip archive (a partial download or copy?)")
    if not zipped and start[:1] != b"\x80":  # the PROTO opcode that starts torch's legacy format
        raise CheckpointError(f"{file}: not a PyTorch weights file (neither a zip archive nor a pickle)")
    try:
        # only the zip format (torch >= 1.6) can be memory-mapped; the legacy one is read whole
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(e), re.DOTALL)
        what = (f"holds the Python object {found.group(1)}" if found else
                f"weights-only reading stopped at: {' '.join(detail.group(1).split())[:200]}" if detail else
                _first_sentence(e))
        raise CheckpointError(f"{file}: not a plain-tensor pickle ({what}); llmlab refuses it even with "
                              "--allow-pickle, because unpickling anything but tensors could run code: convert the "
                              "file to safetensors in a Python session you trust") from None
    except Exception as e:  # torch raises many types for damaged files; all mean the same to the user
        raise CheckpointError(f"{file}: not a readable PyTorch weights file ({_first_sentence(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        got = type(state).__name__ if not isinstance(state, dict) else "a mapping with values other than tensors"
        raise CheckpointError(f"{file}: expected a state dict (tensor names to tensors), got {got}")
    return state


def _first_sentence(error: Exception) -> str:
    """The first line and sentence of an error's text: torch appends paragraphs of advice."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0].rstrip(".")[:200]


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Register every new nn.Parameter on the meta device and leave buffers where they are created.

    A model built inside gets shapes but no parameter memory, while buffers that constructors compute
    (rotary inv_freq, ALiBi slopes) are real: the method of accelerate's
    `init_empty_weights(include_buffers=False)`. It patches `nn.Module.register_parameter` for the
    duration, so build nothing else in other threads meanwhile. Parameters are first allocated (never
    touched, so no pages are used) and initialised on meta, which does nothing.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, *,
                ignored: set[str] = frozenset()) -> None:
    """Raise CheckpointError naming the missing, unexpected (and not `ignored`) and misshapen tensors
    of `state` against `expected` (tensors or meta tensors of the right shapes), on one line: the
    first ten of each kind, and how many more."""
    missing = sorted(k for k in expected if state.get(k) is None)
    unexpected = sorted(set(state) - set(expected) - set(ignored))
    misshapen = [f"{k}: shape {tuple(state[k].shape)} but the config implies {tuple(v.shape)}"
                 for k, v in expected.items() if state.get(k) is not None and state[k].shape != v.shape]
    problems = [f"{label}{_first(items)}" for label, items in
                (("missing tensors: ", missing), ("unexpected tensors: ", unexpected), ("", misshapen)) if items]
    if problems:
        raise CheckpointError(f"{source}: weights do not match the config: " + "; ".join(problems))


def _first(items: list[str], n: int = 10) -> str:
    """The first `n` items, comma-joined, and how many more there are: one line for any count."""
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, *, assign: bool = False) -> None:
    """Check names and shapes against `model`, then copy. Tied output heads may be absent.

    With `assign` (a model built under `meta_parameters()`), the tensors become the parameters,
    cast to the model's dtype and moved to its buffers' device, so no second copy is ever made.
    """
    expected = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    check_state(state, expected, source)
    if not assign:
        model.load_state_dict(state, strict=True)
        return
    device = next(model.buffers()).device if next(model.buffers(), None) is not None else torch.device("cpu")
    model.load_state_dict({k: v.to(device=device, dtype=expected[k].dtype) for k, v in state.items()},
                          strict=True, assign=True)
    if getattr(model.config, "tie_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None,
               allow_pickle: bool = False) -> nn.Module:
    """Load an llmlab checkpoint or an HF-format folder (auto-detected) as an llmlab model in eval mode.

    Args:
        path: the folder holding config.json and the weights.
        device: where the model lives.
        dtype: parameter dtype; None keeps fp32, the fast choice on CPUs.
        allow_pickle: accept pickled `pytorch_model.bin` weights (loaded with weights_only=True).

    Raises:
        CheckpointError: a missing, corrupt or mismatched file, named with the problem.
    """
    cfg, kind = read_config(path)
    state = read_state_dict(path, allow_pickle=allow_pickle)
    if kind == "hf":
        state = hf_to_llmlab_state(state, cfg)
        head, embedding = state.get("lm_head.weight"), state.get("embed_tokens.weight")
        if getattr(cfg, "tie_embeddings", False) and head is not None and embedding is not None and \
                not torch.equal(head, embedding):
            cfg.tie_embeddings = False  # a separate head stored beside a tied config: transformers unties too
    with torch.device(device), meta_parameters():  # the file's tensors become the weights: no second copy
        model = build_model(cfg)
    load_state_into(model, state, str(path), assign=True)
    if any(t.is_meta for t in model.parameters()):
        raise CheckpointError(f"{path}: some parameters were never loaded")
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# --------------------------------------------------------------------------- writing


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write an llmlab checkpoint folder: config.json and model.safetensors (each atomically)."""
    path = Path(path)
    state = _weights(model)
    state = {k: v for k, v in state.items() if not (k == "lm_head.weight" and model.config.tie_embeddings)}
    save_safetensors(state, path / WEIGHTS)
    write_model_config(model.config, path)


def write_model_config(config: ModelConfig, path: str | os.PathLike) -> None:
    """config.json of an llmlab checkpoint folder (atomically)."""
    atomic_write_text(Path(path) / "config.json", json.dumps({"llmlab": configlib.to_dict(config)}, indent=2))


def save_hf(model: nn.Module, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
            pad_token_id: int | None = None) -> None:
    """Write an HF-format folder that `transformers` loads: config.json and safetensors weights,
    sharded with an index when larger than `max_shard_bytes`. `pad_token_id` goes into config.json:
    HF's sequence classifiers find each row's last real token by it, and refuse batches without it."""
    path = Path(path)
    hf_config = config_to_hf(model.config)
    if pad_token_id is not None:
        hf_config["pad_token_id"] = pad_token_id
    state = llmlab_to_hf_state(_weights(model), model.config, score_head=bool(model.config.num_labels))
    if model.config.tie_embeddings:
        state.pop(table_for(model.config).tied_head, None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], path / WEIGHTS)
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_safetensors(shard, path / name)
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        atomic_write_text(path / INDEX, json.dumps(index, indent=2))
    atomic_write_text(path / "config.json", json.dumps(hf_config, indent=2))


def shadowed_weights(folder: str | os.PathLike, written: str | os.PathLike) -> list[str]:
    """Weight files in `folder` that the checkpoint in `written` does not replace but a loader would
    read (an old shard index beside a new single file, or the reverse): what makes writing one
    checkpoint into another's folder unsafe."""
    folder, written = Path(folder), Path(written)
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if p.name in (WEIGHTS, INDEX, *PICKLE_WEIGHTS)
             or fnmatch.fnmatch(p.name, "model-*-of-*.safetensors") or fnmatch.fnmatch(p.name, "pytorch_model-*.bin")]
    return sorted(n for n in names if not (written / n).exists())


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation files a folder has into another; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            with atomic_path(Path(dst) / name) as tmp:
                shutil.copyfile(Path(src) / name, tmp)
            copied.append(name)
    return copied


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_safetensors(state: dict[str, torch.Tensor], file: Path) -> None:
    """Write tensors to a safetensors file atomically (temporary name, fsync, rename)."""
    # format=pt is the metadata transformers checks before it trusts a safetensors file
    with atomic_path(file) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
