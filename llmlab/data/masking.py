"""Pretraining objectives of encoders and encoder-decoders: pure, seeded transforms of token ids.

- `mlm_mask`: BERT's masked language model, token by token or by whole words (Devlin et al. 2019);
- `span_mask`: SpanBERT's geometric spans of whole words and the span-boundary targets (Joshi et al. 2020);
- `sentence_order_pair`: ALBERT's sentence-order prediction (Lan et al. 2020);
- `span_corrupt` and `span_corruption_lengths`: T5's span corruption with sentinels (Raffel et al. 2020).

Token ids are numpy integer arrays, one row (T,) or a batch (B, T), as `windows.py` reads them from
the shards; what comes back is numpy too (`torch.from_numpy` it after). Labels are int64 and hold
IGNORE (-100, cross-entropy's ignore_index) where nothing is predicted. Every random choice is
drawn from the `rng` passed in, in a fixed order, so a seeded generator gives the same result.

Static or dynamic masking is only a matter of which generator is passed. BERT drew each
sequence's mask once, when it wrote its training data: `static_rng(seed, index)` depends on the
sequence alone, so every epoch masks it alike. RoBERTa (Liu et al. 2019, Sec. 4.1) draws a new
mask each time a sequence is fed: `dynamic_rng(seed, index, epoch)`, or the batch's own generator.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

IGNORE = -100  # the label of a position with nothing to predict (cross-entropy's ignore_index)
_MASK_STREAM = 0x6D61736B  # "mask": keeps these generators apart from the loaders' (seed, n, ...) streams


def static_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sequence `index` for static masking (BERT): the same whenever the sequence
    is seen, so it is masked alike in every epoch."""
    return np.random.default_rng((seed, _MASK_STREAM, index))


def dynamic_rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    """The generator of sequence `index` in `epoch` for dynamic masking (RoBERTa, Liu et al. 2019,
    Sec. 4.1): a new mask each time the sequence is fed, yet a pure function of (seed, index, epoch),
    so a resumed run masks as an uninterrupted one."""
    return np.random.default_rng((seed, _MASK_STREAM, index, epoch))


def word_starts_from_tokens(tokens: Sequence[str],
                            scheme: Literal["wordpiece", "space_prefix"] = "wordpiece") -> np.ndarray:
    """(T,) bool, True where a token begins a word, from the tokens' strings.

    scheme="wordpiece" (BERT): the pieces after the first carry the mark, so a token that starts
    with "##" continues the word before it. scheme="space_prefix": the first piece carries it, so a
    token starts a word when it starts with "Ġ" (byte-level BPE: GPT-2, RoBERTa) or "▁"
    (SentencePiece: ALBERT, T5). The first token always starts a word. Special tokens need no care:
    `mlm_mask` and `span_mask` start a word at and after each of them."""
    if scheme == "wordpiece":
        starts = [not t.startswith("##") for t in tokens]
    elif scheme == "space_prefix":
        starts = [t.startswith(("Ġ", "▁")) for t in tokens]
    else:
        raise ValueError(f"scheme must be 'wordpiece' or 'space_prefix', got {scheme!r}")
    if starts:
        starts[0] = True
    return np.array(starts, dtype=bool)


def mlm_mask(ids: np.ndarray, *, rng: np.random.Generator, vocab_size: int, mask_id: int,
             special_ids: Collection[int], rate: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1,
             word_starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masked language model (Devlin et al. 2019, Sec. 3.1, Task #1) -> (inputs, labels).

    "The training data generator chooses 15% of the token positions at random for prediction. If
    the i-th token is chosen, we replace the i-th token with (1) the [MASK] token 80% of the time
    (2) a random token 10% of the time (3) the unchanged i-th token 10% of the time."

    Each row gets exactly max(1, round(rate * n)) predictions, n its tokens not in `special_ids`
    (as BERT's create_pretraining_data.py counts them); special tokens (pad them too) are
    never chosen, and the random token is uniform over the ids in [0, vocab_size) that are neither
    special nor `mask_id` (it may equal the original). `inputs` has ids' shape and dtype, `labels`
    the original token where chosen and IGNORE elsewhere, as int64.

    Whole-word masking (google-research/bert, May 2019): with `word_starts` (ids' shape, True where a
    token begins a word, see `word_starts_from_tokens`) whole words are chosen, in random order
    while the count of masked tokens stays nearest the budget, so the rate holds on average and a
    row ends within half its longest word of it; the 80/10/10 choice is made once per word. A
    special token is a word of its own, and the token after it starts a word."""
    rows = _rows(ids)
    specials = _specials(special_ids, mask_id, vocab_size)
    _check_rates(rate, mask_frac, random_frac)
    special = np.isin(rows, specials)
    starts = _word_starts(rows, special, word_starts).ravel()
    word = np.cumsum(starts) - 1  # (B*T,) the word of each token, numbered across the batch
    firsts = np.flatnonzero(starts)
    word_row = firsts // rows.shape[1]
    word_len = np.diff(np.append(firsts, starts.size))
    candidate = ~special.ravel()[firsts]
    # Words in random order within each row, candidates first; a word is taken while the running
    # count, with half of it, stays under the row's budget: exactly the budget when words are tokens.
    order = np.lexsort((rng.random(len(firsts)), ~candidate, word_row))
    lengths = np.where(candidate, word_len, 0)[order]
    before = np.cumsum(lengths) - lengths  # tokens of the words ahead in the order, over the batch
    row_first = np.searchsorted(word_row[order], np.arange(len(rows)))  # each row's first word in the order
    before = before - before[row_first][word_row[order]]
    budget = _budget((~special).sum(1), rate)[word_row[order]]
    chosen = np.zeros(len(firsts), dtype=bool)
    chosen[order] = candidate[order] & (before + lengths / 2 < budget)
    unit = np.where(chosen[word], word, -1).reshape(rows.shape)
    inputs, labels = _corrupt(rows, unit, len(firsts), rng, vocab_size, specials, mask_id, mask_frac, random_frac)
    return inputs.reshape(np.shape(ids)), labels.reshape(np.shape(ids))


@dataclass(frozen=True)
class SpanMask:
    """What `span_mask` returns; every array but `spans` has the shape of its ids."""
    inputs: np.ndarray  # ids' dtype: each span's tokens all [MASK], all random, or all kept
    labels: np.ndarray  # int64: the original token inside a span, IGNORE elsewhere
    left: np.ndarray  # int64: inside a span s..e, the position s - 1 of its left boundary token; -1 elsewhere
    right: np.ndarray  # int64: inside a span s..e, the position e + 1 of its right boundary token; -1 elsewhere
    position: np.ndarray  # int64: inside a span, i - s, the token's place in it from 0 (the paper's p_{i-s+1}); -1
    spans: np.ndarray  # (S, 3) int64: row, start, stop of each span (tokens start:stop), sorted


def span_mask(ids: np.ndarray, *, rng: np.random.Generator, vocab_size: int, mask_id: int,
              special_ids: Collection[int], word_starts: np.ndarray | None = None, rate: float = 0.15,
              p: float = 0.2, max_span: int = 10, mask_frac: float = 0.8, random_frac: float = 0.1) -> SpanMask:
    """SpanBERT's span masking and span-boundary targets (Joshi et al. 2020, Sec. 3.1 and 3.2).

    "We select a subset of tokens Y by iteratively sampling spans of text until the masking budget
    (e.g. 15% of X) has been spent. At each iteration, we first sample a span length (number of
    words) from a geometric distribution l ~ Geo(p) ... we set p = 0.2, and also clip l at
    l_max = 10. This yields a mean span length of 3.8." Spans are whole words and start at a word's
    beginning; the 80/10/10 replacement is made "at the span level and not for each token individually".
    The span boundary objective predicts each token x_i of a span s..e from the boundary tokens
    and its place in the span: y_i = f(x_{s-1}, x_{e+1}, p_{i-s+1}) (Sec. 3.2).

    The length is drawn from Geo(p) cut at `max_span` and renormalised (the mean is 3.797 for the
    paper's values), in words of `word_starts` (None: every token is a word), and the start
    uniformly among the word starts where it fits: on words not yet masked and not special, with an
    unmasked token on either side (so spans never touch, and every span has both boundaries; they
    may be special tokens). Where no place is left for the drawn length a shorter one is tried. A
    span that would pass the row's budget, max(1, round(rate * n)) of its n non-special tokens,
    keeps the whole words that fit, so a row never passes its budget and, room allowing, reaches it
    exactly when words are single tokens."""
    rows = _rows(ids)
    specials = _specials(special_ids, mask_id, vocab_size)
    _check_rates(rate, mask_frac, random_frac)
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    if max_span < 1:
        raise ValueError(f"max_span must be >= 1, got {max_span}")
    if rows.shape[1] < 3:
        raise ValueError(f"ids: a span needs a token on either side, so rows of at least 3 tokens, got {rows.shape[1]}")
    special = np.isin(rows, specials)
    starts = _word_starts(rows, special, word_starts)
    lengths = np.arange(1, max_span + 1)
    weights = p * (1 - p) ** (lengths - 1)
    weights /= weights.sum()
    spans = []
    for r, budget in enumerate(_budget((~special).sum(1), rate)):
        firsts = np.flatnonzero(starts[r])
        stops = np.append(firsts[1:], rows.shape[1])
        word_special, masked = special[r, firsts], np.zeros(len(firsts), dtype=bool)
        spent = 0
        while spent < budget:
            n = int(rng.choice(lengths, p=weights))
            fits = _span_starts(word_special, masked, n)
            while len(fits) == 0 and n > 1:  # the row is crowded: a shorter span
                n -= 1
                fits = _span_starts(word_special, masked, n)
            if len(fits) == 0:
                break
            w = int(fits[rng.integers(len(fits))])
            n = int(np.searchsorted(stops[w:w + n] - firsts[w], budget - spent, side="right"))  # words within budget
            if n == 0:
                break
            masked[w:w + n] = True
            spans.append((r, int(firsts[w]), int(stops[w + n - 1])))
            spent += spans[-1][2] - spans[-1][1]
    spans = np.array(sorted(spans), dtype=np.int64).reshape(-1, 3)
    unit, left, right, position = (np.full(rows.shape, -1, dtype=np.int64) for _ in range(4))
    for i, (r, start, stop) in enumerate(spans):
        unit[r, start:stop] = i
        left[r, start:stop] = start - 1
        right[r, start:stop] = stop
        position[r, start:stop] = np.arange(stop - start)
    inputs, labels = _corrupt(rows, unit, len(spans), rng, vocab_size, specials, mask_id, mask_frac, random_frac)
    shape = np.shape(ids)
    return SpanMask(inputs.reshape(shape), labels.reshape(shape), left.reshape(shape), right.reshape(shape),
                    position.reshape(shape), spans)


@dataclass(frozen=True)
class SegmentPair:
    """One sentence-order example: [CLS] first [SEP] second [SEP]."""
    input_ids: np.ndarray  # (T,) int64, T <= max_len
    token_type_ids: np.ndarray  # (T,) int64: 0 up to and including the first [SEP], 1 after it
    label: int  # 0: the segments in document order (A, B); 1: swapped (B, A)


def sentence_order_pair(a: np.ndarray, b: np.ndarray, *, rng: np.random.Generator, cls_id: int, sep_id: int,
                        max_len: int, swap_prob: float = 0.5) -> SegmentPair:
    """ALBERT's sentence-order prediction (Lan et al. 2020, Sec. 3.1, "Inter-sentence coherence
    loss"; ablated in Sec. 4.6): "The SOP loss uses as positive examples the same technique as BERT
    (two consecutive segments from the same document), and as negative examples the same two
    consecutive segments but with their order swapped."

    `a` and `b` are consecutive segments of one document (1-D token ids, a first). With probability
    `swap_prob` the pair is laid out (B, A), label 1, else (A, B), label 0. When the pair passes
    max_len - 3 tokens, the longer segment is cut one token at a time (the second on ties), as BERT's
    truncate_seq_pair does; A loses its beginning and B its end, keeping the tokens at the seam,
    which are what tell the order. The cut comes before the swap, so a swapped pair holds exactly
    the tokens of the unswapped one. Padding is left to the collator."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.ndim != 1 or len(a) == 0 or len(b) == 0:
        raise ValueError(f"a and b must be non-empty 1-D token ids, got shapes {a.shape} and {b.shape}")
    if max_len < 5:
        raise ValueError(f"max_len must be >= 5 ([CLS] A [SEP] B [SEP] with a token each), got {max_len}")
    if not 0 <= swap_prob <= 1:
        raise ValueError(f"swap_prob must be in [0, 1], got {swap_prob}")
    room = max_len - 3
    keep_a = min(len(a), max(room - len(b), (room + 1) // 2))  # what cutting the longer, one at a time, leaves
    keep_b = min(len(b), room - keep_a)
    a, b = a[len(a) - keep_a:], b[:keep_b]
    label = int(rng.random() < swap_prob)
    first, second = (b, a) if label else (a, b)
    input_ids = np.concatenate([[cls_id], first, [sep_id], second, [sep_id]]).astype(np.int64)
    token_type_ids = np.concatenate([np.zeros(len(first) + 2), np.ones(len(second) + 1)]).astype(np.int64)
    return SegmentPair(input_ids, token_type_ids, label)


def span_corrupt(ids: np.ndarray, *, rng: np.random.Generator, sentinel_ids: Sequence[int], rate: float = 0.15,
                 mean_span_length: float = 3.0, eos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """T5's span corruption (Raffel et al. 2020, Sec. 3.1.4; span lengths Sec. 3.3.4) -> (inputs, targets).

    "All consecutive spans of dropped-out tokens are replaced by a single sentinel token. Each
    sentinel token is assigned a token ID that is unique to the sequence. ... The target then
    corresponds to all of the dropped-out spans of tokens, delimited by the same sentinel tokens
    used in the input sequence plus a final sentinel token to mark the end of the target sequence."

    The noise follows T5's random_spans_noise_mask: a row of L tokens has round(L * rate) noise
    tokens (at least 1, at most L - 1) in round(noise / mean_span_length) spans (at least 1); the
    noise and the kept tokens are each cut into that many non-empty runs, uniformly over all
    cuttings, and laid out kept, noise, kept, noise, ..., so a row always starts with a kept run
    and ends with noise. With k spans:

        inputs  = kept_0 s_0 kept_1 s_1 ... kept_{k-1} s_{k-1} [eos]
        targets = s_0 noise_0 s_1 noise_1 ... s_{k-1} noise_{k-1} s_k [eos]

    where s_i = sentinel_ids[i] (<extra_id_i>: in T5's vocabulary the last ids, counting down;
    `Tokenizer.sentinel_ids` gives them). `ids` is one row or a batch of rows of one length, and
    every row comes out at the same lengths (see `span_corruption_lengths`), in ids' dtype."""
    rows = _rows(ids)
    if np.isin(rows, sentinel_ids).any():
        raise ValueError("ids must not contain sentinel ids: the targets could not be told apart from them")
    n_noise, n_spans = _noise_counts(rows.shape[1], rate, mean_span_length)
    if len(sentinel_ids) < n_spans + 1:
        raise ValueError(f"sentinel_ids: {n_spans} spans need {n_spans + 1} sentinels (one to end the targets), "
                         f"got {len(sentinel_ids)}")
    tail = [] if eos_id is None else [eos_id]
    inputs, targets = [], []
    for row in rows:
        kept = _random_segmentation(rows.shape[1] - n_noise, n_spans, rng)
        noise = _random_segmentation(n_noise, n_spans, rng)
        runs = np.split(row, np.cumsum(np.stack([kept, noise], 1).ravel())[:-1])  # kept_0, noise_0, kept_1, ...
        inputs.append(np.concatenate([x for i in range(n_spans) for x in (runs[2 * i], [sentinel_ids[i]])] + [tail]))
        targets.append(np.concatenate([x for i in range(n_spans) for x in ([sentinel_ids[i]], runs[2 * i + 1])]
                                      + [[sentinel_ids[n_spans]], tail]))
    shape = np.shape(ids)[:-1]
    return (np.stack(inputs).astype(rows.dtype).reshape(*shape, -1),
            np.stack(targets).astype(rows.dtype).reshape(*shape, -1))


def span_corruption_lengths(inputs_length: int, *, rate: float = 0.15, mean_span_length: float = 3.0,
                            eos: bool) -> tuple[int, int]:
    """(length, targets_length): the longest row `length` whose `span_corrupt` inputs come out at
    exactly `inputs_length` tokens, and its targets' length (T5's compute_input_and_target_lengths,
    for packed training at fixed shapes). `eos`: whether span_corrupt is given an eos_id. The
    targets hold the final sentinel too, one more than T5's code (114 for inputs of 512)."""
    def lengths(n: int) -> tuple[int, int]:
        n_noise, n_spans = _noise_counts(n, rate, mean_span_length)
        return n - n_noise + n_spans + eos, n_noise + n_spans + 1 + eos

    if lengths(2)[0] > inputs_length:
        raise ValueError(f"inputs_length must be >= {lengths(2)[0]}, got {inputs_length}")
    n = 2
    while lengths(n + 1)[0] <= inputs_length:  # the inputs grow by 0 or 1 token per row token
        n += 1
    return n, lengths(n)[1]


def _rows(ids: np.ndarray) -> np.ndarray:
    """`ids` as (B, T) rows; ValueError unless a non-empty 1-D or 2-D integer array."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or ids.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D or 2-D integer array, got shape {ids.shape} of {ids.dtype}")
    return ids.reshape(-1, ids.shape[-1])


def _specials(special_ids: Collection[int], mask_id: int, vocab_size: int) -> np.ndarray:
    """The sorted ids never masked nor drawn as random tokens: `special_ids` and `mask_id`."""
    specials = np.unique(np.append(np.asarray(list(special_ids), dtype=np.int64), mask_id))
    if specials[0] < 0 or specials[-1] >= vocab_size:
        raise ValueError(f"special_ids and mask_id must lie in [0, vocab_size={vocab_size}), got {specials.tolist()}")
    if len(specials) >= vocab_size:
        raise ValueError(f"vocab_size must leave an id that is not special, got {vocab_size}")
    return specials


def _check_rates(rate: float, mask_frac: float, random_frac: float) -> None:
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
        raise ValueError(f"mask_frac and random_frac must be >= 0 with a sum <= 1, got {mask_frac} and {random_frac}")


def _budget(n: np.ndarray, rate: float) -> np.ndarray:
    """Tokens to mask in rows of n candidates: round(rate * n), half to even, and at least one."""
    return np.where(n > 0, np.maximum(np.rint(rate * n), 1), 0).astype(np.int64)


def _word_starts(rows: np.ndarray, special: np.ndarray, word_starts: np.ndarray | None) -> np.ndarray:
    """(B, T) bool: True where a word begins; every special token is a word of its own."""
    if word_starts is None:
        return np.ones(rows.shape, dtype=bool)
    word_starts = np.asarray(word_starts, dtype=bool)
    if word_starts.size != rows.size:
        raise ValueError(f"word_starts must have the shape of ids, got {word_starts.size} values for {rows.size}")
    starts = word_starts.reshape(rows.shape) | special
    starts[:, 1:] |= special[:, :-1]
    starts[:, 0] = True
    return starts


def _span_starts(word_special: np.ndarray, masked: np.ndarray, n: int) -> np.ndarray:
    """The words w where a span of words w .. w+n-1 fits: none of them special or masked, and the
    words w-1 and w+n there and unmasked, to give the span its boundary tokens."""
    w = np.arange(1, len(masked) - n)
    free = np.concatenate([[0], np.cumsum(~word_special & ~masked)])
    return w[(free[w + n] - free[w] == n) & ~masked[w - 1] & ~masked[w + n]]


def _random_segmentation(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(k,) positive lengths that sum to n, uniform over all of them: k - 1 cuts among the n - 1 gaps."""
    cuts = np.sort(rng.choice(n - 1, size=k - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [n]]))


def _noise_counts(length: int, rate: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of `length` tokens, as T5's random_spans_noise_mask counts them."""
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    if mean_span_length < 1:
        raise ValueError(f"mean_span_length must be >= 1, got {mean_span_length}")
    if length < 2:
        raise ValueError(f"ids: span corruption needs rows of at least 2 tokens, got {length}")
    n_noise = min(max(round(length * rate), 1), length - 1)
    n_spans = max(round(n_noise / mean_span_length), 1)
    if n_spans > length - n_noise:
        raise ValueError(f"rate {rate} with mean_span_length {mean_span_length} leaves fewer kept tokens than "
                         f"spans in a row of {length}")
    return n_noise, n_spans


def _random_tokens(rng: np.random.Generator, n: int, vocab_size: int, specials: np.ndarray) -> np.ndarray:
    """n ids uniform over [0, vocab_size) less the sorted `specials`: draw k among the others, then
    step over each special at or below it (specials[j] - j of the others lie below specials[j])."""
    k = rng.integers(0, vocab_size - len(specials), size=n)
    return k + np.searchsorted(specials - np.arange(len(specials)), k, side="right")


def _corrupt(rows: np.ndarray, unit: np.ndarray, n_units: int, rng: np.random.Generator, vocab_size: int,
             specials: np.ndarray, mask_id: int, mask_frac: float, random_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) with the 80/10/10 choice made once per unit: `unit` gives each token the
    index of the word or span it is masked with, -1 for none."""
    masked = unit >= 0
    u = np.append(rng.random(n_units), 1.0)[unit]  # unit -1 reads the 1.0 at the end
    to_mask = masked & (u < mask_frac)
    to_random = masked & (u >= mask_frac) & (u < mask_frac + random_frac)
    inputs = rows.copy()
    inputs[to_mask] = mask_id
    inputs[to_random] = _random_tokens(rng, int(to_random.sum()), vocab_size, specials)
    return inputs, np.where(masked, rows, IGNORE).astype(np.int64)
