"""Curation policies applied at export: which generated pairs make it into the dataset.

Pure Python on strings; `export` applies them in Spark and counts what each one removed. The score
threshold itself applies earlier (only kept pairs are rewritten); its removals are counted at export too.
"""

from __future__ import annotations

from backforth_spark.config import CurateConfig
from backforth_spark.text import normalise

SHORT = "short_response"
REPEATS = "repeats_instruction"


def response_issue(instruction: str, response: str, cfg: CurateConfig) -> str | None:
    """The first check a rewritten response fails, or None: too few words, or mostly the instruction's
    own words (the model echoed the request instead of answering it)."""
    if len(response.split()) < cfg.min_response_words:
        return SHORT
    answer = set(normalise(response).split())
    asked = set(normalise(instruction).split())
    if answer and len(answer & asked) / len(answer) >= cfg.max_instruction_overlap:
        return REPEATS
    return None
