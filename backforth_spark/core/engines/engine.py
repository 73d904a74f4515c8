"""The engine protocol and its types: chat conversations (or raw prompts) in, completions out.

Two engines implement it: `vllm_engine.VLLMEngine` (vLLM in-process) and `openai_engine.OpenAIEngine`
(any OpenAI-compatible server). The factory that picks one lives where engines are built, in the
Python workers (udfs/generation.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

Conversation = list[dict[str, str]]
Prompt = Conversation | str  # a chat conversation, or raw text sent without the chat template


class FatalEngineError(RuntimeError):
    """A failure no row of the stage can get past (e.g. the server refused the API key): the stage stops
    at once and marks no row, instead of recording the same error on every row."""


@dataclass(frozen=True)
class GenerationParams:
    temperature: float
    top_p: float
    max_tokens: int
    # at most one structured-output constraint, used when the engine supports it
    regex: str | None = None
    json_schema: str | None = None  # a JSON schema, as JSON text (hashable, stable in the fingerprint)
    choice: tuple[str, ...] | None = None
    # penalties against loops and stop strings; left out of the JSON while at their defaults, so adding
    # them kept every fingerprint made before
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()

    def as_json(self) -> str:
        """The parameters as stable JSON text: part of the fingerprint and of every generated row."""
        data = dataclasses.asdict(self)
        for name in _OPTIONAL:
            if data[name] == _DEFAULTS[name]:
                del data[name]
        return json.dumps(data, sort_keys=True)


_OPTIONAL = ("repetition_penalty", "frequency_penalty", "presence_penalty", "stop")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationParams) if f.name in _OPTIONAL}
_DEFAULTS["stop"] = []  # asdict turns the tuple into a list


@dataclass(frozen=True)
class Completion:
    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None = None  # set when the engine failed on this conversation


def per_conversation(params: GenerationParams | Sequence[GenerationParams], n: int) -> list[GenerationParams]:
    """`params` as one entry per conversation."""
    return [params] * n if isinstance(params, GenerationParams) else list(params)


class Engine(Protocol):
    model: str
    max_model_len: int

    def count_prompt_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        """Tokens of each prompt as the model sees it: a conversation after the chat template,
        generation prompt included; raw text as the tokenizer encodes it."""
        ...

    def chat(
        self, conversations: Sequence[Conversation], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[Completion]:
        """One completion per conversation, in order; `params` for all, or one per conversation (the
        output budget follows each input). May raise; callers isolate failures."""
        ...

    def complete(
        self, prompts: Sequence[str], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[Completion]:
        """As `chat`, for raw prompts sent without the chat template (completion templates)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a loaded model, GPU memory, connections)."""
        ...


def count_tokens(tokenizer, prompts: Sequence[Prompt]) -> list[int]:
    """Tokens of each prompt: a conversation after the model's chat template, generation prompt
    included; raw text with the special tokens the engine adds to it (a BOS, for many models)."""
    counts = []
    for conv in prompts:
        if isinstance(conv, str):
            counts.append(len(tokenizer(conv)["input_ids"]))
            continue
        out = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        # recent transformers return a BatchEncoding here, whose len() is its number of keys
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        counts.append(len(ids))
    return counts
