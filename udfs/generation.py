"""Python-worker side of the LLM stages: one engine per worker, whole batches to it.

Engine lifecycle: the first task a Python worker runs for an LLM stage pins the worker to the GPU(s)
Spark assigned that task (`CUDA_VISIBLE_DEVICES`, set before vLLM or torch is imported), then builds
the engine and keeps it in a module-level cache. Spark reuses Python workers across tasks and stages,
so later tasks on that worker reuse the loaded model instead of loading it again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pandas as pd

from backforth_spark.config import LLMConfig
from backforth_spark.engine import Engine
from backforth_spark.generation import StageSpec, run_batch
from backforth_spark.openai_engine import OpenAIEngine
from backforth_spark.vllm_engine import create_vllm_engine

_ENGINES: dict[tuple, Engine] = {}


def assigned_gpus() -> list[str]:
    """The GPU addresses Spark assigned the running task (empty without stage-level scheduling)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    info = ctx.resources().get("gpu") if ctx is not None else None
    return list(info.addresses) if info is not None else []


def pin_gpus(addresses: list[str]) -> str | None:
    """Make only `addresses` visible to CUDA in this worker; returns the device label for the rows.

    A worker that already holds an engine on other devices keeps it: CUDA reads the variable once, at
    initialisation, so it cannot move. Spark hands a reused worker tasks of the same resource profile.
    """
    if not addresses:
        return os.environ.get("CUDA_VISIBLE_DEVICES") or None
    label = ",".join(addresses)
    if not _ENGINES:
        os.environ["CUDA_VISIBLE_DEVICES"] = label
    return os.environ.get("CUDA_VISIBLE_DEVICES", label)


def create_engine(cfg: LLMConfig, model: str, api_key: str | None = None) -> Engine:
    """The engine the config asks for: in-process vLLM, or a client of an OpenAI-compatible server
    (`api_key` is for the latter, resolved on the driver)."""
    if cfg.engine == "openai":
        return OpenAIEngine.from_config(cfg, model, api_key)
    return create_vllm_engine(cfg, model)


def _engine(cfg: LLMConfig, model: str, api_key: str | None) -> Engine:
    # the whole LLM config: any engine option (or key) changing means another engine
    key = (model, cfg.model_dump_json(), api_key)
    if key not in _ENGINES:
        if cfg.cpu_threads and cfg.engine == "vllm":
            # read by OpenMP when torch loads, which happens inside create_engine
            os.environ["OMP_NUM_THREADS"] = str(cfg.cpu_threads)
        _ENGINES[key] = create_engine(cfg, model, api_key)
    return _ENGINES[key]


def generate(
    spec: StageSpec,
    cfg: LLMConfig,
    engine_factory: Callable[[], Engine] | None = None,
    api_key: str | None = None,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The mapInPandas function for one stage. `engine_factory` replaces vLLM (failure injection)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        device = pin_gpus(assigned_gpus())
        engine = engine_factory() if engine_factory else _engine(cfg, spec.model, api_key)
        for batch in batches:
            for start in range(0, len(batch), cfg.batch_size):
                yield run_batch(batch.iloc[start : start + cfg.batch_size], engine, spec, device)

    return run
