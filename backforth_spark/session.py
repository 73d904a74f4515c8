"""Build (or reuse) the SparkSession, with Delta Lake configured for local and standalone runs."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from backforth_spark.config import SparkConfig


def get_spark(cfg: SparkConfig) -> SparkSession:
    """The active session if there is one (Databricks, spark-submit), else a new one from `cfg`."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Python workers must run the project's interpreter, not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.app_name)
    # spark-submit's --master wins: a config written for local runs must not pull a submitted job
    # off its cluster
    if cfg.master and _submitted_master() is None:
        builder = builder.master(cfg.master)
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    if cfg.configure_delta:
        from delta import configure_spark_with_delta_pip

        builder = builder.config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension").config(
            "spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog"
        )
        builder = configure_spark_with_delta_pip(builder)
    return builder.getOrCreate()


def _submitted_master() -> str | None:
    """The master spark-submit was given, or None when this process starts its own JVM."""
    # spark-submit starts the JVM first and hands Python its gateway through this variable; only then
    # is there a launcher conf to read (asking otherwise would start a JVM before Delta's jars are set)
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()
    return SparkConf().get("spark.master", None)
