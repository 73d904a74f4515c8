"""Make the Delta Lake jars resolvable offline-first: start a local Delta session once.

Spark's resolver looks in ~/.m2 first, then its Ivy cache, then Maven Central. If its own download
fails while Maven works, `mvn dependency:get` fills ~/.m2 and Spark resolves from there.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pyspark


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
    spark.stop()


def main() -> int:
    try:
        start_session()
        return 0
    except Exception as exc:
        print(f"Spark could not resolve the Delta jars ({exc}); trying Maven", file=sys.stderr)
    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    artifact = f"io.delta:delta-spark_{spark_minor}_2.13:{version('delta-spark')}"
    subprocess.run(["mvn", "-q", "-B", "dependency:get", f"-Dartifact={artifact}"], check=True)
    # A new JVM is needed after a failed start; run ourselves again in a fresh process.
    return subprocess.run([sys.executable, "-c", "import fetch_delta_jars as f; f.start_session()"],
                          cwd=__file__.rsplit("/", 1)[0], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
