"""Text normalisation and hashing shared by the dedup stages (pure Python)."""

from __future__ import annotations

import hashlib
import sys
import unicodedata
from functools import cache


@cache
def _punct_to_space() -> dict[int, str]:
    """A str.translate table mapping every Unicode punctuation or symbol code point to a space."""
    return {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] in ("P", "S")}


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation and symbols dropped, whitespace collapsed to single spaces."""
    # translate runs in C; a per-character Python test was the slowest step of dedup
    text = unicodedata.normalize("NFKC", text).casefold().translate(_punct_to_space())
    return " ".join(text.split())


def stable_hash(*parts: str) -> str:
    """A 128-bit hex digest of the parts, independent of Python's per-process hash seed."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


def norm_hash(text: str) -> str:
    return stable_hash(normalise(text))
