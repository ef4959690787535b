"""Stream raw text documents from files, directories and the embedded default corpus.

Inputs are `.txt`, `.md` and `.jsonl` files, or directories of them (DESIGN.md, "Data
formats"). Everything is a generator that holds at most one document (about 1 MiB for big
text files) and one read block in memory, so a corpus far larger than memory streams through.

What is skipped instead of read is counted in a `collections.Counter` the caller may pass in
(`stats`), one count per file:

- "other_suffix": a file in a directory whose suffix is not .txt, .md or .jsonl;
- "hidden": a file or directory whose name starts with "." (e.g. .git), not descended into;
- "binary": a NUL byte in the first 8 KiB (also catches UTF-16 text, which UTF-8 tools misread);
- "invalid_utf8": with `encoding_errors="skip"`, a file that is not valid UTF-8.

`stats["files"]` counts the files actually read. A file that cannot be read at all is an error
naming it, never a skip: a missing path, a broken symbolic link or a loop of them, a FIFO, socket
or device file (which would block or never end), a file without read permission.

With no data of its own llmlab uses `default_corpus()`, the CPython language documentation
in `pydoc_data.topics`, and `python_sources()`, the standard library's own `.py` files, for
code models (DESIGN.md, "The embedded default"): no download is ever needed.
"""

from __future__ import annotations

import codecs
import errno
import itertools
import json
import os
import re
import stat
import sysconfig
import tokenize
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmlab.data import DataError

SUFFIXES = (".txt", ".md", ".jsonl")
SPLIT_ABOVE_BYTES = 4 * 2**20  # text files larger than this become several documents
CHUNK_CHARS = 2**20  # a split document ends at the first blank line after this many characters
HARD_CHUNK_CHARS = 4 * CHUNK_CHARS  # with no blank line by here, cut at a line break anyway
PROBE_BYTES = 8192  # a NUL byte this early marks a binary file (the heuristic git and grep use)
READ_BLOCK = 2**18
MAX_LINE_BYTES = 2**26  # a JSONL line longer than this (64 MiB) is refused rather than read whole into memory

EncodingErrors = Literal["error", "skip", "replace"]
_ENCODING_ERRORS = ("error", "skip", "replace")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
# the directories of the standard library that hold its tests or third-party packages
_NOT_STDLIB_SOURCE = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True, slots=True)
class Document:
    """One unit of text and where it came from.

    Attributes:
        text: The raw text, as read (cleaning happens later, in `llmlab.data.clean`).
        source: "path" for a whole file, "path:line" for a JSONL line or for the part of a large
            text file that starts at that line, "pydoc_data.topics:name#k" for section k of a
            topic of the default corpus.
    """

    text: str
    source: str


def iter_documents(paths: str | os.PathLike | Iterable[str | os.PathLike], *, text_field: str = "text",
                   encoding_errors: EncodingErrors = "error", stats: Counter | None = None) -> Iterator[Document]:
    """Stream the documents in files and directories, in a deterministic order.

    Paths are read in the order given; a directory is walked recursively with the entries of
    each directory sorted by name, reading only .txt, .md and .jsonl files (other files are
    counted in `stats` and skipped). A .txt or .md file is one document, except that a file
    larger than 4 MiB is streamed and cut at blank lines into documents of about 1 Mi
    characters, so no whole large file is ever held in memory. A .jsonl file gives one document
    per non-blank line: the string in its `text_field`. A leading UTF-8 byte-order mark is
    dropped.

    Args:
        paths: A file or directory, or several. Every one must exist. A file named directly
            must have a supported suffix; inside directories, others are skipped.
        text_field: The JSONL field that holds the text.
        encoding_errors: What to do with bytes that are not UTF-8: "error" raises, "skip"
            skips the whole file (each file is checked in a first streaming pass, so no
            document of a skipped file is ever yielded), "replace" substitutes U+FFFD.
        stats: A Counter that receives the per-file counts listed in the module docstring.

    Yields:
        `Document`s, lazily.

    Raises:
        DataError: A path is missing, cannot be read, is not a regular file or folder (see
            `check_input`) or is a file of an unsupported type; a JSONL line is longer than
            MAX_LINE_BYTES, is not valid JSON (or nested too deeply), not an object, or lacks a
            string `text_field` (the message names "file:line" and what was wrong); invalid UTF-8
            with encoding_errors="error" (the message names the file and the byte offset).
        ValueError: `encoding_errors` is not one of "error", "skip", "replace".
    """
    if encoding_errors not in _ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {_ENCODING_ERRORS}, got {encoding_errors!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # iterating a str would give its characters
    paths = [Path(p) for p in paths]
    stats = Counter() if stats is None else stats
    # check every path before the first document, so a typo fails at once, not hours in
    for path in paths:
        if not stat.S_ISDIR(check_input(path, folders=True).st_mode) and path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
                            f"expected one of {', '.join(SUFFIXES)} or a directory")
    for path in paths:
        files = _walk(path, stats) if path.is_dir() else [path]
        for file in files:
            yield from _read_file(file, text_field, encoding_errors, stats)


def check_input(path: Path, *, folders: bool = False) -> os.stat_result:
    """stat() of an input that llmlab will read: a regular file (or, with `folders`, a directory).

    Raises:
        DataError: naming `path` and what it is instead: missing, a broken symbolic link, a loop of
            symbolic links, a FIFO, socket or device file (reading one blocks or never ends), or
            unreadable.
    """
    try:
        info = path.stat()
    except OSError as e:
        raise input_error(path, e) from None
    if stat.S_ISREG(info.st_mode) or (folders and stat.S_ISDIR(info.st_mode)):
        return info
    kind = ("a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode)
            else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device file")
    raise DataError(f"{path}: is {kind}, not a regular file; llmlab reads only files"
                    + (" and folders" if folders else ""))


def input_error(path: Path, e: OSError) -> DataError:
    """An OSError met opening or reading input `path`, as one line that says what is wrong with it."""
    if e.errno == errno.ELOOP:
        return DataError(f"{path}: a loop of symbolic links (a link that leads back to itself); fix or remove it")
    if e.errno == errno.ENOENT and path.is_symlink():
        return DataError(f"{path}: a broken symbolic link (to {os.readlink(path)}, which does not exist)")
    if e.errno == errno.ENOENT:
        return DataError(f"{path}: no such file or directory")
    return DataError(f"{path}: cannot be read ({e.strerror or e})")


def parse_json(text: str, where: str, *, lines: bool = False) -> object:
    """`json.loads(text)`, with its errors as one DataError naming `where` and the column: `where` is
    "file:line" for one line of a JSONL file, or the file of a whole document when `lines` (the
    message then adds the line inside it).

    Raises:
        DataError: invalid JSON, or JSON nested deeper than Python's recursion limit (1,000 levels).
    """
    if not lines:
        text = text.rstrip("\r\n")  # else an error at the line's end is placed at column 1 of the next
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # json's messages name a position after some of them: "Unterminated string starting at"
        at = f"{where}:{e.lineno}" if lines else where
        raise DataError(f"{at}: invalid JSON: {e.msg.removesuffix(' at')} at column {e.colno}") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise DataError(f"{where}: invalid JSON: {e}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read (more than about 1,000 levels of arrays or "
                        "objects)") from None


def jsonl_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line) of a JSONL file, streamed; lines end at b"\\n" only, so
    U+2028 inside a JSON string never splits a record.

    Raises:
        DataError: a line longer than MAX_LINE_BYTES, which is refused rather than read whole.
    """
    offset = 0
    with open(path, "rb") as f:
        for lineno in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES / 2**20:g} MiB; a JSONL "
                                "record must fit on one line of at most that (split long texts into several records)")
            yield lineno, offset, raw
            offset += len(raw)


def _walk(root: Path, stats: Counter) -> Iterator[Path]:
    """The supported files under `root`, sorted within each directory; symlinked dirs are not followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        hidden = sum(d.startswith(".") for d in dirnames)
        if hidden:
            stats["hidden"] += hidden
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # os.walk descends in this order
        for name in sorted(filenames):
            if name.startswith("."):
                stats["hidden"] += 1
            elif Path(name).suffix.lower() not in SUFFIXES:
                stats["other_suffix"] += 1
            else:
                yield Path(dirpath, name)


def _read_file(path: Path, text_field: str, encoding_errors: EncodingErrors, stats: Counter) -> Iterator[Document]:
    check_input(path)
    try:
        yield from _read_checked_file(path, text_field, encoding_errors, stats)
    except OSError as e:
        raise input_error(path, e) from None


def _read_checked_file(path: Path, text_field: str, encoding_errors: EncodingErrors,
                       stats: Counter) -> Iterator[Document]:
    with open(path, "rb") as f:
        if b"\0" in f.read(PROBE_BYTES):
            stats["binary"] += 1
            return
    if encoding_errors == "skip":
        if _first_invalid_utf8(path) is not None:
            stats["invalid_utf8"] += 1
            return
        encoding_errors = "error"  # checked valid: decode strictly from here on
    stats["files"] += 1
    if path.suffix.lower() == ".jsonl":
        yield from _read_jsonl(path, text_field, encoding_errors)
    elif path.stat().st_size > SPLIT_ABOVE_BYTES:
        yield from _read_large_text(path, encoding_errors)
    else:
        text = _decode(path.read_bytes(), str(path), encoding_errors)
        yield Document(text.removeprefix("\ufeff"), str(path))


def _decode(data: bytes, where: str, encoding_errors: EncodingErrors, offset: int = 0) -> str:
    """UTF-8 decode `data`, which starts `offset` bytes into the file that `where` names."""
    try:
        return data.decode("utf-8", "replace" if encoding_errors == "replace" else "strict")
    except UnicodeDecodeError as e:
        raise _utf8_error(where, offset + e.start, e.reason) from None


def _utf8_error(where: str, offset: int, reason: str) -> DataError:
    return DataError(f"{where}: invalid UTF-8 at byte {offset} ({reason}); set encoding_errors=skip to skip "
                     f"such files or encoding_errors=replace to substitute U+FFFD")


def _first_invalid_utf8(path: Path) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in the file, or None if it is all valid."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    fed = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK)
            held = len(decoder.getstate()[0])  # bytes of a sequence split across blocks
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return fed - held + e.start
            if not block:
                return None
            fed += len(block)


def _read_jsonl(path: Path, text_field: str, encoding_errors: EncodingErrors) -> Iterator[Document]:
    for lineno, offset, raw in jsonl_lines(path):
        where = f"{path}:{lineno}"
        line = _decode(raw, where, encoding_errors, offset)
        if lineno == 1:
            line = line.removeprefix("\ufeff")  # json.loads rejects a byte-order mark
        if not line.strip():
            continue
        record = parse_json(line, where)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {json_type(record)}")
        if text_field not in record:
            keys = ", ".join(map(repr, list(record)[:10])) or "none"
            raise DataError(f"{where}: no {text_field!r} field (keys: {keys}); "
                            f"set text_field to the field that holds the text")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} is {json_type(text)}, expected a string")
        yield Document(text, where)


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages about JSONL lines."""
    for types, name in ((dict, "an object"), (list, "an array"), (str, "a string"), (bool, "a boolean"),
                        ((int, float), "a number")):
        if isinstance(value, types):
            return name
    return "null"


def _read_large_text(path: Path, encoding_errors: EncodingErrors) -> Iterator[Document]:
    """Stream a big text file as documents of about CHUNK_CHARS characters cut at blank lines.

    A cut drops the blank line itself; each document's source is "path:line" with the line it
    starts on. A stretch of HARD_CHUNK_CHARS characters without a blank line is cut at its last
    line break (or, for one gigantic line, anywhere) so memory stays bounded.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace" if encoding_errors == "replace" else "strict")
    buffer, scan_from, line, fed = "", CHUNK_CHARS, 1, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK)
            held = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise _utf8_error(str(path), fed - held + e.start, e.reason) from None
            buffer += text.removeprefix("\ufeff") if fed == 0 else text
            fed += len(block)
            while len(buffer) >= CHUNK_CHARS:
                match = _BLANK_LINE.search(buffer, scan_from)
                if match:
                    start, end = match.span()
                elif len(buffer) >= HARD_CHUNK_CHARS:
                    newline = buffer.rfind("\n", CHUNK_CHARS, HARD_CHUNK_CHARS)
                    start = end = newline + 1 if newline >= 0 else HARD_CHUNK_CHARS
                else:
                    # a blank line may still complete after the last newline seen: rescan from there
                    scan_from = max(CHUNK_CHARS, buffer.rfind("\n"))
                    break
                yield Document(buffer[:start], f"{path}:{line}")
                line += buffer.count("\n", 0, end)
                buffer, scan_from = buffer[end:], CHUNK_CHARS
            if not block:
                break
    if buffer.strip():
        yield Document(buffer, f"{path}:{line}")


def default_corpus(section_chars: int = 2000) -> Iterator[Document]:
    """The embedded default: CPython's language documentation, cut into sections.

    `pydoc_data.topics.topics` maps a topic name ("assert", "for", "string-methods", ...) to
    its plain-text page (about 80 topics and 0.46 MB of English with code samples in
    CPython 3.11). It is what `help("for")` prints, so every install carries it. Pages run up to
    40 KB, so each is cut at paragraph breaks into sections of at least `section_chars`
    characters: some 250 documents, enough for a validation split of more than a few pages.

    Yields:
        Sections in topic-name order, with source "pydoc_data.topics:<name>#<k>".

    Raises:
        DataError: This Python was built without `pydoc_data` (some minimal distro packages).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("the embedded default corpus needs the standard library's pydoc_data package, which this "
                        "Python lacks; name some input files instead") from None
    for name in sorted(topics):
        for k, section in enumerate(_sections(topics[name], section_chars)):
            yield Document(section, f"pydoc_data.topics:{name}#{k}")


def _sections(text: str, min_chars: int) -> list[str]:
    """`text` cut at blank lines into pieces of at least `min_chars` (a short tail joins the last one)."""
    sections, current, chars = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        chars += len(paragraph)
        if chars >= min_chars:
            sections.append("\n\n".join(current))
            current, chars = [], 0
    if current and sections and chars < min_chars // 2:
        sections[-1] += "\n\n" + "\n\n".join(current)
    elif current:
        sections.append("\n\n".join(current))
    return sections


def python_sources(limit_bytes: int | None = None, stats: Counter | None = None) -> Iterator[Document]:
    """The standard library's `.py` files, the embedded default for code models (~30 MB).

    Walks `sysconfig.get_paths()["stdlib"]` sorted, leaving out test directories (test, tests,
    idle_test), site-packages and hidden directories. Files are decoded as Python does, honouring
    a `# -*- coding: ... -*-` line.

    Args:
        limit_bytes: Stop before the file that would take the total past this many bytes of
            source; None reads everything.
        stats: A Counter that receives "files" and "unreadable" (files that fail to decode).

    Yields:
        One `Document` per file, with the file's path as source.
    """
    stats = Counter() if stats is None else stats
    root, total = sysconfig.get_paths()["stdlib"], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_STDLIB_SOURCE and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with tokenize.open(path) as f:
                    text = f.read()
            except (OSError, SyntaxError, UnicodeDecodeError):  # tokenize.open raises SyntaxError on a bad cookie
                stats["unreadable"] += 1
                continue
            size = len(text.encode("utf-8"))
            if limit_bytes is not None and total + size > limit_bytes:
                return
            total += size
            stats["files"] += 1
            yield Document(text, path)
