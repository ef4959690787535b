"""Encoder pretraining objectives: rates within binomial error, exact labels, whole words and spans,
span-boundary targets, sentence order, and T5 span corruption's exact round trip and lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmlab.data.masking import (IGNORE, dynamic_rng, mlm_mask, sentence_order_pair, span_corrupt,
                                 span_corruption_lengths, span_mask, static_rng, word_starts_from_tokens)

V, PAD, CLS, SEP, MASK, ODD = 1000, 0, 1, 2, 3, 500  # ODD: a special id in the middle of the vocabulary
SPECIALS = (PAD, CLS, SEP, ODD)
KW = dict(vocab_size=V, mask_id=MASK, special_ids=SPECIALS)
SENTINELS = tuple(range(V - 1, V - 101, -1))  # <extra_id_0> is the highest id, as in T5
EOS = 1


def _batch(rng, rows, length, *, pads=True, odd=True) -> np.ndarray:
    """[CLS] ordinary tokens [SEP], some rows padded at the end and some with ODD inside; int32."""
    ids = rng.integers(4, V - 1, size=(rows, length))
    ids[ids >= ODD] += 1  # ordinary tokens: 4 .. V-1 without ODD
    ids[:, 0] = CLS
    for r in range(rows):
        end = length - (int(rng.integers(0, length // 4)) if pads and r % 2 else 0)
        ids[r, end - 1], ids[r, end:] = SEP, PAD
        if odd and r % 3 == 0:
            ids[r, rng.integers(1, end - 1)] = ODD
    return ids.astype(np.int32)


def _budget(n: int, rate: float = 0.15) -> int:
    return max(1, round(rate * n)) if n else 0


def _within(share: float, p: float, n: int) -> bool:
    """`share` of n draws within 4 binomial standard deviations of p."""
    return abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n)


def _forced_starts(ids, word_starts) -> np.ndarray:
    """The words mlm_mask and span_mask see: a special token is a word of its own."""
    special = np.isin(ids, SPECIALS)
    starts = word_starts | special
    starts[:, 1:] |= special[:, :-1]
    starts[:, 0] = True
    return starts


def test_mlm_predicts_exactly_the_rate_of_ordinary_tokens_spread_over_the_row():
    ids = _batch(np.random.default_rng(0), 64, 128)
    inputs, labels = mlm_mask(ids, rng=np.random.default_rng(1), **KW)
    assert inputs.shape == labels.shape == ids.shape and inputs.dtype == np.int32 and labels.dtype == np.int64
    ordinary, chosen = ~np.isin(ids, SPECIALS), labels != IGNORE
    assert (chosen.sum(1) == [_budget(n) for n in ordinary.sum(1)]).all()
    assert not (chosen & ~ordinary).any()  # specials (and pads) never chosen
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
    for half in (slice(0, 64), slice(64, 128)):  # chosen anywhere in the row, not in a fixed place
        n = int(ordinary[:, half].sum())
        assert _within(chosen[:, half].sum() / n, 0.15, n)


def test_mlm_replaces_80_10_10_and_never_with_a_special_token():
    ids = _batch(np.random.default_rng(2), 256, 128)
    inputs, labels = mlm_mask(ids, rng=np.random.default_rng(3), **KW)
    chosen = labels != IGNORE
    got, orig, n = inputs[chosen], ids[chosen], int(chosen.sum())
    others = V - len(SPECIALS) - 1  # the ids a random token is drawn from
    replaced = (got != MASK) & (got != orig)
    assert n > 4000
    assert _within((got == MASK).mean(), 0.8, n)
    assert _within(replaced.mean(), 0.1 * (1 - 1 / others), n)  # a random token may be the original
    assert _within((got == orig).mean(), 0.1 + 0.1 / others, n)
    assert not np.isin(got[replaced], SPECIALS + (MASK,)).any()


def test_random_tokens_are_uniform_over_the_ids_that_are_not_special():
    specials, mask, vocab = (0, 5, 11), 3, 12
    allowed = np.array([1, 2, 4, 6, 7, 8, 9, 10])
    ids = np.random.default_rng(4).choice(allowed, size=(400, 50))
    inputs, labels = mlm_mask(ids, rng=np.random.default_rng(5), vocab_size=vocab, mask_id=mask, special_ids=specials,
                              mask_frac=0.0, random_frac=1.0)
    drawn = inputs[labels != IGNORE]
    counts = np.bincount(drawn, minlength=vocab)
    assert counts[list(specials) + [mask]].sum() == 0
    assert all(_within(counts[i] / len(drawn), 1 / len(allowed), len(drawn)) for i in allowed)


def test_static_masking_repeats_and_dynamic_masking_changes():
    row = _batch(np.random.default_rng(6), 1, 128)[0]
    def chosen(rng):
        return mlm_mask(row, rng=rng, **KW)[1] != IGNORE
    a = mlm_mask(row, rng=static_rng(7, 42), **KW)
    b = mlm_mask(row, rng=static_rng(7, 42), **KW)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(chosen(static_rng(7, 42)), chosen(static_rng(7, 43)))
    np.testing.assert_array_equal(chosen(dynamic_rng(7, 42, 3)), chosen(dynamic_rng(7, 42, 3)))  # resumable
    assert not np.array_equal(chosen(dynamic_rng(7, 42, 0)), chosen(dynamic_rng(7, 42, 1)))
    rng = np.random.default_rng(8)  # a generator that advances: a new mask every time
    assert not np.array_equal(chosen(rng), chosen(rng))
    one, batch = mlm_mask(row, rng=static_rng(7, 42), **KW), mlm_mask(row[None], rng=static_rng(7, 42), **KW)
    assert one[0].shape == row.shape and batch[0].shape == (1, len(row))
    np.testing.assert_array_equal(one[1], batch[1][0])


def test_word_starts_from_wordpiece_and_space_prefixed_tokens():
    wordpiece = ["[CLS]", "un", "##aff", "##able", "is", "fine", "##ly", "[SEP]"]
    np.testing.assert_array_equal(word_starts_from_tokens(wordpiece), [1, 1, 0, 0, 1, 1, 0, 1])
    bpe = ["Hello", "Ġwor", "ld", "!", "Ġok"]
    np.testing.assert_array_equal(word_starts_from_tokens(bpe, "space_prefix"), [1, 1, 0, 0, 1])
    sentencepiece = ["▁un", "believ", "able", "▁", "42"]
    np.testing.assert_array_equal(word_starts_from_tokens(sentencepiece, "space_prefix"), [1, 0, 0, 1, 0])
    assert word_starts_from_tokens([]).shape == (0,)


def test_whole_word_masking_never_splits_a_word_and_keeps_the_rate():
    rng = np.random.default_rng(9)
    ids = _batch(rng, 128, 128)
    word_starts = rng.random(ids.shape) < 0.5  # also False at and after specials: mlm_mask must split there
    word_starts[:, 1] = False  # the token after [CLS] marked as a continuation
    inputs, labels = mlm_mask(ids, rng=np.random.default_rng(10), word_starts=word_starts, **KW)
    starts, chosen = _forced_starts(ids, word_starts), labels != IGNORE
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    assert not (chosen & np.isin(ids, SPECIALS)).any()
    words = masked_words = as_mask = 0
    for r in range(len(ids)):
        word = np.cumsum(starts[r]) - 1
        size, taken = np.bincount(word), np.bincount(word, chosen[r])
        masks = np.bincount(word, inputs[r] == MASK)
        assert ((taken == 0) | (taken == size)).all()  # all of a word or none of it
        assert ((masks == 0) | (masks == size)).all()  # the 80/10/10 choice is one per word
        ordinary = np.bincount(word, ~np.isin(ids[r], SPECIALS))
        assert abs(chosen[r].sum() - _budget(ordinary.sum())) <= size[ordinary > 0].max() / 2
        words += ordinary.astype(bool).sum()
        masked_words += (taken > 0).sum()
        as_mask += (masks > 0).sum()
    assert abs(chosen.sum() / (~np.isin(ids, SPECIALS)).sum() - 0.15) < 0.01
    assert masked_words > 800 and _within(as_mask / masked_words, 0.8, masked_words)
    assert masked_words < words
    assert chosen[:, 1].sum() > 5  # ... yet it starts a word that can be masked


def test_span_lengths_follow_the_clipped_geometric_and_fill_the_budget():
    ids = _batch(np.random.default_rng(11), 20, 2000, pads=False, odd=False)
    m = span_mask(ids, rng=np.random.default_rng(12), **KW)  # every token a word: lengths in tokens
    lengths = m.spans[:, 2] - m.spans[:, 1]
    ls = np.arange(1, 11)
    w = 0.2 * 0.8 ** (ls - 1) / (1 - 0.8 ** 10)  # Geo(0.2) renormalised on 1..10
    mean, sd = (ls * w).sum(), math.sqrt((ls ** 2 * w).sum() - (ls * w).sum() ** 2)
    assert round(mean, 1) == 3.8  # the paper's "mean span length of 3.8"
    assert len(lengths) > 1000 and lengths.min() >= 1 and lengths.max() <= 10
    assert abs(lengths.mean() - mean) <= 4 * sd / math.sqrt(len(lengths))
    assert _within((lengths == 1).mean(), w[0], len(lengths))
    masked = m.labels != IGNORE
    assert (masked.sum(1) == _budget(2000 - 2)).all()
    for half in (slice(0, 1000), slice(1000, 2000)):  # spans anywhere in the row (they cluster: a looser bound)
        assert abs(masked[:, half].mean() - 0.15) < 0.03
    whole_mask = np.array([(m.inputs[r, s:e] == MASK).all() for r, s, e in m.spans])
    assert _within(whole_mask.mean(), 0.8, len(whole_mask))  # the 80/10/10 choice is one per span


def test_spans_are_whole_words_with_unmasked_boundaries_and_sbo_targets():
    rng = np.random.default_rng(13)
    ids = _batch(rng, 48, 256)
    word_starts = rng.random(ids.shape) < 0.6
    m = span_mask(ids, rng=np.random.default_rng(14), word_starts=word_starts, **KW)
    starts, masked, special = _forced_starts(ids, word_starts), m.labels != IGNORE, np.isin(ids, SPECIALS)
    T = ids.shape[1]
    cover = np.zeros(ids.shape, dtype=bool)
    for r, s, e in m.spans:
        assert 1 <= s < e < T  # a token on either side
        assert not masked[r, s - 1] and not masked[r, e]  # the boundaries are not masked
        assert starts[r, s] and starts[r, e] and not special[r, s:e].any()
        assert not cover[r, s:e].any()
        cover[r, s:e] = True
        np.testing.assert_array_equal(m.labels[r, s:e], ids[r, s:e])
        assert (m.left[r, s:e] == s - 1).all() and (m.right[r, s:e] == e).all()
        np.testing.assert_array_equal(m.position[r, s:e], np.arange(e - s))
        span_masks = (m.inputs[r, s:e] == MASK).sum()
        assert span_masks in (0, e - s)
    np.testing.assert_array_equal(cover, masked)
    for a in (m.left, m.right, m.position):
        assert (a[~masked] == -1).all()
    np.testing.assert_array_equal(m.inputs[~masked], ids[~masked])
    budgets = np.array([_budget(n) for n in (~special).sum(1)])
    assert (masked.sum(1) <= budgets).all() and masked.sum() >= 0.9 * budgets.sum()
    assert len(m.spans) > 300 and m.inputs.dtype == ids.dtype
    again = span_mask(ids, rng=np.random.default_rng(14), word_starts=word_starts, **KW)
    np.testing.assert_array_equal(again.spans, m.spans)
    np.testing.assert_array_equal(again.inputs, m.inputs)


def test_sentence_order_labels_are_balanced_and_a_swap_is_exact():
    a, b = np.arange(10, 20), np.arange(30, 35)
    straight = np.r_[CLS, a, SEP, b, SEP], np.r_[[0] * 12, [1] * 6]
    swapped = np.r_[CLS, b, SEP, a, SEP], np.r_[[0] * 7, [1] * 11]
    rng = np.random.default_rng(15)
    labels = []
    for _ in range(4000):
        pair = sentence_order_pair(a, b, rng=rng, cls_id=CLS, sep_id=SEP, max_len=64)
        ids, types = swapped if pair.label else straight
        np.testing.assert_array_equal(pair.input_ids, ids)
        np.testing.assert_array_equal(pair.token_type_ids, types)
        labels.append(pair.label)
    assert set(labels) == {0, 1} and _within(np.mean(labels), 0.5, len(labels))


@pytest.mark.parametrize("len_a, len_b, max_len, keep_a, keep_b", [
    (50, 10, 32, 19, 10),  # only the longer is cut
    (10, 50, 32, 10, 19),
    (50, 40, 23, 10, 10),  # both, to half the room each
    (50, 40, 24, 11, 10),  # an odd room: the second is cut on ties
    (3, 4, 64, 3, 4),  # nothing to cut
])
def test_sentence_order_cuts_the_longer_segment_and_keeps_the_seam(len_a, len_b, max_len, keep_a, keep_b):
    a, b = np.arange(100, 100 + len_a), np.arange(300, 300 + len_b)
    for swap_prob, label in ((0.0, 0), (1.0, 1)):
        pair = sentence_order_pair(a, b, rng=np.random.default_rng(0), cls_id=CLS, sep_id=SEP, max_len=max_len,
                                   swap_prob=swap_prob)
        first, second = (b[:keep_b], a[len_a - keep_a:]) if label else (a[len_a - keep_a:], b[:keep_b])
        assert pair.label == label and len(pair.input_ids) <= max_len
        np.testing.assert_array_equal(pair.input_ids, np.r_[CLS, first, SEP, second, SEP])
        np.testing.assert_array_equal(pair.token_type_ids, np.r_[[0] * (len(first) + 2), [1] * (len(second) + 1)])


def _restore(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """The original row from span_corrupt's output: each input sentinel becomes what follows it in the targets."""
    inputs, targets = list(inputs[:-1]), list(targets[:-1])  # drop EOS
    at = {t: i for i, t in enumerate(targets) if t in SENTINELS}
    out = []
    for t in inputs:
        if t in SENTINELS:
            nxt = SENTINELS[SENTINELS.index(t) + 1]
            out += targets[at[t] + 1:at[nxt]]
        else:
            out.append(t)
    return out


@pytest.mark.parametrize("length", [2, 3, 10, 33, 57, 300])  # 33: 5 noise tokens in round(5 / 3) = 2 spans
def test_span_corruption_round_trips_with_exact_noise_and_span_counts(length):
    ids = np.random.default_rng(length).integers(4, V - 100, size=(8, length))
    inputs, targets = span_corrupt(ids, rng=np.random.default_rng(16), sentinel_ids=SENTINELS, eos_id=EOS)
    noise = min(max(round(length * 0.15), 1), length - 1)
    spans = max(round(noise / 3), 1)
    assert inputs.shape == (8, length - noise + spans + 1) and targets.shape == (8, noise + spans + 2)
    assert inputs.dtype == ids.dtype == targets.dtype
    for row, x, y in zip(ids, inputs, targets):
        assert _restore(x, y) == list(row)
        assert x[-1] == y[-1] == EOS
        assert list(x[np.isin(x, SENTINELS)]) == list(SENTINELS[:spans])
        assert list(y[np.isin(y, SENTINELS)]) == list(SENTINELS[:spans + 1])  # and the final one
        assert x[0] not in SENTINELS and x[-2] == SENTINELS[spans - 1]  # T5's layout: kept first, noise last
    one, _ = span_corrupt(ids[0], rng=np.random.default_rng(16), sentinel_ids=SENTINELS, eos_id=EOS)
    np.testing.assert_array_equal(one, inputs[0])
    if length >= 57:
        other, _ = span_corrupt(ids, rng=np.random.default_rng(17), sentinel_ids=SENTINELS, eos_id=EOS)
        assert not np.array_equal(other, inputs)


def test_span_corruption_lengths_give_exact_shapes():
    assert span_corruption_lengths(512, eos=True) == (568, 115)  # T5: 568 tokens for 512 inputs; 114 + final sentinel
    for inputs_length in (5, 64, 512):
        for eos in (True, False):
            length, targets_length = span_corruption_lengths(inputs_length, eos=eos)
            ids = np.random.default_rng(18).integers(4, V - 100, size=(3, length + 1))
            kw = dict(sentinel_ids=SENTINELS, eos_id=EOS if eos else None)
            inputs, targets = span_corrupt(ids[:, :length], rng=np.random.default_rng(19), **kw)
            assert inputs.shape == (3, inputs_length) and targets.shape == (3, targets_length)
            longer, _ = span_corrupt(ids, rng=np.random.default_rng(19), **kw)
            assert longer.shape[1] > inputs_length  # the longest such length


ROW = _batch(np.random.default_rng(20), 1, 64)[0]
T5_ROW = np.arange(10, 74)  # no sentinel among them
R = np.random.default_rng(21)


@pytest.mark.parametrize("call, name", [
    (lambda: mlm_mask(ROW, rng=R, rate=0.0, **KW), "rate"),
    (lambda: mlm_mask(ROW, rng=R, rate=1.0, **KW), "rate"),
    (lambda: span_mask(ROW, rng=R, rate=1.5, **KW), "rate"),
    (lambda: span_corrupt(T5_ROW, rng=R, sentinel_ids=SENTINELS, rate=0.0), "rate"),
    (lambda: span_corruption_lengths(512, rate=-0.1, eos=True), "rate"),
    (lambda: span_corrupt(T5_ROW, rng=R, sentinel_ids=SENTINELS, rate=0.9, mean_span_length=1), "rate"),
    (lambda: mlm_mask(ROW, rng=R, mask_frac=0.95, **KW), "mask_frac"),
    (lambda: mlm_mask(ROW[:0], rng=R, **KW), "ids"),
    (lambda: mlm_mask(ROW.astype(float), rng=R, **KW), "ids"),
    (lambda: span_mask(ROW[:2], rng=R, **KW), "ids"),
    (lambda: span_corrupt(T5_ROW[:1], rng=R, sentinel_ids=SENTINELS), "ids"),
    (lambda: span_corrupt(np.r_[T5_ROW, SENTINELS[5]], rng=R, sentinel_ids=SENTINELS), "ids"),
    (lambda: span_corrupt(np.arange(10, 310), rng=R, sentinel_ids=SENTINELS[:15]), "sentinel_ids"),
    (lambda: span_corruption_lengths(2, eos=True), "inputs_length"),
    (lambda: span_corrupt(T5_ROW, rng=R, sentinel_ids=SENTINELS, mean_span_length=0.5), "mean_span_length"),
    (lambda: mlm_mask(ROW, rng=R, vocab_size=V, mask_id=MASK, special_ids=(V,)), "special_ids"),
    (lambda: mlm_mask(ROW, rng=R, word_starts=np.ones(3, dtype=bool), **KW), "word_starts"),
    (lambda: span_mask(ROW, rng=R, p=0.0, **KW), "p"),
    (lambda: span_mask(ROW, rng=R, max_span=0, **KW), "max_span"),
    (lambda: sentence_order_pair(ROW, ROW, rng=R, cls_id=CLS, sep_id=SEP, max_len=4), "max_len"),
    (lambda: sentence_order_pair(ROW[:0], ROW, rng=R, cls_id=CLS, sep_id=SEP, max_len=64), "a and b"),
    (lambda: word_starts_from_tokens(["a"], "bpe"), "scheme"),
])
def test_bad_arguments_raise_value_errors_that_name_them(call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()
