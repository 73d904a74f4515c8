"""Build (or reuse) the SparkSession, with Delta Lake configured for local and standalone runs."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from backforth_spark.config import SparkConfig

log = logging.getLogger(__name__)

DRIVER_JAVA_OPTIONS = "spark.driver.extraJavaOptions"


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
    conf = dict(cfg.conf)
    if cfg.class_archive and _launches_jvm():
        conf[DRIVER_JAVA_OPTIONS] = with_class_archive(conf.get(DRIVER_JAVA_OPTIONS, ""), cfg.class_archive)
    for key, value in conf.items():
        builder = builder.config(key, value)
    if cfg.configure_delta:
        builder = builder.config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension").config(
            "spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog"
        )
        if cfg.delta_jars and _launches_jvm():
            own = [jar for jar in cfg.conf.get("spark.jars", "").split(",") if jar]
            builder = builder.config("spark.jars", ",".join([*delta_jar_files(cfg.delta_jars), *own]))
        else:
            # imported here: a runtime that ships Delta (configure_delta false) needs no delta-spark wheel
            from delta import configure_spark_with_delta_pip

            builder = configure_spark_with_delta_pip(builder)
    return builder.getOrCreate()


def delta_jar_files(folder: str) -> list[str]:
    """The jars in `folder` (spark.delta_jars), or a ValueError that says how to fill it."""
    jars = sorted(str(p.resolve()) for p in Path(os.path.expanduser(folder)).glob("*.jar"))
    if not jars:
        raise ValueError(
            f"spark.delta_jars={folder!r} holds no jars: run `make setup` (scripts/fetch_delta_jars.py "
            "fills it) or set spark.delta_jars=null to resolve them from Maven at start"
        )
    return jars


def with_class_archive(java_options: str, archive: str) -> str:
    """`java_options` plus the flag that maps the class-data archive `archive` (spark.class_archive);
    unchanged, with a warning, when the file is missing (the JVM then loads its classes itself)."""
    path = Path(os.path.expanduser(archive)).resolve()
    if not path.is_file():
        log.warning(
            "no JVM class archive at %s (`make setup` builds it): Spark starts a few seconds slower", path
        )
        return java_options
    return f"{java_options} -XX:SharedArchiveFile={path}".strip()


def _launches_jvm() -> bool:
    """True when this process starts its own JVM; False under spark-submit, whose flags gave the jars."""
    return "PYSPARK_GATEWAY_PORT" not in os.environ


def _submitted_master() -> str | None:
    """The master spark-submit was given, or None when this process starts its own JVM."""
    # spark-submit starts the JVM first and hands Python its gateway through this variable; only then
    # is there a launcher conf to read (asking otherwise would start a JVM before Delta's jars are set)
    if _launches_jvm():
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()
    return SparkConf().get("spark.master", None)
