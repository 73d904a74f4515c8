"""Stage `chunk`: representative documents -> `passages` that fit the model's context.

Lengths are measured in the generation model's tokens. Text is split at paragraph boundaries
(blank lines, then single lines, then sentences); only a single sentence longer than the limit is
cut inside. Every document yields at least one row, with a status saying whether it is usable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from backforth_spark.config import ChunkConfig
from backforth_spark.context import StageContext
from backforth_spark.text import stable_hash

OK = "ok"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"  # dropped by the `drop` policy
OVER_LIMIT = "over_limit"  # beyond max_passages_per_doc
LOW_QUALITY = "low_quality"  # failed a quality filter, named in `quality_filter`

_BLANK_LINES = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class TokenCounter(Protocol):
    def count(self, texts: Sequence[str]) -> list[int]: ...

    def windows(self, text: str, size: int) -> list[str]:
        """`text` cut into consecutive pieces of at most `size` tokens."""
        ...


@dataclass(frozen=True)
class Passage:
    index: int
    text: str | None
    n_tokens: int | None
    status: str
    truncated: bool = False
    quality_filter: str | None = None


def _units(text: str, counter: TokenCounter, max_tokens: int) -> list[tuple[str, int, str]]:
    """Split into (piece, tokens, joiner) units each within max_tokens, coarsest boundary first."""
    levels = [(_BLANK_LINES, "\n\n"), (re.compile(r"\n"), "\n"), (_SENTENCE_END, " ")]

    def split(piece: str, level: int) -> list[tuple[str, str]]:
        if level == len(levels):
            return [(w, " ") for w in counter.windows(piece, max_tokens)]
        pattern, joiner = levels[level]
        parts = [p.strip() for p in pattern.split(piece) if p.strip()]
        if len(parts) <= 1:
            return split(piece, level + 1)
        out: list[tuple[str, str]] = []
        for part, n in zip(parts, counter.count(parts), strict=True):
            out.extend([(part, joiner)] if n <= max_tokens else split(part, level + 1))
        return out

    pieces = split(text.strip(), 0)
    counts = counter.count([p for p, _ in pieces])
    return [(p, n, j) for (p, j), n in zip(pieces, counts, strict=True)]


def _pack(units: list[tuple[str, int, str]], max_tokens: int, overlap: int = 0) -> list[str]:
    """Greedily join consecutive units while the estimated length stays within max_tokens. With
    `overlap`, a passage starts with the last units of the previous one, up to that many tokens."""
    passages: list[str] = []
    current: list[tuple[str, int, str]] = []
    size = 0
    for unit in units:
        n = unit[1]
        # a joiner costs at most one token
        if current and size + 1 + n <= max_tokens:
            current.append(unit)
            size += 1 + n
            continue
        if current:
            passages.append(_join(current))
        carried: list[tuple[str, int, str]] = []
        carried_size = 0
        for prev in reversed(current if overlap else []):
            if carried_size + prev[1] + 1 > overlap:
                break
            carried.insert(0, prev)
            carried_size += prev[1] + 1
        if carried and carried_size + n <= max_tokens:
            current, size = [*carried, unit], carried_size + n
        else:
            current, size = [unit], n
    if current:
        passages.append(_join(current))
    return passages


def _join(units: list[tuple[str, int, str]]) -> str:
    text = units[0][0]
    for piece, _, joiner in units[1:]:
        text += joiner + piece
    return text


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


def quality_issue(text: str, cfg: ChunkConfig) -> str | None:
    """The name of the first quality filter `text` fails, or None. Disabled filters are None in cfg."""
    if cfg.min_words is not None and len(text.split()) < cfg.min_words:
        return "too_few_words"
    chars = max(len(text), 1)
    if cfg.max_symbol_ratio is not None and len(_SYMBOL.findall(text)) / chars > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if cfg.max_digit_ratio is not None and len(_DIGIT.findall(text)) / chars > cfg.max_digit_ratio:
        return "digit_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and cfg.max_repeated_line_ratio is not None:
        repeated = len(lines) - len(set(lines))
        if repeated / len(lines) > cfg.max_repeated_line_ratio:
            return "repeated_lines"
    if lines and cfg.max_navigation_line_ratio is not None:
        nav = sum(_looks_like_navigation(ln) for ln in lines)
        if nav / len(lines) > cfg.max_navigation_line_ratio:
            return "navigation_lines"
    return None


def chunk_document(text: str, counter: TokenCounter, cfg: ChunkConfig) -> list[Passage]:
    """Split one document into passages according to `cfg`; never returns an empty list."""
    total = counter.count([text])[0]
    if total <= cfg.max_tokens:
        pieces, truncated = [text.strip()], False
    elif cfg.too_long == "drop":
        return [Passage(0, None, total, TOO_LONG)]
    else:
        pieces = _pack(_units(text, counter, cfg.max_tokens), cfg.max_tokens, cfg.overlap_tokens)
        truncated = cfg.too_long == "truncate"
        if truncated:
            pieces = pieces[:1]
    counts = counter.count(pieces)
    out: list[Passage] = []
    for i, (piece, n) in enumerate(zip(pieces, counts, strict=True)):
        if cfg.max_passages_per_doc is not None and i >= cfg.max_passages_per_doc:
            out.append(Passage(i, None, n, OVER_LIMIT))
        elif n < cfg.min_tokens:
            out.append(Passage(i, piece, n, TOO_SHORT, truncated))
        elif issue := quality_issue(piece, cfg):
            out.append(Passage(i, piece, n, LOW_QUALITY, truncated, issue))
        else:
            out.append(Passage(i, piece, n, OK, truncated))
    return out


def passage_id(doc_key: str, index: int) -> str:
    return stable_hash(doc_key, str(index))


# ---- Spark glue ---------------------------------------------------------------------------------


def run(ctx: StageContext) -> dict[str, int]:
    """Chunk representatives that have no passages yet."""
    from pyspark.sql import functions as F

    from backforth_spark import tables as t
    from backforth_spark.model import resolve_model
    from udfs.chunking import CHUNK_SCHEMA, chunk_documents

    docs = ctx.tables.read(t.DOCUMENTS)
    reps = ctx.tables.read(t.DEDUP).where("is_representative").select("doc_key")
    done = ctx.tables.read(t.PASSAGES).select("doc_key").distinct()
    todo = docs.join(reps, "doc_key").join(done, "doc_key", "left_anti").select("doc_key", "text")
    model = resolve_model(ctx.cfg.llm)
    chunks = todo.mapInPandas(chunk_documents(model, ctx.cfg.chunk), CHUNK_SCHEMA).select(
        *CHUNK_SCHEMA.fieldNames(),
        F.lit(ctx.run_id).alias("run_id"),
        F.current_timestamp().alias("written_at"),
    )
    staged = ctx.tables.stage(t.PASSAGES, chunks)
    ctx.tables.merge_insert_new(t.PASSAGES, staged, ["passage_id"])
    by_status = {r["status"]: r["count"] for r in staged.groupBy("status").count().collect()}
    by_filter = staged.where(F.col("status") == LOW_QUALITY).groupBy("quality_filter").count().collect()
    return {
        "rows_in": staged.select("doc_key").distinct().count(),
        "rows_out": by_status.get(OK, 0),
        **{f"passages_{status}": n for status, n in sorted(by_status.items())},
        **{f"filtered_{r['quality_filter']}": r["count"] for r in sorted(by_filter, key=lambda r: r[0])},
    }
