"""Text normalisation and hashing shared by the dedup stages (pure Python)."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_SPACE = re.compile(r"\s+")


def _is_punct_or_symbol(ch: str) -> bool:
    return unicodedata.category(ch)[0] in ("P", "S")


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation and symbols dropped, whitespace collapsed to single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if _is_punct_or_symbol(ch) else ch for ch in text)
    return _SPACE.sub(" ", text).strip()


def stable_hash(*parts: str) -> str:
    """A 128-bit hex digest of the parts, independent of Python's per-process hash seed."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()


def norm_hash(text: str) -> str:
    return stable_hash(normalise(text))
