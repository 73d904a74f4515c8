"""Python-worker side of the LLM stages: one engine per worker, whole batches to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pandas as pd

from backforth_spark.config import LLMConfig
from backforth_spark.engine import Engine, create_vllm_engine
from backforth_spark.generate import StageSpec, run_batch

# Engines live as long as the Python worker (Spark reuses workers across tasks and stages), so
# the model loads once per worker, not once per task.
_ENGINES: dict[tuple, Engine] = {}


def _engine(cfg: LLMConfig, model: str) -> Engine:
    key = (model, cfg.dtype, cfg.max_model_len, cfg.tensor_parallel_size, cfg.gpu_memory_utilization)
    if key not in _ENGINES:
        _ENGINES[key] = create_vllm_engine(cfg, model)
    return _ENGINES[key]


def generate(
    spec: StageSpec, cfg: LLMConfig, engine_factory: Callable[[], Engine] | None = None
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The mapInPandas function for one stage. `engine_factory` replaces vLLM (failure injection)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        engine = engine_factory() if engine_factory else _engine(cfg, spec.model)
        for batch in batches:
            for start in range(0, len(batch), cfg.batch_size):
                yield run_batch(batch.iloc[start : start + cfg.batch_size], engine, spec)

    return run
