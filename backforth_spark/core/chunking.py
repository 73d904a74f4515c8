"""Chunking: a document -> passages that fit the model's context (no Spark; the `chunk` stage runs it).

Lengths are measured in the generation model's tokens. Each document is tokenised once; the character
offsets of its tokens then give the token count of any slice of it, so splitting costs no further
tokenisation. Text is split at paragraph boundaries (blank lines, then single lines, then sentences);
only a single sentence longer than the limit is cut inside, between tokens. A passage is a verbatim
slice of its document. Every document yields at least one row, with a status saying whether it is usable.

Memory stays bounded whatever the document's size: a document longer than `SEGMENT_CHARS` is cut into
segments at its coarsest boundary near each multiple of that size, and each segment is tokenised and
split on its own (a passage never spans two segments), so no more than one segment's token offsets are
held at once.
"""

from __future__ import annotations

import re
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import numpy as np

from backforth_spark.core.config import ChunkConfig
from backforth_spark.core.text import stable_hash

OK = "ok"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"  # dropped by the `drop` policy
OVER_LIMIT = "over_limit"  # beyond max_passages_per_doc
LOW_QUALITY = "low_quality"  # failed a quality filter, named in `quality_filter`
STATUSES = (OK, TOO_SHORT, TOO_LONG, OVER_LIMIT, LOW_QUALITY)

# the quality filters, in the order they are tried (quality_issue)
TOO_FEW_WORDS, SYMBOL_RATIO, DIGIT_RATIO = "too_few_words", "symbol_ratio", "digit_ratio"
REPEATED_LINES, NAVIGATION_LINES = "repeated_lines", "navigation_lines"
QUALITY_FILTERS = (TOO_FEW_WORDS, SYMBOL_RATIO, DIGIT_RATIO, REPEATED_LINES, NAVIGATION_LINES)

# Boundaries tried in order, coarsest first: blank lines, line breaks, sentence ends.
_LEVELS = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"(?<=[.!?])\s+"))


# The start and the end character offset of each token of a text, in order: two lists, not a list of
# (start, end) pairs, since the splitter searches each of them on its own.
TokenOffsets = tuple[Sequence[int], Sequence[int]]


class Tokenizer(Protocol):
    # How many more tokens a slice can have when tokenised alone than the document's tokens that fall in
    # it, at each edge (BPE merges a leading space differently); split passages keep this much headroom.
    edge_tokens: int

    def token_offsets(self, text: str) -> TokenOffsets:
        """The (starts, ends) character offsets of the tokens of `text`."""
        ...

    def token_offsets_batch(self, texts: Sequence[str]) -> list[TokenOffsets]:
        """`token_offsets` of each text, in one call (fast tokenizers amortise their per-call cost)."""
        ...


def offsets_from_byte_lengths(text: str, lengths: np.ndarray) -> TokenOffsets | None:
    """The character offsets of tokens that cover the UTF-8 bytes of `text` end to end, in order,
    `lengths[i]` bytes each (a byte-level BPE tokenizer's tokens do, so their ids alone give their
    offsets); None when the lengths do not add up to the text's bytes. A token that ends inside a
    character is taken to end after it, as tokenizer libraries report it."""
    if lengths.size and lengths.min() <= 0:
        return None
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if ends.size else 0
    starts = ends - lengths
    if text.isascii():  # one byte a character: byte offsets are character offsets
        return (starts.tolist(), ends.tolist()) if total == len(text) else None
    data = np.frombuffer(text.encode(), np.uint8)
    if total != data.size:
        return None
    # the character each byte belongs to: count the bytes that start one (all but 10xxxxxx)
    char = np.cumsum((data & 0xC0) != 0x80) - 1
    return char[starts].tolist(), (char[ends - 1] + 1).tolist()


class _Tokens:
    """Token counts of slices of one document, from its token offsets."""

    def __init__(self, offsets: TokenOffsets) -> None:
        self.starts, self.ends = offsets

    def count(self, a: int, b: int) -> int:
        """Tokens overlapping the characters [a, b)."""
        return max(0, bisect_left(self.starts, b) - bisect_right(self.ends, a))

    def windows(self, a: int, b: int, size: int) -> list[tuple[int, int]]:
        """[a, b) cut between tokens into consecutive slices of at most `size` tokens."""
        first, last = bisect_right(self.ends, a), bisect_left(self.starts, b)
        out = []
        for i in range(first, last, size):
            lo = max(a, self.starts[i])
            hi = min(b, self.ends[min(i + size, last) - 1])
            if hi > lo:
                out.append((lo, hi))
        return out


@dataclass(frozen=True)
class Passage:
    index: int
    text: str | None
    n_tokens: int | None
    status: str
    truncated: bool = False
    quality_filter: str | None = None


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


Unit = tuple[int, int, int]  # start, end, tokens


def _units(text: str, tokens: _Tokens, limit: int) -> list[Unit]:
    """Split the text into (start, end, tokens) units each within `limit`, coarsest boundary first."""
    return _split(text, tokens, limit, *_strip(text, 0, len(text)), 0)


# A module function, not a closure over the text: a recursive closure is a reference cycle, which would
# keep each segment's text and token offsets alive until the cyclic collector ran (hundreds of MB on a
# 50 MB page).
def _split(text: str, tokens: _Tokens, limit: int, a: int, b: int, level: int) -> list[Unit]:
    if level == len(_LEVELS):
        return [(lo, hi, tokens.count(lo, hi)) for lo, hi in tokens.windows(a, b, limit)]
    cuts = [(m.start(), m.end()) for m in _LEVELS[level].finditer(text, a, b)]
    bounds = [a, *(x for cut in cuts for x in cut), b]
    parts = [_strip(text, lo, hi) for lo, hi in zip(bounds[::2], bounds[1::2], strict=True)]
    parts = [(lo, hi) for lo, hi in parts if hi > lo]
    if len(parts) <= 1:
        return _split(text, tokens, limit, a, b, level + 1)
    out: list[Unit] = []
    for lo, hi in parts:
        n = tokens.count(lo, hi)
        out.extend([(lo, hi, n)] if n <= limit else _split(text, tokens, limit, lo, hi, level + 1))
    return out


def _pack(units: list[Unit], tokens: _Tokens, limit: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Greedily extend a passage over consecutive units while it stays within `limit` tokens. With
    `overlap`, a passage starts with the last units of the previous one, up to that many tokens."""
    passages: list[tuple[int, int]] = []
    current: list[Unit] = []
    for unit in units:
        if current and tokens.count(current[0][0], unit[1]) <= limit:
            current.append(unit)
            continue
        if current:
            passages.append((current[0][0], current[-1][1]))
        carried: list[Unit] = []
        for prev in reversed(current if overlap else []):
            if tokens.count(prev[0], current[-1][1]) > overlap:
                break
            carried.insert(0, prev)
        fits = carried and tokens.count(carried[0][0], unit[1]) <= limit
        current = [*carried, unit] if fits else [unit]
    if current:
        passages.append((current[0][0], current[-1][1]))
    return passages


_SYMBOL = re.compile(r"[^\w\s]")
_DIGIT = re.compile(r"\d")
_NAV_WORDS = re.compile(
    r"^(home|menu|login|log in|sign in|sign up|register|search|contact( us)?|about( us)?|next|previous|"
    r"back to top|share|tweet|skip to (main )?content|privacy policy|terms( of use)?|cookies?)$",
    re.IGNORECASE,
)


def _looks_like_navigation(line: str) -> bool:
    line = line.strip()
    return (
        bool(_NAV_WORDS.match(line)) or line.count("|") >= 2 or line.count("»") >= 1 or line.count(" > ") >= 2
    )


@cache
def _character_classes() -> tuple[np.ndarray, np.ndarray]:
    """Flags at every code point: (a symbol, a digit), as `_SYMBOL` and `_DIGIT` match them (built once
    per process, 2.2 MB): counting by table lookup is three times faster than collecting regex matches."""
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    tables = []
    for pattern in (_SYMBOL, _DIGIT):
        table = np.zeros(sys.maxunicode + 1, dtype=bool)
        table[[m.start() for m in pattern.finditer(every)]] = True
        tables.append(table)
    return tables[0], tables[1]


def symbol_and_digit_counts(text: str) -> tuple[int, int]:
    r"""How many characters of `text` are symbols (`[^\w\s]`) and digits (`\d`)."""
    symbol, digit = _character_classes()
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return int(np.count_nonzero(symbol[points])), int(np.count_nonzero(digit[points]))


def quality_issue(text: str, cfg: ChunkConfig) -> str | None:
    """The name of the first quality filter `text` fails, or None. Disabled filters are None in cfg."""
    if cfg.min_words is not None and len(text.split()) < cfg.min_words:
        return TOO_FEW_WORDS
    chars = max(len(text), 1)
    symbols, digits = symbol_and_digit_counts(text)
    if cfg.max_symbol_ratio is not None and symbols / chars > cfg.max_symbol_ratio:
        return SYMBOL_RATIO
    if cfg.max_digit_ratio is not None and digits / chars > cfg.max_digit_ratio:
        return DIGIT_RATIO
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and cfg.max_repeated_line_ratio is not None:
        repeated = len(lines) - len(set(lines))
        if repeated / len(lines) > cfg.max_repeated_line_ratio:
            return REPEATED_LINES
    if lines and cfg.max_navigation_line_ratio is not None:
        nav = sum(_looks_like_navigation(ln) for ln in lines)
        if nav / len(lines) > cfg.max_navigation_line_ratio:
            return NAVIGATION_LINES
    return None


# Characters tokenised at once: a 200 KB segment is about 50k tokens of offsets (a few MB in Python).
SEGMENT_CHARS = 200_000
_ANY_SPACE = re.compile(r"\s+")


def segments(text: str, size: int = SEGMENT_CHARS) -> list[tuple[int, int]]:
    """[start, end) slices covering `text`, each at most `size` characters, cut at the coarsest boundary
    (blank line, line break, sentence end, any space) found in the last quarter of each slice."""
    out, a = [], 0
    while len(text) - a > size:
        lo, hi = a + size * 3 // 4, a + size
        cut = hi
        for level in (*_LEVELS, _ANY_SPACE):
            last = None
            for last in level.finditer(text, lo, hi):  # noqa: B007 (the last match is the cut)
                pass
            if last is not None:
                cut = last.end()
                break
        out.append((a, cut))
        a = cut
    out.append((a, len(text)))
    return out


def _segment_spans(
    text: str,
    a: int,
    b: int,
    tokenizer: Tokenizer,
    cfg: ChunkConfig,
    whole: bool,
    offsets: TokenOffsets | None = None,
) -> tuple[list[tuple[int, int, int]], int]:
    """(passage spans with their token counts, the segment's tokens) of text[a:b], offsets in `text`.
    A `whole` document within `chunk.max_tokens` is one passage. `offsets`: the segment's token
    offsets, when already known."""
    piece = text[a:b]
    tokens = _Tokens(tokenizer.token_offsets(piece) if offsets is None else offsets)
    total = len(tokens.starts)
    if whole and total <= cfg.max_tokens:
        lo, hi = _strip(piece, 0, len(piece))
        spans = [(lo, hi)]
    else:
        limit = max(1, cfg.max_tokens - 2 * tokenizer.edge_tokens)
        spans = _pack(_units(piece, tokens, limit), tokens, limit, cfg.overlap_tokens)
    return [(a + lo, a + hi, tokens.count(lo, hi)) for lo, hi in spans], total


def chunk_document(
    text: str, tokenizer: Tokenizer, cfg: ChunkConfig, token_offsets: TokenOffsets | None = None
) -> list[Passage]:
    """Split one document into passages according to `cfg`; never returns an empty list.
    `n_tokens` counts the document's own tokens that fall in the passage. `token_offsets`: the text's
    token offsets, when already known (only for a text of one segment)."""
    parts = segments(text)
    if token_offsets is not None and len(parts) > 1:
        raise ValueError("token_offsets can be given only for a text of one segment")
    spans: list[tuple[int, int, int]] = []
    total = 0
    for a, b in parts:
        found, n = _segment_spans(text, a, b, tokenizer, cfg, len(parts) == 1, token_offsets)
        spans += found
        total += n
        if cfg.too_long == "truncate" and spans and total > cfg.max_tokens:
            break  # only the first passage is kept: the rest need no tokenising
    truncated = False
    if total > cfg.max_tokens:
        if cfg.too_long == "drop":
            return [Passage(0, None, total, TOO_LONG)]
        if cfg.too_long == "truncate":
            spans, truncated = spans[:1], True
    out: list[Passage] = []
    for i, (a, b, n) in enumerate(spans):
        piece = text[a:b]
        if cfg.max_passages_per_doc is not None and i >= cfg.max_passages_per_doc:
            out.append(Passage(i, None, n, OVER_LIMIT))
        elif n < cfg.min_tokens:
            out.append(Passage(i, piece, n, TOO_SHORT, truncated))
        elif issue := quality_issue(piece, cfg):
            out.append(Passage(i, piece, n, LOW_QUALITY, truncated, issue))
        else:
            out.append(Passage(i, piece, n, OK, truncated))
    return out


# Documents tokenised per batch call: enough to amortise the call, few enough that their token offsets
# (about 1,000 Python tuples per 5 KB page) stay a few MB
TOKENISE_BATCH = 64


def chunk_texts(texts: Sequence[str], tokenizer: Tokenizer, cfg: ChunkConfig) -> Iterator[list[Passage]]:
    """`chunk_document` of each text, in order; texts of one segment are tokenised a batch at a time."""
    for i in range(0, len(texts), TOKENISE_BATCH):
        batch = texts[i : i + TOKENISE_BATCH]
        single = [t for t in batch if len(t) <= SEGMENT_CHARS]
        known = iter(tokenizer.token_offsets_batch(single))
        for text in batch:
            yield chunk_document(text, tokenizer, cfg, next(known) if len(text) <= SEGMENT_CHARS else None)


def passage_id(doc_key: str, index: int) -> str:
    return stable_hash(doc_key, str(index))
