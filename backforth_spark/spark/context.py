"""What every stage receives: the session, the config, the tables, the run id and the run's inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyspark.sql import SparkSession

from backforth_spark.core.config import Config
from backforth_spark.core.engines.engine import Engine
from backforth_spark.core.generation import LLM_TASKS, LLMTask
from backforth_spark.spark.tables import Tables


@dataclass(frozen=True)
class StageContext:
    spark: SparkSession
    cfg: Config
    tables: Tables
    run_id: str
    mlflow_run_id: str | None = None  # the pipeline's MLflow run, recorded in the export's lineage
    inputs: tuple[str, ...] = ()  # Dolma files, folders or globs (ingest)
    # the LLM stages of this pipeline, in order: fingerprints chain through them
    llm_tasks: tuple[LLMTask, ...] = LLM_TASKS
    # replaces the configured engine in the Python workers (failure injection in tests)
    engine_factory: Callable[[], Engine] | None = None
