"""What every stage receives: the session, the config, the tables and the run id."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import SparkSession

from backforth_spark.config import Config
from backforth_spark.tables import Tables


@dataclass(frozen=True)
class StageContext:
    spark: SparkSession
    cfg: Config
    tables: Tables
    run_id: str
    mlflow_run_id: str | None = None  # the pipeline's MLflow run, recorded in the export's lineage
