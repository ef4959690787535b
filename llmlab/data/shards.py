"""Token shards: flat little-endian integer arrays on disk, described by `manifest.json`.

A prepared data directory holds, per split, files `{split}_{k:04d}.bin` (the token ids of
consecutive documents, end to end, each document followed by EOS when asked) and one
`manifest.json` that records each shard's token count and sha256 (see `llmlab.data.prepare`
for the full layout). The arrays have no header: `np.memmap` reads them in place, so a corpus
far larger than memory costs only page cache, and any tool can read them given the dtype.

Ids are uint16 when the vocabulary fits (<= 65536 ids, half the disk and page cache) and
uint32 otherwise (`token_dtype`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from llmlab.common import fsync_dir
from llmlab.data import DataError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_HASH_BLOCK = 2**22


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds ids 0 .. vocab_size - 1.

    Args:
        vocab_size: Number of ids in the tokenizer's vocabulary.

    Returns:
        np.dtype("<u2") (uint16) for vocab_size <= 65536, else np.dtype("<u4") (uint32).

    Raises:
        ValueError: vocab_size is not in 1 .. 2**32.
    """
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in 1 .. 2**32, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class ShardWriter:
    """Append token ids to a split's shards of `shard_tokens` tokens each.

    Each shard is written to a hidden temporary name in `dir`, fsynced and renamed to
    `{split}_{k:04d}.bin` only when full (or at `close`), so a crash never leaves a shard
    that looks complete. Documents run on across shard boundaries. Nothing touches the disk
    until the first `add`.

    Args:
        dir: Directory to write into; created on the first `add` if missing.
        split: Split name, the shard files' prefix ("train", "val", ...).
        dtype: Token dtype, usually `token_dtype(vocab_size)`; stored little-endian.
        shard_tokens: Tokens per shard (the last one may hold fewer). 2**24 tokens are 32 MiB
            of uint16: few files, and a checksum pass per shard that takes well under a second.
    """

    def __init__(self, dir: str | os.PathLike, split: str, dtype: np.dtype | str, shard_tokens: int = 2**24):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.dir, self.split, self.shard_tokens = Path(dir), split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.kind != "u":
            raise ValueError(f"token dtype must be unsigned, got {self.dtype}")
        self.tokens = 0  # written so far, over all shards
        self._records: list[dict] = []
        self._file = None  # the open temporary file of the shard being filled
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()
        self._in_shard = 0

    def add(self, ids) -> None:
        """Append a sequence of token ids.

        Args:
            ids: A list or 1-D array of ints in 0 .. dtype max.

        Raises:
            ValueError: An id is negative or does not fit the dtype (a vocabulary / dtype
                mismatch that would otherwise wrap around silently).
        """
        array = np.asarray(ids, dtype=np.int64).reshape(-1)
        if array.size == 0:
            return
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {low if low < 0 else high} does not fit the shard dtype {self.dtype.name}")
        array = array.astype(self.dtype)
        while array.size:
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._in_shard
            part, array = array[:room], array[room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._in_shard += part.size
            self.tokens += part.size
            if self._in_shard == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict]:
        """Finish the last shard and return one record per shard written.

        Returns:
            [{"file": "train_0000.bin", "tokens": n, "sha256": hex}, ...] in order; [] when
            nothing was added (no file is written then).
        """
        if self._file is not None:
            self._finish()
        return list(self._records)

    def abort(self) -> None:
        """Close and delete the shard being filled (finished shards stay: the caller owns the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{self.split}_{len(self._records):04d}.bin"
        self._tmp = self.dir / f".{name}.tmp"
        self._file = open(self._tmp, "wb")
        self._hash, self._in_shard = hashlib.sha256(), 0

    def _finish(self) -> None:
        name = f"{self.split}_{len(self._records):04d}.bin"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self.dir / name)
        fsync_dir(self.dir)
        self._records.append({"file": name, "tokens": self._in_shard, "sha256": self._hash.hexdigest()})


def prepared_dir(path: str | os.PathLike) -> Path:
    """The prepared data directory that `path` names: the directory itself, or its `manifest.json`."""
    path = Path(path)
    return path.parent if path.name == MANIFEST and not path.is_dir() else path


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether `path` is a prepared data directory (or its manifest), rather than records or text."""
    return (prepared_dir(path) / MANIFEST).is_file()


def read_manifest(dir: str | os.PathLike) -> dict:
    """Read and check the `manifest.json` of a prepared data directory.

    Args:
        dir: The directory `llmlab data prepare` wrote, or its manifest.json.

    Returns:
        The manifest as a dict (layout in `llmlab.data.prepare`).

    Raises:
        DataError: No manifest, invalid JSON, or a version this code does not know.
    """
    folder = prepared_dir(dir)
    if folder.is_file():
        raise DataError(f"{folder}: a file; expected the folder `llmlab data prepare` wrote (or its {MANIFEST})")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; prepare the data first with `llmlab data prepare`") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: manifest version {version!r}, expected {MANIFEST_VERSION}; "
                        f"prepare the data again with this llmlab")
    return manifest


class TokenShards:
    """One split of a prepared data directory as a single random-access token sequence.

    Opening reads `manifest.json` and memory-maps the split's shards, after checking that each
    file's size matches its token count in the manifest (a cheap check that catches truncated
    copies); `verify` reads them whole to recompute the checksums and check every id. Every read
    checks the ids it returns too, so ids beyond the vocabulary never reach a model even unverified.
    Pickling keeps only the directory and split, so DataLoader workers re-open the maps instead of
    copying the data.

    Args:
        dir: The prepared data directory, or its manifest.json.
        split: Which split to open ("train", "val", ...).

    Attributes:
        manifest: The whole manifest dict.
        documents: Documents in this split.
        bytes: UTF-8 bytes of this split's text (for bits per byte: bits = loss_nats *
            tokens / ln 2, divided by `bytes`).
        vocab_size, eos_id, bos_id: From the manifest.

    Raises:
        DataError: The manifest is missing or bad, the split is unknown, or a shard is missing
            or has the wrong size (the message names the file).
    """

    def __init__(self, dir: str | os.PathLike, split: str):
        self.dir, self.split = prepared_dir(dir), split
        self.manifest = read_manifest(self.dir)
        try:
            splits = self.manifest["splits"]
            if split not in splits:
                raise DataError(f"{self.dir}: no split {split!r}; the manifest has {', '.join(splits)}")
            info = splits[split]
            self.documents, self.bytes = info["documents"], info["bytes"]
            self.vocab_size, self.eos_id, self.bos_id = (int(self.manifest["vocab_size"]), self.manifest["eos_id"],
                                                         self.manifest["bos_id"])
            self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
            self._shards = [{"file": str(s["file"]), "tokens": int(s["tokens"]), "sha256": s["sha256"]}
                            for s in info["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.dir / MANIFEST}: not a valid manifest ({type(e).__name__}: {e}); prepare the "
                            "data again") from None
        self._arrays = []
        for shard in self._shards:
            if Path(shard["file"]).name != shard["file"] or shard["file"] in ("", ".", ".."):
                raise DataError(f"{self.dir / MANIFEST}: shard {shard['file']!r} must be a plain file name in "
                                "the manifest's folder")
            path = self.dir / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path}: shard listed in the manifest is missing") from None
            if size != expected:
                raise DataError(f"{path}: {size} bytes, but the manifest says {shard['tokens']} tokens "
                                f"({expected} bytes); the shard is truncated or corrupt, prepare the data again")
            self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))
        # starts[i] is the global index of shard i's first token; starts[-1] the total
        self._starts = np.cumsum([0] + [s["tokens"] for s in self._shards])

    def __len__(self) -> int:
        """Tokens in the split."""
        return int(self._starts[-1])

    def get(self, start: int, n: int) -> np.ndarray:
        """Tokens start .. start + n - 1 of the split, reading across shard boundaries.

        Args:
            start: Index of the first token, 0 <= start.
            n: How many tokens, with start + n <= len(self).

        Returns:
            A new int64 array of shape (n,) (int64 because torch wants LongTensor ids and has
            no uint16 indexing).

        Raises:
            IndexError: The range is not inside the split.
        """
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"tokens [{start}, {start + n}) out of range for {self.split} ({len(self)} tokens)")
        out = np.empty(n, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < n:
            offset = start + done - int(self._starts[shard])
            take = min(n - done, len(self._arrays[shard]) - offset)
            piece = self._arrays[shard][offset:offset + take]
            if take and piece.max() >= self.vocab_size:  # one pass over a few thousand ids: nothing next to a step
                self._bad_id(shard, offset, piece)
            out[done:done + take] = piece
            done += take
            shard += 1
        return out

    def verify(self) -> None:
        """Read every shard whole: recompute its sha256 and compare it with the manifest, and check
        that each id is below the manifest's vocab_size. Costs about 0.7 s per GB on a CPU with SHA
        instructions (a few times that without), plus the disk read.

        Raises:
            DataError: A checksum differs or an id is out of range (the message names the file).
        """
        for index, shard in enumerate(self._shards):
            path = self.dir / shard["file"]
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(_HASH_BLOCK):
                    digest.update(block)
            if digest.hexdigest() != shard["sha256"]:
                raise DataError(f"{path}: sha256 {digest.hexdigest()} does not match the manifest's "
                                f"{shard['sha256']}; the shard is corrupt, prepare the data again")
            array = self._arrays[index]
            if len(array) and array.max() >= self.vocab_size:
                self._bad_id(index, 0, array)

    def _bad_id(self, shard: int, offset: int, piece: np.ndarray):
        where = int(np.argmax(piece >= self.vocab_size))
        raise DataError(f"{self.dir / self._shards[shard]['file']}: token id {int(piece[where])} at position "
                        f"{offset + where} is not below the manifest's vocab_size {self.vocab_size}; the shard does "
                        "not belong to this manifest or is corrupt, prepare the data again")

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dir"], state["split"])
