"""Fetch Hadoop's S3 connector (`s3a://`) for the Hadoop that pyspark ships: hadoop-aws of the same
version and what it needs (the AWS SDK bundle, about 700 MB), resolved by Spark's own resolver and
copied into .tools/s3a-jars.

pyspark's jars carry the Hadoop client but no object-store connector; EMR, Dataproc and Databricks
bring their own. The suite's no-shared-disk test bed (tests/cluster_run.py) and a local run against
an `s3a://` workdir hand these jars to Spark (`spark.extra_jars`, or `--jars` to spark-submit).
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlparse

import pyspark
from fetch_delta_jars import replace_folder  # this folder: the scripts run as files

REPO = Path(__file__).resolve().parents[1]
JARS = REPO / ".tools" / "s3a-jars"


def hadoop_version() -> str:
    """The Hadoop version of pyspark's jars (hadoop-client-api-<version>.jar): hadoop-aws must match it."""
    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    if not jars:
        raise SystemExit("pyspark ships no hadoop-client-api jar: cannot tell which hadoop-aws matches")
    return jars[0].stem.removeprefix("hadoop-client-api-")


def main() -> int:
    from pyspark import SparkConf, SparkContext

    package = f"org.apache.hadoop:hadoop-aws:{hadoop_version()}"
    # Launching the JVM is enough: spark-submit resolves `spark.jars.packages` and hands the jars on in
    # the `spark.jars` property. A SparkContext would then copy every jar (the bundle too) into its
    # local executor's folder through its file server.
    SparkContext._ensure_initialized(conf=SparkConf().set("spark.jars.packages", package))
    jars = SparkContext._jvm.java.lang.System.getProperty("spark.jars")
    resolved = [urlparse(jar).path for jar in jars.split(",")]
    replace_folder(JARS, resolved)  # jars of another Hadoop must not stay on the classpath
    (JARS / "PACKAGE").write_text(package + "\n")
    print(f"{package}: {len(resolved)} jars in {JARS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
