import random
import zlib

import numpy as np

from backforth_spark.core import minhash
from backforth_spark.core.config import DedupConfig
from backforth_spark.core.text import normalise
from tests.near_dup_corpus import edit_words


def _text(n=400, seed=0):
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


def test_shingles_are_word_ngrams_of_the_normal_form():
    assert minhash.shingle_set("a b c d e f", 5) == minhash.shingle_set("a  b c d e f", 5)
    assert len(minhash.shingle_hashes("a b c d e f", 5)) == 2
    assert len(minhash.shingle_hashes("a b", 5)) == 1  # shorter than n: one shingle
    assert minhash.shingle_hashes("", 5).size == 0


def test_signature_estimates_jaccard():
    a, b = minhash.permutations(256, seed=3)
    base = _text()
    rng = random.Random(1)
    for rate in (0.02, 0.1, 0.3):
        other = edit_words(base, rate, rng)
        s1, s2 = (minhash.shingle_set(normalise(x), 5) for x in (base, other))
        true = minhash.jaccard(s1, s2)
        est = minhash.estimated_jaccard(
            minhash.signature(np.array(sorted(s1), dtype=np.uint64), a, b),
            minhash.signature(np.array(sorted(s2), dtype=np.uint64), a, b),
        )
        assert abs(est - true) < 0.08, (rate, true, est)


def test_same_seed_same_signature_and_bands():
    a, b = minhash.permutations(112, seed=1)
    h = minhash.shingle_hashes(normalise(_text()), 5)
    s = minhash.signature(h, a, b)
    a2, b2 = minhash.permutations(112, seed=1)
    assert np.array_equal(s, minhash.signature(h, a2, b2))
    bands = minhash.band_hashes(s, 14, 8)
    assert len(bands) == 14 and all(-(2**63) <= x < 2**63 for x in bands)
    assert bands == minhash.band_hashes(s.copy(), 14, 8)


def test_band_probability_is_steep_around_the_threshold():
    assert minhash.candidate_probability(0.85, 14, 8) > 0.98
    assert minhash.candidate_probability(0.5, 14, 8) < 0.06


def test_the_default_layout_misses_a_link_at_jaccard_0_9_at_most_once_in_a_million():
    # a chain of drifting near copies breaks wherever LSH misses one of its links: with FineWeb's 14 x 8
    # that is 3.8e-4 a link, about 4 breaks in a chain of 10,000
    layout = DedupConfig()
    assert 1 - minhash.candidate_probability(0.9, layout.bands, layout.rows) <= 1e-6
    assert minhash.candidate_probability(0.5, layout.bands, layout.rows) < 0.1  # still few far pairs


def _reference_signature(text: str, n: int, a, b) -> list[int]:
    """MinHash by the definition, in Python integers: crc32 of each word n-gram, then per permutation the
    minimum of ((a*x mod 2^64) + b mod 2^64) mod (2^61 - 1), low 32 bits (the uint64 wrap is part of the
    hash family)."""

    words = text.split()
    grams = {zlib.crc32(" ".join(words[i : i + n]).encode()) for i in range(len(words) - n + 1)}
    m64, p = 1 << 64, (1 << 61) - 1
    return [min(((((int(ai) * x) % m64 + int(bi)) % m64) % p) & 0xFFFFFFFF for x in grams) for ai, bi in
            zip(a, b, strict=True)]  # fmt: skip


def test_the_sliced_signature_is_minhash_by_the_definition():
    a, b = minhash.permutations(16, seed=5)
    text = normalise(_text(300, seed=4))
    expected = _reference_signature(text, 5, a, b)
    for size in (1, 7, 4096):  # one shingle per slice, uneven slices, one slice
        sliced = minhash.signature_of_slices(minhash.shingle_hash_slices(text, 5, size), a, b)
        assert sliced.tolist() == expected, size
    assert minhash.text_signature(text, 5, a, b).tolist() == expected


def test_values_at_the_modulus_wrap_to_the_remainder():
    m = (1 << 61) - 1
    a, b = np.array([1], dtype=np.uint64), np.array([m - 3], dtype=np.uint64)
    # x = h + m - 3 runs across m: the signature of each one-shingle set is x mod m, low 32 bits
    for h in range(12):
        sig = minhash.signature_of_slices(iter([np.array([h], dtype=np.uint64)]), a, b)
        assert sig.tolist() == [((h + m - 3) % m) & 0xFFFFFFFF], h


def test_a_big_document_of_unique_text_is_signed_in_bounded_memory():
    import tracemalloc

    rng = random.Random(7)
    text = " ".join(f"u{rng.getrandbits(40)}" for _ in range(300_000))  # 4 MB, every shingle new
    a, b = minhash.permutations(112, seed=1)
    tracemalloc.start()
    minhash.text_signature(text, 5, a, b)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # all shingles x permutations at once would be 300k x 112 x 8 bytes = 269 MB
    assert peak < 16 * 2**20, peak


def test_exact_jaccard_of_sorted_arrays_is_the_set_jaccard():
    x, y = normalise(_text(200, seed=1)), normalise(edit_words(_text(200, seed=1), 0.1, random.Random(2)))
    sx, sy = minhash.shingle_set(x, 5), minhash.shingle_set(y, 5)
    expected = len(sx & sy) / len(sx | sy)
    assert minhash.jaccard_of_arrays(minhash.shingle_hashes(x, 5), minhash.shingle_hashes(y, 5)) == expected


def test_shingle_hashes_are_crc32_of_the_joined_words_across_pieces_and_slices():

    rng = random.Random(11)
    for _ in range(500):
        words = [rng.choice(["a", "bb", "ççç", "d", "é𝔘", "x"]) for _ in range(rng.randint(0, 30))]
        n = rng.randint(1, 6)
        # the definition: CRC-32 of each run of n words joined by one space (a shorter text: one shingle)
        if len(words) < n:
            expected = [zlib.crc32(" ".join(words).encode())] if words else []
        else:
            expected = [zlib.crc32(" ".join(words[i : i + n]).encode()) for i in range(len(words) - n + 1)]
        cuts = sorted(rng.sample(range(len(words) + 1), min(len(words) + 1, rng.randint(0, 4))))
        pieces = [" ".join(words[a:b]) for a, b in zip([0, *cuts], [*cuts, len(words)], strict=True)]
        for source in (" ".join(words), [p for p in pieces if p]):
            slices = minhash.shingle_hash_slices(source, n, size=rng.randint(1, 5))
            assert [int(h) for s in slices for h in s] == expected, (words, n, pieces)


def test_every_kind_of_whitespace_is_one_space_between_words():
    import sys

    spaces = [chr(cp) for cp in range(sys.maxunicode + 1) if chr(cp).isspace()]
    assert len(spaces) > 20
    for space in spaces:
        assert minhash.single_spaced(f"{space}a{space}b {space}c{space}") == "a b c", repr(space)
    assert minhash.single_spaced("a b\x00c") == "a b\x00c"  # a control that is not whitespace stays
    assert minhash.shingle_hashes(" \u3000a\tb\u00a0\u2028c  d ", 2).tolist() == sorted(
        zlib.crc32(s.encode()) for s in ("a b", "b c", "c d")
    )
