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

import zlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(61)
SLICE = 4096  # shingles per slice: 4096 x 112 permutations x 8 bytes = 3.7 MB of work space


def _cut(text: str, size: int = 1 << 20) -> Iterator[str]:
    """`text` in pieces of about `size` characters, cut at spaces (a word is never split)."""
    start = 0
    while start < len(text):
        end = text.find(" ", start + size)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def single_spaced(text: str) -> str:
    """`text` with each whitespace run one space and none at either end (`" ".join(text.split())`)."""
    # Printable text holds no whitespace but the space, so normalised text (nearly all of it) passes
    # with two cheap scans; a regex scan of every character was a quarter of shingling.
    if text.isprintable() and "  " not in text and not text.startswith(" ") and not text.endswith(" "):
        return text
    return " ".join(text.split())


def shingle_hash_slices(normalised: str | Iterable[str], n: int, size: int = SLICE) -> Iterator[np.ndarray]:
    """32-bit hashes (CRC-32 of the UTF-8 bytes of the n words joined by single spaces) of the word
    n-grams of already-normalised text (a string, or pieces cut between words as
    `text.normalised_pieces` gives them), in slices of at most `size` (uint64 arrays; a shingle may
    repeat across slices). A text shorter than n words is one shingle."""
    carry = ""  # the last n-1 words of the pieces so far: shingles run across piece boundaries
    short = True  # fewer than n words seen so far
    pieces = _cut(normalised) if isinstance(normalised, str) else normalised
    for piece in pieces:
        piece = single_spaced(piece)  # whatever the caller passed
        if not piece:
            continue
        data = ((carry + " " + piece) if carry else piece).encode()
        # Normalised text is single-spaced, so a shingle is the byte range from the start of its first
        # word to the end of its last: CRC-32 of a memoryview slice, no per-shingle join or encode (3x
        # faster than joining words).
        spaces = np.flatnonzero(np.frombuffer(data, np.uint8) == 32)
        starts = np.concatenate(([0], spaces + 1))
        ends = np.concatenate((spaces, [len(data)]))
        count = starts.size - n + 1
        if count > 0:
            short = False
            view = memoryview(data)
            for lo in range(0, count, size):
                hi = min(lo + size, count)
                bounds = zip(starts[lo:hi].tolist(), ends[lo + n - 1 : hi + n - 1].tolist(), strict=True)
                yield np.fromiter((zlib.crc32(view[a:b]) for a, b in bounds), dtype=np.uint64, count=hi - lo)
            carry = data[starts[count] :].decode() if n > 1 else ""
        else:
            carry = data.decode()
    if short and carry:
        yield np.array([zlib.crc32(carry.encode())], dtype=np.uint64)


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


# Bytes of one block of the shingles x permutations product. Below glibc's 128 KiB mmap threshold a block
# and its temporary come from the heap and stay in cache; above it each one can be a fresh mapping whose
# page faults cost more than the arithmetic (256-shingle blocks signed 2x slower in a fresh process).
_BLOCK_BYTES = 120 * 1024


def signature_of_slices(slices: Iterator[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The MinHash signature of the shingles in `slices`: the running minimum, a block at a time."""
    out = np.full(a.shape[0], 0xFFFFFFFF, dtype=np.uint64)
    rows = max(1, _BLOCK_BYTES // (8 * a.shape[0]))
    for hashes in slices:
        for i in range(0, hashes.size, rows):
            # uint64 products wrap on overflow; that is part of the hash family, as in common MinHash code
            with np.errstate(over="ignore"):
                x = np.outer(hashes[i : i + rows], a)
                x += b
            # x mod (2^61 - 1) without a division: x = q * 2^61 + r gives x = q + r (mod 2^61 - 1), and
            # q + r < 2^61 + 7 needs at most one subtraction, which a minimum picks: x - (2^61 - 1) wraps
            # round to more than x unless x >= 2^61 - 1 (faster than `%` or a masked subtraction)
            high = x >> _SHIFT
            x &= _MERSENNE
            x += high
            np.subtract(x, _MERSENNE, out=high)
            np.minimum(x, high, out=x)
            x &= _MAX32
            np.minimum(out, x.min(axis=0), out=out)
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
