"""Prompt templates (YAML files in backforth_spark/core/prompts/) and the parsers of model output.

Pure Python: rendering and parsing are tested without Spark or a model. Parsers never raise on
model output; they return a `Parsed` with a status and, when it is not `ok`, a reason.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from backforth_spark.core.text import stable_hash

OK = "ok"
PARSE_ERROR = "parse_error"
EMPTY = "empty"
REFUSED = "refused"


CHAT, COMPLETION = "chat", "completion"
# A placeholder no stage provides: each rendering fills it with a random marker (a fresh one per prompt,
# found in none of the inserted text), so text from the web cannot close or imitate the lines that
# fence it in.
FENCE = "fence"


def new_fence(values: Iterable[str]) -> str:
    """A marker line for one prompt that occurs in none of `values`."""
    while True:
        marker = f"<<<{secrets.token_hex(8)}>>>"
        if not any(marker[3:-3] in v for v in values):
            return marker


@dataclass(frozen=True)
class Template:
    """A prompt. `chat` (the default): system and user messages, sent through the model's chat template.
    `completion`: `user` is the whole raw prompt, sent as is (a base or backward model fine-tuned on its
    own prompt format, as the paper's backtranslation model was)."""

    name: str
    user: str
    system: str | None = None
    structured_regex: str | None = None
    fields: frozenset[str] = field(default_factory=frozenset)
    kind: str = CHAT

    @property
    def hash(self) -> str:
        # the kind joins the hash only when not chat: every chat template keeps the hash it had
        kind = () if self.kind == CHAT else (self.kind,)
        return stable_hash(*kind, self.system or "", self.user, self.structured_regex or "")[:16]

    @property
    def data_fields(self) -> frozenset[str]:
        """The placeholders the stage's inputs fill (the fence is drawn at rendering)."""
        return self.fields - {FENCE}

    def render(self, **values: str) -> list[dict[str, str]] | str:
        """Chat messages (or, for a completion template, the prompt text) for one example. Values are
        inserted verbatim (braces in them are safe); a `{fence}` not given is drawn for this prompt."""
        if FENCE in self.fields and FENCE not in values:
            values = {**values, FENCE: new_fence(values.values())}
        missing = self.fields - values.keys()
        if missing:
            raise KeyError(f"template {self.name} needs {sorted(missing)}")
        if self.kind == COMPLETION:
            return self.user.format_map(values)
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system.format_map(values)})
        messages.append({"role": "user", "content": self.user.format_map(values)})
        return messages


def template_source(name_or_path: str) -> tuple[str, str]:
    """(name, YAML text) of a template given by name (a file in backforth_spark/core/prompts/) or by path.
    Built-in templates are read as package resources, so they load from a zip or wheel (--py-files) too."""
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"no prompt template file {name_or_path!r}")
        return path.stem, path.read_text()
    builtin = resources.files("backforth_spark.core") / "prompts"
    resource = builtin / f"{name_or_path}.yaml"
    if not resource.is_file():
        known = sorted(r.name.removesuffix(".yaml") for r in builtin.iterdir() if r.name.endswith(".yaml"))
        raise FileNotFoundError(f"no prompt template {name_or_path!r}; known: {known}")
    return name_or_path, resource.read_text()


def load_template(name_or_path: str) -> Template:
    """A template by name (a file in backforth_spark/core/prompts/) or by path to a YAML file."""
    name, text = template_source(name_or_path)
    data = yaml.safe_load(text)
    kind = data.get("kind", CHAT)
    if kind not in (CHAT, COMPLETION):
        raise ValueError(f"template {name!r}: kind must be {CHAT!r} or {COMPLETION!r}, not {kind!r}")
    if kind == COMPLETION and ("prompt" not in data or "user" in data or "system" in data):
        raise ValueError(f"template {name!r}: a completion template has a `prompt` and no messages")
    if kind == CHAT and "user" not in data:
        raise ValueError(f"template {name!r}: a chat template needs a `user` message")
    body = data["prompt"] if kind == COMPLETION else data["user"]
    fields = set()
    for part in (data.get("system"), body):
        if part:
            fields |= {f for _, f, _, _ in string.Formatter().parse(part) if f}
    return Template(
        name=name,
        user=body,
        system=data.get("system"),
        structured_regex=data.get("structured_regex"),
        fields=frozenset(fields),
        kind=kind,
    )


@dataclass(frozen=True)
class Parsed:
    status: str
    value: str | None = None
    score: int | None = None
    error: str | None = None


_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:user(?:'s)? )?(?:instruction|question|request|query|prompt)\s*:\s*(?:\*\*)?\s*",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|i apologi[sz]e|i can(?:'|no)t (?:help|assist|provide|do)|"
    r"i am unable|i'm unable|as an ai(?: language model)?, i (?:can(?:'|no)t|am unable))",
    re.IGNORECASE,
)


def parse_instruction(raw: str | None, finish_reason: str | None) -> Parsed:
    """The first paragraph of the output, without labels or quotes."""
    if raw is None or not raw.strip():
        return Parsed(EMPTY, error="the model returned no text")
    text = raw.strip()
    first, _, rest = text.partition("\n\n")
    if finish_reason == "length" and not rest:
        return Parsed(PARSE_ERROR, error="output hit max_tokens before the instruction ended")
    value = _LABEL.sub("", first).strip().strip('"').strip("\u201c\u201d").strip()
    if not value:
        return Parsed(EMPTY, error="only a label, no instruction")
    if _REFUSAL.match(value):
        return Parsed(REFUSED, value=value, error="the model refused")
    return Parsed(OK, value=value)


_SCORE = re.compile(r"score\s*[:=]\s*\**\s*([1-5])\b", re.IGNORECASE)
_REASON = re.compile(r"reason\s*:\s*(.+)", re.IGNORECASE)


def parse_score(raw: str | None) -> Parsed:
    """The last `Score: N` (N in 1..5) in the output; `value` holds the stated reason if any."""
    if raw is None or not raw.strip():
        return Parsed(EMPTY, error="the judge returned no text")
    matches = _SCORE.findall(raw)
    if not matches:
        return Parsed(PARSE_ERROR, error="no 'Score: N' line with N in 1..5")
    reason = _REASON.search(raw)
    return Parsed(OK, value=reason.group(1).strip() if reason else None, score=int(matches[-1]))


# The judge's output under structured outputs in "json" mode: a short reason, then the grade.
SCORE_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "maxLength": 200},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["reason", "score"],
    "additionalProperties": False,
}
SCORE_CHOICES = ("1", "2", "3", "4", "5")


def parse_score_json(raw: str | None) -> Parsed:
    """A JSON object {"reason": ..., "score": 1..5}, as the "json" structured mode produces. An engine
    that could not constrain decoding may answer as the prompt asks instead: `Score: N` is accepted too."""
    if raw is None or not raw.strip():
        return Parsed(EMPTY, error="the judge returned no text")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        text = parse_score(raw)
        if text.status == OK:
            return text
        return Parsed(PARSE_ERROR, error=f"neither JSON ({exc.msg} at char {exc.pos}) nor a 'Score: N' line")
    score = data.get("score") if isinstance(data, dict) else None
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
        return Parsed(PARSE_ERROR, error="no integer 'score' in 1..5")
    reason = data.get("reason")
    return Parsed(OK, value=reason.strip() if isinstance(reason, str) else None, score=score)


def parse_score_choice(raw: str | None) -> Parsed:
    """A bare grade "1".."5", as the "choice" structured mode produces; falls back to `Score: N`."""
    if raw is None or not raw.strip():
        return Parsed(EMPTY, error="the judge returned no text")
    if raw.strip() in SCORE_CHOICES:
        return Parsed(OK, score=int(raw.strip()))
    return parse_score(raw)


_OPEN, _CLOSE = "[RES]", "[/RES]"


def parse_rewrite(raw: str | None, min_chars: int = 1) -> Parsed:
    """The text between the first [RES] and the last [/RES]: a faithful rewrite of a passage that itself
    contains tag text (a page about this very format) keeps that text whole."""
    if raw is None or not raw.strip():
        return Parsed(EMPTY, error="the model returned no text")
    upper = raw.upper()
    start, end = upper.find(_OPEN), upper.rfind(_CLOSE)
    if start < 0 or end < start + len(_OPEN):
        why = "[RES] opened but never closed" if start >= 0 else "no [RES]...[/RES] block"
        return Parsed(PARSE_ERROR, error=why)
    value = raw[start + len(_OPEN) : end].strip()
    if len(value) < min_chars:
        return Parsed(EMPTY, error="the [RES] block is empty")
    if _REFUSAL.match(value):
        return Parsed(REFUSED, value=value, error="the model refused")
    return Parsed(OK, value=value)


def parse_answer(raw: str | None) -> Parsed:
    """A free-text answer (the distillation baseline): the whole output, unless empty or a refusal."""
    if raw is None or not raw.strip():
        return Parsed(EMPTY, error="the model returned no text")
    value = raw.strip()
    if _REFUSAL.match(value):
        return Parsed(REFUSED, value=value, error="the model refused")
    return Parsed(OK, value=value)
