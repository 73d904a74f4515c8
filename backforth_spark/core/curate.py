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
TASK_TALK = "task_talk"
# in the order they are checked; a response is counted under the first it fails
CHECKS = (SHORT, TASK_TALK, REPEATS, DEGENERATE, WEB_RESIDUE, UNSUPPORTED, LINKS, AIMED_AT_MODELS)

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

# Talk about the rewriting task instead of an answer, in the response's opening sentence:
# - a preamble: "Here is the rewritten response:", "Sure! Below is a revised version of the answer:";
# - the response describing itself with the task's words: "This response will be rewritten using the
#   same words as the original text", "My answer adheres to the requested format";
# - the input turned into the output: "The original text has been reworked into a response ...".
# A sentence with only one side is an answer: "The original text was revised by Congress", "In version 3
# the API was revised", "The answer depends on the version".
_TASK_VERB = r"(?:re-?written|re-?worked|revised|rephrased|paraphrased|reworded)"
# a preamble's adjectives: the task's verbs and the praise a model gives its own output
_PREAMBLE_ADJECTIVE = rf"(?:{_TASK_VERB}|polished|refined|improved|edited|updated|final)"
_OUTPUT_NOUN = r"(?:response|answer|version|rewrite|text|passage|draft)"
_PREAMBLE = re.compile(
    rf"^\W*(?:(?:sure|certainly|of course|okay|ok|absolutely)\b\W*)?"
    rf"(?:here\s+(?:is|are)|here['’]s|below\s+(?:is|are)|the\s+following\s+(?:is|are))\s+"
    rf"(?:\w+\s+){{0,3}}?{_PREAMBLE_ADJECTIVE}\s+(?:\w+\s+)?{_OUTPUT_NOUN}\b",
    re.IGNORECASE,
)
_SELF_DESCRIPTION = re.compile(
    rf"\b(?:this|my|the)\s+(?:response|answer|rewrite)\b.*?(?:\b{_TASK_VERB}\b|\badheres?\s+to\b|"
    r"\brequested\s+format\b|\b(?:original|given|provided|source)\s+(?:text|passage)\b)",
    re.IGNORECASE,
)
_INPUT_TURNED_INTO_OUTPUT = re.compile(
    rf"\b(?:original|given|provided|source)\s+(?:text|passage|content)\s+(?:has\s+been|have\s+been|was|"
    rf"is|will\s+be)\s+(?:\w+\s+)?(?:{_TASK_VERB}|turned|transformed|converted|adapted)\s+(?:into|as)\b",
    re.IGNORECASE,
)
# - the draft named by the prompt's words: "The original response contains sentences that could be
#   combined" (skipped when the instruction speaks of an original: a manuscript's, a law's);
# - the response describing what it will hold: "This response will only include the requested
#   information" (skipped when the instruction names that noun: "the immune response");
# - a plan in the first person: "I will rephrase the original text", "I have rewritten it below";
# - the text improved as a task: "The original text was reworked to make it more concise", "This is a
#   rewritten version of the original text".
_NAMES_THE_DRAFT = re.compile(r"\b(?:the|this|your)\s+original\s+(?:response|answer|draft|reply)\b", re.I)
_DESCRIBES_ITSELF = re.compile(
    r"^\W*(?:this|my)\s+(response|answer|rewrite)\s+(?:will|shall|contains|includes|has\s+been|"
    r"is\s+(?:a|an|my)\s+(?:\w+\s+)?(?:version|continuation|copy|rewrite))\b",
    re.IGNORECASE,
)
_THIS_IS_A_REWRITE = re.compile(
    rf"^\W*this\s+is\s+(?:a|an|the|my)\s+(?:\w+\s+)?{_TASK_VERB}\s+{_OUTPUT_NOUN}\b", re.IGNORECASE
)
_FIRST_PERSON_PLAN = re.compile(
    rf"\bI(?:'ll|’ll|\s+will|'ve|’ve|\s+have|\s+am\s+going\s+to)\s+(?:\w+\s+)?"
    rf"(?:{_TASK_VERB}|re-?write|re-?work|revise|rephrase|paraphrase|reword)\b",
    re.IGNORECASE,
)
_IMPROVED_AS_A_TASK = re.compile(
    rf"\b(?:original|given|provided|source)\s+(?:text|passage|content)\s+(?:has\s+been|was|is)\s+"
    rf"{_TASK_VERB}\s+to\s+make\s+it\s+(?:more\s+)?(?:concise|clear|clearer|readable|professional|shorter|"
    rf"polished|engaging|coherent)\b",
    re.IGNORECASE,
)
# ... and a note about the draft after the answer ("Note: I kept the original text's steps.")
_NOTE_ON_THE_TASK = re.compile(
    r"^\W*notes?\s*:[^\n]*\b(?:re-?writ\w*|revis\w*|rephras\w*|original\s+(?:text|passage)|draft)",
    re.IGNORECASE | re.MULTILINE,
)
# an instruction that asks for a rewrite makes such talk its subject
_ASKS_FOR_A_REWRITE = re.compile(r"\b(?:re-?writ|revis|rephras|paraphras|reword|edit|draft)", re.I)
# a sentence ends at . ! ? before a space, or at a line break
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
# what a link inside code is: an example the answer shows (`[text](https://...)`), not a pointer
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
# an instruction about links, URLs or markup: links are then its subject
_ABOUT_LINKS = re.compile(
    r"\b(?:links?|hyperlinks?|urls?|web\s*address(?:es)?|markdown|html|href|anchor\s+tags?)\b", re.IGNORECASE
)


def talks_about_the_task(response: str, instruction: str = "") -> bool:
    """Whether the response opens by describing the rewriting task (its first sentence; a plan in the
    first person in its first two), or adds a note about it."""
    sentences = _SENTENCE_END.split(response.lstrip(), maxsplit=2)
    first, opening = sentences[0], " ".join(sentences[:2])
    itself = _DESCRIBES_ITSELF.search(first)
    return bool(
        _PREAMBLE.search(response[:200])
        or _SELF_DESCRIPTION.search(first)
        or _INPUT_TURNED_INTO_OUTPUT.search(first)
        or _IMPROVED_AS_A_TASK.search(first)
        or _THIS_IS_A_REWRITE.search(first)
        or (_NAMES_THE_DRAFT.search(first) and not re.search(r"\boriginal\b", instruction, re.I))
        or (itself and not re.search(rf"\b{itself.group(1)}\b", instruction, re.I))
        or _FIRST_PERSON_PLAN.search(opening)
        or _NOTE_ON_THE_TASK.search(response)
    )


def unrequested_link(instruction: str, response: str) -> bool:
    """A link the user did not ask about: outside code, in an answer to an instruction that neither has
    a link nor is about links or markup."""
    if _LINK.search(instruction) or _ABOUT_LINKS.search(instruction):
        return False
    return bool(_LINK.search(_CODE.sub(" ", response)))


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
    if (
        cfg.drop_task_talk
        and talks_about_the_task(response, instruction)
        and not _ASKS_FOR_A_REWRITE.search(instruction)
    ):
        return TASK_TALK
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
    if cfg.drop_unrequested_links and unrequested_link(instruction, response):
        return LINKS
    if (
        cfg.drop_text_aimed_at_models
        and _AIMED_AT_MODELS.search(response)
        and not _AIMED_AT_MODELS.search(instruction)
    ):
        return AIMED_AT_MODELS
    return None
