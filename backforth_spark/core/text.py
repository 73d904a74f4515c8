"""Text normalisation and hashing shared by the dedup stages (Python and numpy, no Spark)."""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from collections.abc import Iterator
from functools import cache

import numpy as np


def _is_punctuation(cp: int) -> bool:
    return unicodedata.category(chr(cp))[0] in ("P", "S")  # punctuation or symbol


# str.translate is fast on ASCII text only (it caches the 128 answers); on any other text it looks each
# character up in the table, which made it three quarters of normalising a web page
_ASCII_PUNCT_TO_SPACE = {cp: " " for cp in range(128) if _is_punctuation(cp)}


@cache
def _punctuation_table() -> np.ndarray:
    """True at every Unicode punctuation or symbol code point (1.1 MB, built once per process)."""
    return np.fromiter(map(_is_punctuation, range(sys.maxunicode + 1)), dtype=bool, count=sys.maxunicode + 1)


def _punctuation_to_spaces(text: str) -> str:
    if text.isascii():
        return text.translate(_ASCII_PUNCT_TO_SPACE)
    # one 4-byte code point per character: a table lookup for all of them at once (3x faster)
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).copy()
    points[_punctuation_table()[points]] = ord(" ")
    return points.tobytes().decode("utf-32-le", "surrogatepass")


_SPACES = re.compile(r"\s+")  # the whitespace of str.split() and str.isspace()
# Characters normalised at once. `str.translate` builds its result four bytes a character before
# compacting it, and NFKC and case folding each copy the text: a 50 MB page normalised whole peaked at
# about 400 MB; a piece at a time, at a few MB beyond the pieces kept.
_PIECE = 1 << 20


def _normalise_piece(text: str) -> str:
    text = _punctuation_to_spaces(unicodedata.normalize("NFKC", text).casefold())
    return " ".join(text.split())


def normalised_pieces(text: str, size: int = _PIECE) -> Iterator[str]:
    """`normalise(text)` as non-empty pieces of about `size` characters, cut at whitespace (so no word
    is split): `" ".join(pieces) == normalise(text)`."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            space = _SPACES.search(text, end)
            end = space.start() if space else len(text)
        piece = _normalise_piece(text[start:end])
        if piece:
            yield piece
        start = max(end, start + 1)


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation and symbols dropped, whitespace collapsed to single spaces."""
    return " ".join(normalised_pieces(text))


def stable_hash(*parts: str) -> str:
    """A 128-bit hex digest of the parts, independent of Python's per-process hash seed."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


class NormHashing:
    """`norm_hash` computed over the normalised pieces as they pass, so one normalisation can feed both
    the exact-duplicate hash and the MinHash shingles: iterate `pieces(text)`, then read `hexdigest()`."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)

    def pieces(self, text: str) -> Iterator[str]:
        for i, piece in enumerate(normalised_pieces(text)):
            self._h.update((" " + piece if i else piece).encode("utf-8"))
            yield piece

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(b"\x1f")  # as stable_hash ends each part
        return h.hexdigest()


def norm_hash(text: str) -> str:
    """`stable_hash(normalise(text))`, hashed a piece at a time."""
    hashing = NormHashing()
    for _ in hashing.pieces(text):
        pass
    return hashing.hexdigest()
