"""MinHash signatures and LSH band hashes for near-duplicate detection (pure numpy, no Spark).

A document's normalised text is cut into word n-gram shingles; each shingle is hashed to 32 bits;
`num_perm` universal hash functions (a*x + b mod 2^61-1) permute the hashes and the minimum of each is
the signature. Two documents agree on a signature position with probability equal to the Jaccard
similarity of their shingle sets. LSH splits the signature into `bands` of `rows`; documents sharing any
band hash become candidates, with probability 1 - (1 - J^rows)^bands.

Memory stays bounded whatever the document's size: shingles are hashed as the words stream past and the
signature is the running minimum over slices of `SLICE` shingles, so a 50 MB page of unique text never
holds its word list or a shingles x permutations matrix (which would be 8M x 112 x 8 bytes, about 7 GB).
"""

from __future__ import annotations

import re
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)
_WORD = re.compile(r"\S+")  # the words of str.split()
SLICE = 4096  # shingles per slice: 4096 x 112 permutations x 8 bytes = 3.7 MB of work space


def shingle_hash_slices(normalised: str | Iterable[str], n: int, size: int = SLICE) -> Iterator[np.ndarray]:
    """32-bit hashes of the word n-grams of already-normalised text (a string, or pieces cut between
    words as `text.normalised_pieces` gives them), in slices of at most `size` (uint64 arrays; a shingle
    may repeat across slices). A text shorter than n words is one shingle."""
    window: deque[str] = deque(maxlen=n)
    buf: list[int] = []
    seen_words = 0
    pieces = [normalised] if isinstance(normalised, str) else normalised
    for m in (m for piece in pieces for m in _WORD.finditer(piece)):
        window.append(m.group())
        seen_words += 1
        if seen_words >= n:
            buf.append(zlib.crc32(" ".join(window).encode()))
            if len(buf) == size:
                yield np.array(buf, dtype=np.uint64)
                buf = []
    if 0 < seen_words < n:
        buf.append(zlib.crc32(" ".join(window).encode()))
    if buf:
        yield np.array(buf, dtype=np.uint64)


def shingle_hashes(normalised: str, n: int) -> np.ndarray:
    """Distinct 32-bit hashes of the word n-grams of already-normalised text (a sorted uint64 array:
    8 bytes per shingle)."""
    slices = list(shingle_hash_slices(normalised, n))
    return np.unique(np.concatenate(slices)) if slices else np.zeros(0, dtype=np.uint64)


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
    return signature_of_slices((hashes[i : i + SLICE] for i in range(0, hashes.size, SLICE)), a, b)


def signature_of_slices(slices: Iterator[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature of the shingles in `slices`: the running minimum, one slice at a time."""
    out = np.full(a.shape[0], 0xFFFFFFFF, dtype=np.uint64)
    for hashes in slices:
        if hashes.size == 0:
            continue
        # uint64 products wrap on overflow; that is part of the hash family, as in common MinHash code
        with np.errstate(over="ignore"):
            permuted = (np.outer(hashes, a) + b) % _MERSENNE & _MAX32
        np.minimum(out, permuted.min(axis=0), out=out)
    return out.astype(np.uint32)


def text_signature(normalised: str | Iterable[str], n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature of already-normalised text, in memory bounded by the slice size."""
    return signature_of_slices(shingle_hash_slices(normalised, n), a, b)


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


def jaccard_of_arrays(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sets given as sorted distinct arrays (as `shingle_hashes` returns them):
    8 bytes per shingle, where a Python set takes several times that."""
    if a.size == 0 and b.size == 0:
        return 1.0
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common)


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """Probability that two documents with Jaccard j share at least one band."""
    return 1 - (1 - j**rows) ** bands
