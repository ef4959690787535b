"""Data preparation: raw text in, checked token shards out.

The stages, one file each and usable on their own:

- `ingest`: stream `Document`s from .txt/.md/.jsonl files and directories, or the embedded
  default (the CPython documentation that every install carries);
- `clean`: Unicode/whitespace normalization and language-agnostic quality rules;
- `dedup`: exact (sha256) and near (MinHash LSH) duplicate removal;
- `shards`: raw little-endian token arrays on disk with a checksummed `manifest.json`;
- `windows`, `fim`, `masking`: what training reads from the shards (random windows, their
  fill-in-the-middle reordering, and the masking of encoders' and T5's objectives);
- `prepare`: the `llmlab data prepare` and `llmlab tokenizer train` verbs that chain them.

Only the shared error type lives here, so that `import llmlab.data.shards` in a training loop
does not pull in the cleaning and dedup machinery.
"""

from __future__ import annotations

from llmlab.common import LlmlabError


class DataError(LlmlabError):
    """Input data or a prepared data directory is unusable; the message names the file (and line)."""
