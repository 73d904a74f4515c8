"""Curation policies applied at export: which generated pairs make it into the dataset.

Pure Python on strings; `export` applies them in Spark and counts what each one removed. The score
threshold itself applies earlier (only kept pairs are rewritten); its removals are counted at export too.
Every gate is model-agnostic: it reads the response, its passage and its instruction, nothing else.
"""

from __future__ import annotations

import re

from backforth_spark.core.chunking import quality_issue
from backforth_spark.core.config import ChunkConfig, CurateConfig
from backforth_spark.core.text import normalise

SHORT = "short_response"
REPEATS = "repeats_instruction"
DEGENERATE = "degenerate_repetition"
WEB_RESIDUE = "web_residue"
UNSUPPORTED = "unsupported_additions"
LINKS = "unrequested_links"
AIMED_AT_MODELS = "text_aimed_at_models"
# in the order they are checked; a response is counted under the first it fails
CHECKS = (SHORT, REPEATS, DEGENERATE, WEB_RESIDUE, UNSUPPORTED, LINKS, AIMED_AT_MODELS)

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# numbers of two digits or more (a single digit is mostly a list marker or a small count) and
# capitalised words in mid-sentence (after a lower-case word or a comma: names, not sentence starts)
_NUMBER = re.compile(r"\b\d{2,}(?:[.,:]\d+)*")
_CAPITALISED = re.compile(r"(?<=[a-z,;] )[A-Z][a-z]+(?: [A-Z][a-z]+)*")
_LINK = re.compile(r"\b(?:https?://|www\.)\S+|\b[\w-]+\.(?:com|net|org|io|ru|cn|info|biz)\b", re.IGNORECASE)
_AIMED_AT_MODELS = re.compile(
    r"\b(?:ignore|disregard|forget)\s+(?:all\s+|any\s+)?(?:the\s+)?(?:previous|prior|above|earlier)\s+"
    r"(?:instructions?|prompts?|rules)|\b(?:you\s+are\s+now|act\s+as)\s+(?:an?\s+)?(?:AI|assistant|language\s+model|"
    r"chatbot|DAN)\b|\b(?:system\s+prompt|as\s+an\s+AI\s+language\s+model)\b|"
    r"\b(?:give|assign|rate|score)\s+(?:this|it)\s+(?:a\s+)?(?:score|rating|grade)\s+of\b|"
    # a line that grades the text itself, as a judge's output would ("Score: 5", "Rating: 5/5")
    r"^\s*(?:score|rating|grade)\s*[:=]\s*[1-5](?:\s*/\s*5)?\s*$",
    re.IGNORECASE | re.MULTILINE,
)


def word_trigrams(text: str) -> list[tuple[str, str, str]]:
    words = [w.lower() for w in _WORD.findall(text)]
    return list(zip(words, words[1:], words[2:], strict=False))


def unique_trigram_share(text: str) -> float:
    """Distinct word trigrams over all of them (1.0 for text too short to have any)."""
    grams = word_trigrams(text)
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_line_share(text: str) -> float:
    """The share of non-empty lines (paragraphs, for single-line text: sentences) that repeat one before."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        lines = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def source_copy_rate(response: str, passage: str) -> float:
    """The share of the response's word trigrams found in the passage (the paper asks for rewrites that
    stay close to the source text)."""
    grams = word_trigrams(response)
    if not grams:
        return 0.0
    source = set(word_trigrams(passage))
    return sum(g in source for g in grams) / len(grams)


def unsupported(response: str, sources: str) -> tuple[int, int]:
    """(unsupported, candidates): numbers and capitalised words or names of the response, and how many of
    them occur nowhere in the sources."""
    seen = sources.lower()
    found = _NUMBER.findall(response) + [m.group(0) for m in _CAPITALISED.finditer(response)]
    return sum(item.lower() not in seen for item in found), len(found)


def response_issue(instruction: str, response: str, cfg: CurateConfig, passage: str = "") -> str | None:
    """The first check a rewritten response fails, or None."""
    if len(response.split()) < cfg.min_response_words:
        return SHORT
    answer = set(normalise(response).split())
    asked = set(normalise(instruction).split())
    if answer and len(answer & asked) / len(answer) >= cfg.max_instruction_overlap:
        return REPEATS
    if (
        cfg.max_repeated_line_share is not None
        and repeated_line_share(response) > cfg.max_repeated_line_share
    ) or (
        cfg.min_unique_trigram_share is not None
        and unique_trigram_share(response) < cfg.min_unique_trigram_share
    ):
        return DEGENERATE
    residue = ChunkConfig(
        max_symbol_ratio=cfg.max_symbol_ratio,
        max_digit_ratio=cfg.max_digit_ratio,
        max_navigation_line_ratio=cfg.max_navigation_line_ratio,
        min_tokens=0,
    )
    if quality_issue(response, residue) is not None:
        return WEB_RESIDUE
    if cfg.max_unsupported_share is not None:
        new, total = unsupported(response, f"{passage}\n{instruction}")
        if new >= cfg.min_unsupported and new / total > cfg.max_unsupported_share:
            return UNSUPPORTED
    if cfg.drop_unrequested_links and _LINK.search(response) and not _LINK.search(instruction):
        return LINKS
    if (
        cfg.drop_text_aimed_at_models
        and _AIMED_AT_MODELS.search(response)
        and not _AIMED_AT_MODELS.search(instruction)
    ):
        return AIMED_AT_MODELS
    return None
