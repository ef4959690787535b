"""`llmlab data prepare` and `llmlab tokenizer train`: raw text in, token shards or a tokenizer out.

`run(cfg)` is one streaming pass, read top to bottom:

    ingest -> normalize -> quality rules -> dedup -> split -> tokenize (batches) -> shards

Only the current batch of documents per split (at most 256 documents or 8 Mi characters) and
the dedup index (O(kept documents), see `llmlab.data.dedup`) are in memory, never the corpus.

The split of a document is a pure function of its normalized text and the seed:
u = int(sha256(f"{seed}:{sha256(text)}")) / 2**256 goes to test if u < test_frac, to val if
u < test_frac + val_frac, else to train. So the same text lands in the same split whatever the
input order or the other documents, re-running with more data never moves an old document
across splits, and exact duplicates can never straddle train and val.

The output directory (written elsewhere, then renamed into place, so it is complete or absent):

    out_dir/
      manifest.json     what is below, plus provenance (layout next)
      config.yaml       the resolved PrepareConfig
      train_0000.bin    uint16 (vocab <= 65536) or uint32 little-endian token ids, no header
      val_0000.bin ...

manifest.json:

    {"version": 1, "tokenizer_sha256": hex, "tokenizer_path": absolute path or "",
     "vocab_size": int, "dtype": "uint16" | "uint32", "eos_id": int | null, "bos_id": int | null,
     "fim_ids": [prefix, middle, suffix] | null,
     "config": PrepareConfig as a dict,
     "files": {"read": n, "skipped": {"binary": n, ...}},
     "documents": {"in": n, "kept": n, "removed": {"too_short": n, "near_duplicate": n, ...}},
     "splits": {"train": {"documents": n, "tokens": n, "bytes": n (UTF-8 bytes of the kept
                text, for bits per byte), "shards": [{"file", "tokens", "sha256"}, ...]}, ...}}

An existing, non-empty out_dir is refused unless `--overwrite` is given: prepared data is often
hours of work and other runs' manifests point at it. Even then llmlab replaces only the files it
writes and deletes nothing else.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmlab.common import atomic_dir, atomic_write_text, check_output, style
from llmlab.config import save_config, to_dict
from llmlab.data import DataError
from llmlab.data.clean import CleanConfig, normalize, quality_problem
from llmlab.data.dedup import Deduplicator
from llmlab.data.ingest import Document, default_corpus, iter_documents, python_sources
from llmlab.data.shards import MANIFEST, MANIFEST_VERSION, ShardWriter, token_dtype
from llmlab.tokenizer import (check_min_frequency, check_unigram_vocab_size, check_vocab_size,
                              check_wordpiece_vocab_size, load_tokenizer, train_bpe, train_unigram, train_wordpiece)

SPLITS = ("train", "val", "test")
BATCH_DOCS = 256  # documents per encode_batch call: enough to keep the Rust threads busy
BATCH_CHARS = 2**23  # ... or fewer, when they are big: token lists cost ~40 bytes an id in Python
SAMPLE_CHARS = 2**20  # text kept aside to report the trained tokenizer's bytes per token


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)  # .txt/.md/.jsonl files or directories; empty: the embedded default
    # with no inputs: the CPython docs, the stdlib's .py files (code), or the docs followed by the .py files
    default: Literal["docs", "python", "docs+python"] = "docs"
    default_bytes: int = 0  # read at most this much of the .py corpus (0: all of its ~30 MB)
    out_dir: str = "runs/data"  # output directory; must not exist yet (or be empty)
    tokenizer: str = ""  # tokenizer.json or its folder (required; make one with `llmlab tokenizer train`)
    text_field: str = "text"  # JSONL field that holds the text
    encoding_errors: Literal["error", "skip", "replace"] = "error"  # invalid UTF-8: stop, skip the file, or U+FFFD
    clean: CleanConfig = field(default_factory=CleanConfig)  # quality-rule thresholds
    dedup: Literal["none", "exact", "near"] = "near"  # drop nothing, identical texts, or also MinHash near-copies
    near_threshold: float = 0.8  # word 5-gram Jaccard similarity from which a document is a near duplicate
    val_frac: float = 0.05  # expected fraction of kept documents in the val split
    test_frac: float = 0.0  # expected fraction in the test split (0: no test split)
    seed: int = 0  # seed of the split hash: another seed draws another split
    shard_tokens: int = 2**24  # tokens per shard file (32 MiB of uint16)
    bos: bool = False  # put BOS before every document
    eos: bool = True  # put EOS ([SEP] for WordPiece) after every document: the model learns where documents end

    def __post_init__(self):
        _check_inputs(self.inputs, self.text_field, self.default)
        if self.default_bytes < 0:
            raise ValueError(f"default_bytes must be >= 0, got {self.default_bytes}")
        for name in ("val_frac", "test_frac"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.val_frac + self.test_frac >= 1.0:
            raise ValueError(f"val_frac + test_frac must be < 1 to leave a train split, got "
                             f"{self.val_frac} + {self.test_frac}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise ValueError(f"near_threshold must be in (0, 1], got {self.near_threshold}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {self.shard_tokens}")


@dataclass
class TokenizerTrainConfig:
    inputs: list[str] = field(default_factory=list)  # .txt/.md/.jsonl files or directories; empty: the embedded default
    # with no inputs: the CPython docs, the stdlib's .py files (code), or the docs followed by the .py files
    default: Literal["docs", "python", "docs+python"] = "docs"
    default_bytes: int = 0  # read at most this much of the .py corpus (0: all of its ~30 MB)
    out_dir: str = "runs/tokenizer"  # output folder; must not exist yet (or be empty)
    kind: Literal["bpe", "wordpiece", "unigram"] = "bpe"  # byte-level BPE (GPT-2), WordPiece (BERT), Unigram (T5)
    vocab_size: int = 4096  # ids, special tokens (and unigram's sentinels) included
    min_frequency: int = 2  # bpe and wordpiece: a pair seen fewer times than this is never merged
    lowercase: bool = True  # wordpiece only: lowercase and strip accents (bert-base-uncased); false: cased
    sentinels: int = 100  # unigram only: <extra_id_0>... span-corruption tokens, the last ids (T5 has 100)
    text_field: str = "text"  # JSONL field that holds the text
    encoding_errors: Literal["error", "skip", "replace"] = "error"  # invalid UTF-8: stop, skip the file, or U+FFFD
    max_docs: int | None = None  # train on the first max_docs non-empty documents only (None: all)

    def __post_init__(self):
        _check_inputs(self.inputs, self.text_field, self.default)
        # a setting another kind reads is an error, not silently ignored (compared with its default)
        for name, kinds in (("min_frequency", ("bpe", "wordpiece")), ("lowercase", ("wordpiece",)),
                            ("sentinels", ("unigram",))):
            if self.kind not in kinds and getattr(self, name) != getattr(TokenizerTrainConfig, name):
                raise ValueError(f"{name} applies to kind={' or kind='.join(kinds)} only, not kind={self.kind}; "
                                 f"drop {name}")
        if self.kind == "wordpiece":
            check_wordpiece_vocab_size(self.vocab_size)
        elif self.kind == "unigram":
            check_unigram_vocab_size(self.vocab_size, self.sentinels)
        else:
            check_vocab_size(self.vocab_size)
        check_min_frequency(self.min_frequency)
        if self.default_bytes < 0:
            raise ValueError(f"default_bytes must be >= 0, got {self.default_bytes}")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"max_docs must be >= 1 or null, got {self.max_docs}")


def _check_inputs(inputs: list[str], text_field: str, default: str) -> None:
    if inputs and default != "docs":
        raise ValueError(f"default={default} picks the corpus read when inputs is empty, but inputs names "
                         f"{len(inputs)} path(s); drop one of the two")
    # an empty path would be read as the current folder
    empty = [i for i, path in enumerate(inputs) if not path.strip()]
    if empty:
        raise ValueError(f"inputs[{empty[0]}] is an empty path; name a file or folder, or leave inputs empty for "
                         "the embedded default")
    if not text_field:
        raise ValueError("text_field must name the JSONL field that holds the text, got ''")


def assign_split(text: str, seed: int, val_frac: float, test_frac: float = 0.0) -> str:
    """The split of a document: a pure function of its text and the seed (module docstring).

    Args:
        text: The normalized text.
        seed: Split seed.
        val_frac: Probability of "val".
        test_frac: Probability of "test".

    Returns:
        "train", "val" or "test".
    """
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    u = int(hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest(), 16) / 2**256
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def run(cfg: PrepareConfig, *, tokenizer: Any = None, overwrite: bool = False) -> dict:
    """Prepare token shards from raw text (the `llmlab data prepare` verb); prints a report.

    Args:
        cfg: The configuration.
        tokenizer: An already loaded tokenizer to use instead of loading `cfg.tokenizer` (for
            notebooks and tests): anything with `encode_batch(texts, bos=, eos=)`, `vocab_size`,
            `bos_id`, `eos_id` and `sha256()` (and `fim_ids` if it has them), like
            `llmlab.tokenizer.Tokenizer`.
        overwrite: write into an existing non-empty out_dir, replacing the files of the same names.

    Returns:
        The manifest written to `out_dir/manifest.json`.

    Raises:
        DataError: No tokenizer given; the inputs are bad (see `iter_documents`); or "empty corpus":
            no documents at all, none kept, or none in the train split. Nothing is written then.
        OutputError: out_dir exists and is not empty (without `overwrite`), is or holds an input, or
            cannot be written.
        LlmlabError: The tokenizer cannot be loaded.
    """
    out = check_output(cfg.out_dir, label="out_dir", inputs=[*cfg.inputs, cfg.tokenizer], overwrite=overwrite)
    if tokenizer is None:
        if not cfg.tokenizer:
            raise DataError("no tokenizer: set tokenizer=PATH to a tokenizer.json or its folder "
                            "(train one with `llmlab tokenizer train`)")
        tokenizer = load_tokenizer(cfg.tokenizer)
    for flag, token_id in (("bos", tokenizer.bos_id), ("eos", getattr(tokenizer, "document_end_id", tokenizer.eos_id))):
        if getattr(cfg, flag) and token_id is None:
            raise DataError(f"{flag}=true but the tokenizer has no {flag.upper()} token; set {flag}=false")
    dtype = token_dtype(tokenizer.vocab_size)
    splits = [s for s, frac in zip(SPLITS, (1.0, cfg.val_frac, cfg.test_frac)) if frac > 0]

    file_stats: Counter = Counter()
    docs = _documents(cfg, file_stats)
    dedup = None if cfg.dedup == "none" else Deduplicator(near=cfg.dedup == "near", threshold=cfg.near_threshold)

    with atomic_dir(out, merge=overwrite) as tmp:
        writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in splits}
        kept = {s: Counter() for s in splits}  # documents and UTF-8 bytes per split
        batches: dict[str, list[str]] = {s: [] for s in splits}
        batch_chars = Counter()
        removed: Counter = Counter()
        n_in = 0

        def flush(split: str) -> None:
            for ids in tokenizer.encode_batch(batches[split], bos=cfg.bos, eos=cfg.eos):
                writers[split].add(ids)
            batches[split].clear()
            batch_chars[split] = 0

        try:
            for doc in docs:
                n_in += 1
                text = normalize(doc.text)
                reason = quality_problem(text, cfg.clean) or (dedup.check(text) if dedup is not None else None)
                if reason:
                    removed[reason] += 1
                    continue
                split = assign_split(text, cfg.seed, cfg.val_frac, cfg.test_frac)
                kept[split]["documents"] += 1
                kept[split]["bytes"] += len(text.encode("utf-8"))
                batches[split].append(text)
                batch_chars[split] += len(text)
                if len(batches[split]) >= BATCH_DOCS or batch_chars[split] >= BATCH_CHARS:
                    flush(split)
            for split in splits:
                flush(split)
        except BaseException:
            for writer in writers.values():
                writer.abort()  # close the open shard file; atomic_dir deletes the rest
            raise

        n_kept = sum(kept[s]["documents"] for s in splits)
        if n_in == 0:
            raise DataError(f"empty corpus: no documents in {', '.join(cfg.inputs)}{_skipped_note(file_stats)}")
        if n_kept == 0:
            raise DataError(f"empty corpus: all {n_in} documents of {', '.join(cfg.inputs)} were removed "
                            f"({_counts(removed)}); check the inputs or loosen the clean.* thresholds")
        if kept["train"]["documents"] == 0:
            raise DataError(f"empty corpus: none of the {n_kept} kept documents landed in the train split "
                            f"(val_frac={cfg.val_frac}, test_frac={cfg.test_frac}); add data or lower the fractions")

        manifest = {
            "version": MANIFEST_VERSION,
            "tokenizer_sha256": tokenizer.sha256(),
            "tokenizer_path": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else "",
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "eos_id": getattr(tokenizer, "document_end_id", tokenizer.eos_id),  # what ends each document
            "bos_id": tokenizer.bos_id,
            "fim_ids": list(tokenizer.fim_ids) if getattr(tokenizer, "fim_ids", None) else None,
            "config": to_dict(cfg),
            "files": {"read": file_stats["files"],
                      "skipped": {k: v for k, v in file_stats.items() if k != "files" and v}},
            "documents": {"in": n_in, "kept": n_kept, "removed": dict(removed)},
            "splits": {s: {"documents": kept[s]["documents"], "tokens": writers[s].tokens, "bytes": kept[s]["bytes"],
                           "shards": writers[s].close()} for s in splits},
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        save_config(cfg, tmp / "config.yaml")
    _report(manifest, out)
    return manifest


def train_tokenizer(cfg: TokenizerTrainConfig, *, overwrite: bool = False) -> Path:
    """Train a tokenizer of `cfg.kind` on normalized documents (the `llmlab tokenizer train` verb).

    Documents stream into `llmlab.tokenizer.train_bpe` (or `train_wordpiece`, `train_unigram`) one
    at a time. Prints the vocabulary size and the bytes per token on the first 1 MiB of the
    training text.

    Args:
        cfg: The configuration.

    Returns:
        The path of the saved `tokenizer.json` inside `cfg.out_dir` (which also receives
        tokenizer_config.json, for HF AutoTokenizer, and the resolved config.yaml).

    Raises:
        DataError: the inputs are bad; no non-empty document ("empty corpus"); the corpus has more
            distinct characters than a WordPiece or Unigram `vocab_size` holds. Nothing is written then.
        OutputError: out_dir exists and is not empty (without `overwrite`), is or holds an input, or
            cannot be written.
    """
    out = check_output(cfg.out_dir, label="out_dir", inputs=cfg.inputs, overwrite=overwrite)
    file_stats: Counter = Counter()
    docs = _documents(cfg, file_stats)
    counts: Counter = Counter()
    sample: list[str] = []

    def texts() -> Iterator[str]:
        for doc in docs:
            if cfg.max_docs is not None and counts["documents"] >= cfg.max_docs:
                return
            text = normalize(doc.text)
            if not text:
                continue
            counts["documents"] += 1
            counts["bytes"] += len(text.encode("utf-8"))
            if counts["sample_chars"] < SAMPLE_CHARS:
                sample.append(text[:SAMPLE_CHARS - counts["sample_chars"]])
                counts["sample_chars"] += len(sample[-1])
            yield text

    stream = texts()
    first = next(stream, None)  # read before training, so an empty corpus fails with a clear message
    if first is None:
        where = ", ".join(cfg.inputs) or "the embedded default"
        raise DataError(f"empty corpus: no non-empty documents in {where}{_skipped_note(file_stats)}")
    corpus = itertools.chain([first], stream)
    with atomic_dir(out, merge=overwrite) as tmp:
        try:
            if cfg.kind == "wordpiece":
                tokenizer = train_wordpiece(corpus, cfg.vocab_size, lowercase=cfg.lowercase,
                                            min_frequency=cfg.min_frequency)
            elif cfg.kind == "unigram":
                tokenizer = train_unigram(corpus, cfg.vocab_size, sentinels=cfg.sentinels)
            else:
                tokenizer = train_bpe(corpus, cfg.vocab_size, min_frequency=cfg.min_frequency)
        except ValueError as e:  # the settings were checked: the corpus's alphabet outgrew vocab_size
            raise DataError(str(e)) from None
        saved = tokenizer.save(tmp)
        save_config(cfg, tmp / "config.yaml")
    path = out / saved.relative_to(tmp)
    sample_tokens = sum(map(len, tokenizer.encode_batch(sample)))
    sample_bytes = sum(len(t.encode("utf-8")) for t in sample)
    print(style(f"tokenizer -> {path}", "1"))
    print(f"  trained on   {counts['documents']:,} documents, {_human_bytes(counts['bytes'])}"
          f"{_skipped_note(file_stats)}")
    print(f"  vocab size   {tokenizer.vocab_size:,} (asked for {cfg.vocab_size:,})")
    print(f"  compression  {sample_bytes / max(sample_tokens, 1):.2f} bytes per token "
          f"(on the first {_human_bytes(sample_bytes)} of training text)")
    return path


# --------------------------------------------------------------------------- helpers


def _documents(cfg: PrepareConfig | TokenizerTrainConfig, stats: Counter) -> Iterator[Document]:
    """The documents of `cfg.inputs`, or the embedded default corpus `cfg.default` when there are none."""
    if not cfg.inputs:
        if cfg.default == "python":
            return python_sources(cfg.default_bytes or None, stats)
        if cfg.default == "docs+python":
            return itertools.chain(default_corpus(), python_sources(cfg.default_bytes or None, stats))
        return default_corpus()
    return iter_documents(cfg.inputs, text_field=cfg.text_field, encoding_errors=cfg.encoding_errors, stats=stats)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counter.most_common()) or "none"


def _skipped_note(file_stats: Counter) -> str:
    skipped = Counter({k: v for k, v in file_stats.items() if k != "files" and v})
    return f" (skipped files: {_counts(skipped)})" if skipped else ""


def _human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _report(manifest: dict, out: Path) -> None:
    docs, files = manifest["documents"], manifest["files"]
    removed = docs["in"] - docs["kept"]
    print(style(f"data -> {out}", "1"))
    source = (f"{files['read']:,} files" if manifest["config"]["inputs"] else "the embedded default")
    print(f"  documents in  {docs['in']:>10,}   from {source}{_skipped_note(Counter(files['skipped']))}")
    print(f"  removed       {removed:>10,}" + (f"   {_counts(Counter(docs['removed']))}" if removed else ""))
    print(f"  kept          {docs['kept']:>10,}")
    print(f"  {'split':8s} {'documents':>10s} {'tokens':>12s} {'bytes':>12s} {'bytes/token':>11s} {'shards':>6s}")
    for name, split in manifest["splits"].items():
        per_token = f"{split['bytes'] / split['tokens']:.2f}" if split["tokens"] else "-"
        print(f"  {name:8s} {split['documents']:>10,} {split['tokens']:>12,} {split['bytes']:>12,} "
              f"{per_token:>11s} {len(split['shards']):>6}")
    for name, split in manifest["splits"].items():
        if split["documents"] == 0:
            print(f"  note: the {name} split is empty; the corpus is small for "
                  f"{name}_frac={manifest['config'][name + '_frac']}")
    print(f"  vocab {manifest['vocab_size']:,}, {manifest['dtype']} shards, tokenizer sha256 "
          f"{manifest['tokenizer_sha256'][:12]}")
