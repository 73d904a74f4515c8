"""Stage `ingest`: Dolma files -> the bronze `documents` table, bad lines -> `quarantine`.

Every input line is accounted for: lines = new documents + quarantined + repeated (source, id).
"""

from __future__ import annotations

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from backforth_spark import schemas as s
from backforth_spark.config import IngestConfig
from backforth_spark.context import StageContext
from backforth_spark.dolma import PARSED_COLUMNS, glob_regex
from udfs.ingest import parse_files

PARSED_SCHEMA = T.StructType(
    [
        T.StructField(c, T.LongType() if c == "line_number" else T.StringType(), c != "kind")
        for c in PARSED_COLUMNS
    ]
)


def input_files(spark: SparkSession, cfg: IngestConfig, inputs: list[str] | tuple[str, ...]) -> DataFrame:
    """The Dolma files under `inputs` (files, folders searched recursively, globs) as a binaryFile
    DataFrame (path, modificationTime, length, content; content is read only if selected)."""
    if not inputs:
        raise ValueError("ingest needs at least one input path or glob (--input)")
    return (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", cfg.file_glob)
        .load(list(inputs))
    )


def spread_files(spark: SparkSession, listing: DataFrame) -> DataFrame:
    """The listed files' paths, largest first dealt round-robin over partitions (one file each, up to
    four per core), so big files run side by side. Only the listing is read here: the Python workers
    stream each file themselves (udfs/ingest.open_input), so a file is bounded by neither executor
    memory nor Spark's 2 GB value limit."""
    files = sorted(((r["path"], r["length"]) for r in listing.select("path", "length").collect()),
                   key=lambda f: -f[1])  # fmt: skip
    parts = max(1, min(len(files), spark.sparkContext.defaultParallelism * 4))
    dealt = spark.sparkContext.parallelize(list(enumerate(f[0] for f in files)), parts)
    dealt = dealt.partitionBy(parts, lambda i: i % parts).map(lambda kv: (kv[1],))
    return spark.createDataFrame(dealt, "path string")


def other_files(spark: SparkSession, cfg: IngestConfig, inputs: list[str] | tuple[str, ...]) -> int:
    """Files under `inputs` that are not Dolma data by name (`_SUCCESS`, `README`, `.crc`, ...): skipped,
    and counted. Listed with Hadoop's FileSystem, which, unlike Spark's reader, also sees hidden files."""
    jvm, conf = spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()
    dolma = glob_regex(cfg.file_glob)
    checksummed = jvm.java.lang.Class.forName("org.apache.hadoop.fs.ChecksumFileSystem")
    skipped = 0
    for pattern in inputs:
        path = jvm.org.apache.hadoop.fs.Path(pattern)
        fs = path.getFileSystem(conf)
        if checksummed.isInstance(fs):
            fs = fs.getRawFileSystem()  # the checksumming wrapper (local files) hides .crc files
        for status in fs.globStatus(path) or []:
            files = fs.listFiles(status.getPath(), True)
            while files.hasNext():
                skipped += not dolma.match(files.next().getPath().getName())
    return skipped


def run(ctx: StageContext) -> dict[str, int]:
    """Read Dolma files into `documents` and `quarantine`; returns the stage counts."""
    spark, cfg = ctx.spark, ctx.cfg
    files = spread_files(spark, input_files(spark, cfg.ingest, ctx.inputs))
    parsed = files.mapInPandas(parse_files(cfg.ingest), PARSED_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        lineage = [F.lit(ctx.run_id).alias("run_id"), F.current_timestamp().alias("written_at")]
        first = Window.partitionBy("doc_key").orderBy("input_file", "line_number")
        docs = (
            parsed.where("kind = 'doc'")
            .withColumn("_rank", F.row_number().over(first))
            .where("_rank = 1")
            .select(*s.names(s.DOCUMENTS_COLUMNS), *lineage)
        )
        quarantine = parsed.where("kind = 'quarantine'").select(*s.names(s.QUARANTINE_COLUMNS), *lineage)
        with ctx.tables.timed("read and parse"):
            kinds = parsed.groupBy("kind").agg(F.count("*").alias("n")).collect()
        counts = {r["kind"]: r["n"] for r in kinds}
        n_docs_parsed, n_quarantined = counts.get("doc", 0), counts.get("quarantine", 0)
        # the MERGE's own count: right even when a concurrent run inserts into the table too
        new_docs = ctx.tables.merge_insert_new(s.DOCUMENTS, docs, ["doc_key"])
        ctx.tables.merge_insert_new(s.QUARANTINE, quarantine, ["input_file", "line_number"])
    finally:
        parsed.unpersist()
    return {
        "rows_in": n_docs_parsed + n_quarantined,
        "rows_out": new_docs,
        "lines": n_docs_parsed + n_quarantined,
        "documents": new_docs,
        "quarantined": n_quarantined,
        "repeated_ids": n_docs_parsed - new_docs,
        "skipped_files": other_files(spark, cfg.ingest, ctx.inputs),
    }
