"""Exact and near-duplicate document removal, streaming, first occurrence wins.

Exact duplicates are found by the sha256 of the (already normalized) text. Near duplicates
are found with MinHash (Broder 1997, "On the resemblance and containment of documents") over
word n-gram shingles, indexed by locality-sensitive hashing (`datasketch.MinHashLSH`), the
recipe used for large LM corpora (e.g. Lee et al. 2022, "Deduplicating Training Data Makes
Language Models Better"). LSH only proposes candidates; a candidate counts as a duplicate when
the MinHash estimate of its Jaccard similarity with the new document reaches the threshold,
which removes most of LSH's false positives near the threshold.

Memory is O(kept documents), nothing for removed ones: per kept document a 32-byte digest in a
set (about 100 bytes with Python's overhead), and with `near=True` its `num_perm` hash values
(4 or 8 bytes each, by datasketch version) plus the LSH band keys that index them. Measured
with tracemalloc at num_perm=128: about 4 KiB per kept document, so about 4 GB per million;
use near=False (exact only, ~100 bytes each) for corpora of many millions of documents.
"""

from __future__ import annotations

import hashlib

import numpy as np
from datasketch import MinHash, MinHashLSH


class Deduplicator:
    """Decide, document by document, whether text was seen before (exactly or nearly).

    Args:
        near: Also detect near duplicates; False keeps only the exact check (no MinHash cost).
        threshold: Jaccard similarity of shingle sets at or above which a document is a near
            duplicate of a kept one.
        num_perm: MinHash permutations: more gives a finer Jaccard estimate (standard error
            about sqrt(J(1-J)/num_perm)) at a proportional cost in time and memory.
        shingle: Words per shingle; a document shorter than this is a single shingle.
        seed: Seed of the MinHash permutations.
    """

    def __init__(self, near: bool = True, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5,
                 seed: int = 0):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if shingle < 1:
            raise ValueError(f"shingle must be >= 1, got {shingle}")
        self.near, self.threshold, self.shingle = near, threshold, shingle
        self._digests: set[bytes] = set()
        self._signatures: list[np.ndarray] = []  # hash values of kept documents, indexed by LSH key
        if near:
            # copying one prototype is ~30x faster than building each MinHash's permutations anew
            self._prototype = MinHash(num_perm=num_perm, seed=seed)
            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def __len__(self) -> int:
        """Number of kept (indexed) documents."""
        return len(self._digests)

    def check(self, text: str) -> str | None:
        """Classify `text` against every document kept so far; a kept document joins the index.

        Args:
            text: A document, normalized (`llmlab.data.clean.normalize`) so that trivially
                different copies hash alike.

        Returns:
            "exact_duplicate" if the same text was kept before, "near_duplicate" if a kept
            document's word-shingle Jaccard similarity is estimated at >= threshold, else None
            (the document is new and is now indexed).
        """
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in self._digests:
            return "exact_duplicate"
        signature = None
        if self.near:
            minhash = self._minhash(text)
            signature = minhash.hashvalues
            for key in self._lsh.query(minhash):
                if np.count_nonzero(self._signatures[key] == signature) >= self.threshold * len(signature):
                    return "near_duplicate"
        self._digests.add(digest)
        if signature is not None:
            self._lsh.insert(len(self._signatures), minhash, check_duplication=False)
            self._signatures.append(signature.copy())
        return None

    def _minhash(self, text: str) -> MinHash:
        # lower-cased whitespace words: case and spacing changes do not make a document new
        words = text.lower().split()
        n = min(self.shingle, len(words)) or 1
        shingles = {" ".join(words[i:i + n]).encode("utf-8") for i in range(max(len(words) - n + 1, 1))}
        minhash = self._prototype.copy()
        minhash.update_batch(list(shingles))
        return minhash
