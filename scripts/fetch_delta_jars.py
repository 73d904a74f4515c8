"""Fetch the Delta Lake jars: start a local Delta session once, then copy what Spark resolved into
.tools/delta-jars (conf/local.yaml's spark.delta_jars), so later sessions skip the resolver.

Spark's resolver looks in ~/.m2 first, then its Ivy cache, then Maven Central. If its own download
fails while Maven works, `mvn dependency:get` fills ~/.m2 and Spark resolves from there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import pyspark

JARS = ".tools/delta-jars"  # conf/local.yaml's spark.delta_jars, relative to the repository


def start_session() -> None:
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.master("local[1]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
    )
    spark = configure_spark_with_delta_pip(builder).getOrCreate()
    spark.range(1).count()
    resolved = [urlparse(jar).path for jar in spark.sparkContext.getConf().get("spark.jars").split(",")]
    spark.stop()
    folder = Path(__file__).resolve().parents[1] / JARS
    replace_folder(folder, resolved)
    print(f"{len(resolved)} jars in {folder}")


def replace_folder(folder: Path, jars: list[str]) -> None:
    """`folder` holding exactly `jars` (copied): built beside it, then swapped in, so jars of an older
    pin never stay on the classpath and an interrupted fetch leaves no half folder."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for jar in jars:
        shutil.copy2(jar, partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def main() -> int:
    if "--no-fallback" in sys.argv:
        start_session()
        return 0
    try:
        start_session()
        return 0
    except Exception as exc:
        print(f"Spark could not resolve the Delta jars ({exc}); trying Maven", file=sys.stderr)
    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    artifact = f"io.delta:delta-spark_{spark_minor}_2.13:{version('delta-spark')}"
    subprocess.run(["mvn", "-q", "-B", "dependency:get", f"-Dartifact={artifact}"], check=True)
    # The failed JVM cannot be reused: try again in a fresh process.
    return subprocess.run([sys.executable, __file__, "--no-fallback"], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
