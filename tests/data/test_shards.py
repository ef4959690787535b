"""Opening token shards: checksums find a flipped byte, ids beyond the vocabulary are named with their
shard file instead of failing inside a model, and a path to the manifest itself opens its folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmlab.data import DataError
from llmlab.data.shards import MANIFEST_VERSION, ShardWriter, TokenShards, is_prepared, read_manifest


def _prepared(root, ids, vocab_size=100, shard_tokens=64):
    """A prepared folder of one train split holding `ids`, its manifest written as `data prepare` does."""
    writer = ShardWriter(root, "train", "<u2", shard_tokens=shard_tokens)
    writer.add(ids)
    manifest = {"version": MANIFEST_VERSION, "vocab_size": vocab_size, "dtype": "uint16", "eos_id": 0, "bos_id": None,
                "splits": {"train": {"documents": 1, "bytes": len(ids), "tokens": len(ids),
                                     "shards": writer.close()}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_a_flipped_byte_is_found_by_verify(tmp_path):
    root = _prepared(tmp_path, np.arange(200) % 50)
    TokenShards(root, "train").verify()
    data = bytearray((root / "train_0001.bin").read_bytes())
    data[10] ^= 0x01  # the id stays in range: only the checksum can tell
    (root / "train_0001.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_0001\.bin: sha256 .* does not match the manifest's"):
        TokenShards(root, "train").verify()


def test_ids_beyond_the_vocabulary_are_named_when_read_and_when_verified(tmp_path):
    ids = np.arange(200) % 50
    ids[130] = 100  # the vocabulary has ids 0..99
    shards = TokenShards(_prepared(tmp_path, ids), "train")
    with pytest.raises(DataError, match=r"train_0002\.bin: token id 100 at position 2 is not below the manifest's "
                                        r"vocab_size 100"):
        shards.verify()
    with pytest.raises(DataError, match=r"train_0002\.bin: token id 100 at position 2"):
        shards.get(120, 20)
    assert shards.get(0, 128).max() < 100  # the other shards read as before


def test_a_path_to_the_manifest_opens_its_folder(tmp_path):
    root = _prepared(tmp_path / "data", np.arange(100) % 50)
    for path in (root, root / "manifest.json", str(root / "manifest.json")):
        assert is_prepared(path) and read_manifest(path)["vocab_size"] == 100
        assert len(TokenShards(path, "train")) == 100
    assert not is_prepared(tmp_path / "records.jsonl")
    with pytest.raises(DataError) as info:
        read_manifest(tmp_path / "nowhere" / "manifest.json")
    assert "manifest.json/manifest.json" not in str(info.value)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("dtype"), r"not a valid manifest \(KeyError: 'dtype'\)"),
    (lambda m: m["splits"]["train"]["shards"][0].update(tokens="many"), "not a valid manifest"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../train_0000.bin"), "must be a plain file name"),
])
def test_a_damaged_manifest_is_named(tmp_path, edit, message):
    root = _prepared(tmp_path, np.arange(100) % 50)
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        TokenShards(root, "train")
