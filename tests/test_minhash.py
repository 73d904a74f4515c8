import random

import numpy as np

from backforth_spark import minhash
from backforth_spark.text import normalise
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
