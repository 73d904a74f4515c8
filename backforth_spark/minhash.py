"""MinHash signatures and LSH band hashes for near-duplicate detection (pure numpy, no Spark).

A document's normalised text is cut into word n-gram shingles; each shingle is hashed to 32 bits;
`num_perm` universal hash functions (a*x + b mod 2^61-1) permute the hashes and the minimum of each is
the signature. Two documents agree on a signature position with probability equal to the Jaccard
similarity of their shingle sets. LSH splits the signature into `bands` of `rows`; documents sharing any
band hash become candidates, with probability 1 - (1 - J^rows)^bands.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)


def shingle_hashes(normalised: str, n: int) -> np.ndarray:
    """Distinct 32-bit hashes of the word n-grams of already-normalised text (uint64 array).
    A text shorter than n words is one shingle."""
    words = normalised.split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    if len(words) < n:
        return np.array([zlib.crc32(" ".join(words).encode())], dtype=np.uint64)
    grams = (" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return np.unique(np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64))


def shingle_set(normalised: str, n: int) -> set[int]:
    return set(shingle_hashes(normalised, n).tolist())


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) coefficients of the universal hash family, fixed by the seed."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_MERSENNE), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_MERSENNE), size=num_perm, dtype=np.uint64)
    return a, b


def signature(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature (uint32, one value per permutation) of a set of shingle hashes."""
    if hashes.size == 0:
        return np.full(a.shape[0], 0xFFFFFFFF, dtype=np.uint32)
    # uint64 products wrap on overflow; that is part of the hash family, as in common MinHash code
    with np.errstate(over="ignore"):
        permuted = (np.outer(hashes, a) + b) % _MERSENNE & _MAX32
    return permuted.min(axis=0).astype(np.uint32)


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> list[int]:
    """One signed 64-bit hash per band (Spark's LongType), from the band's `rows` values."""
    if sig.shape[0] < bands * rows:
        raise ValueError(f"signature has {sig.shape[0]} values; bands x rows needs {bands * rows}")
    out = []
    for i in range(bands):
        chunk = sig[i * rows : (i + 1) * rows].tobytes()
        h = zlib.crc32(chunk) | (zlib.adler32(chunk) << 32)
        out.append(h - (1 << 64) if h >= 1 << 63 else h)
    return out


def estimated_jaccard(sig_a: Sequence[int], sig_b: Sequence[int]) -> float:
    a, b = np.asarray(sig_a), np.asarray(sig_b)
    return float(np.mean(a == b))


def jaccard(a: set[int], b: set[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """Probability that two documents with Jaccard j share at least one band."""
    return 1 - (1 - j**rows) ** bands
