"""Stage `ingest`: Dolma files -> the bronze `documents` table, bad lines -> `quarantine`.

Every input line is accounted for: lines = new documents + quarantined + repeated (source, id).
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from backforth_spark.core import schemas as s
from backforth_spark.core import storage
from backforth_spark.core.config import IngestConfig
from backforth_spark.core.dolma import PARSED_COLUMNS, UNREADABLE_FILE, glob_regex
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.session import default_parallelism
from backforth_spark.spark.tables import arrow_batch_bytes, struct
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


def spread_files(spark: SparkSession, files: list[tuple[str, int]]) -> DataFrame:
    """The (path, size) files' paths, largest first dealt round-robin over partitions (one file each, up
    to four per core), so big files run side by side. Only paths travel: the Python workers stream each
    file themselves (udfs/ingest.open_input), so a file is bounded by neither executor memory nor
    Spark's 2 GB value limit."""
    ordered = [path for path, _ in sorted(files, key=lambda f: -f[1])]
    parts = max(1, min(len(ordered), default_parallelism(spark) * 4))
    hands = spark.createDataFrame(
        [(i % parts, path) for i, path in enumerate(ordered)], "slot long, path string"
    )
    # A range of `parts` numbers in `parts` partitions holds one number each, and a broadcast join keeps
    # that partitioning: partition i gets hand i. All in the JVM: no Python worker and no shuffle
    # before the parse (a Python partitioner took about a second of a small refresh).
    slots = spark.range(0, parts, 1, parts).withColumnRenamed("id", "slot")
    return slots.join(F.broadcast(hands), "slot").select("path")


def other_files(cfg: IngestConfig, inputs: list[str] | tuple[str, ...]) -> int:
    """Files under `inputs` that are not Dolma data by name (`_SUCCESS`, `README`, `.crc`, ...): skipped,
    and counted. Listed with Arrow's filesystems on the driver, which, unlike Spark's reader, also
    see hidden files, and which need no JVM gateway (Spark Connect has none)."""
    dolma = glob_regex(cfg.file_glob)
    return sum(
        not dolma.match(name) for pattern in inputs for name in storage.names_under(pattern, glob_regex)
    )


def unread_files(ctx: StageContext, listing: DataFrame) -> tuple[list, int]:
    """The listed files (input_file, length, modified_ms) not in `input_files` with that size and time,
    and how many files were listed. The folders are listed once: the listing is tagged with whether
    each file is known, and that small table comes back to the driver."""
    listed = listing.select(
        F.col("path").alias("input_file"), "length", F.unix_millis("modificationTime").alias("modified_ms")
    )
    columns = s.names(s.INPUT_FILES_COLUMNS)
    known = ctx.tables.read(s.INPUT_FILES).select(*columns, F.lit(True).alias("_known"))
    rows = listed.join(known, columns, "left").collect()
    return [r for r in rows if not r["_known"]], len(rows)


# Later occurrences of a repeated key, up to this many, are dropped by a broadcast anti-join (about
# 150 bytes each with the file path: 30 MB, which the driver builds and every executor holds); more,
# and the lines are ranked by a shuffle of whole rows, which spills.
BROADCAST_REPEATS = 200_000


def first_occurrences(docs: DataFrame, n_docs: int) -> DataFrame:
    """Each doc_key's first line (by input_file, line_number) among `docs` (`n_docs` rows). Repeats
    are found by shuffling keys and positions alone; the text moves only when repeats are too many to
    broadcast (a whole corpus fed in twice), since ranking whole rows would shuffle every document's
    text."""
    first = Window.partitionBy("doc_key").orderBy("input_file", "line_number")
    positions = docs.select("doc_key", "input_file", "line_number")
    later = positions.withColumn("_rank", F.row_number().over(first)).where("_rank > 1").drop("_rank")
    # repeats are fewer than the lines: only a large input needs them counted (a job of its own)
    if n_docs <= BROADCAST_REPEATS or later.count() <= BROADCAST_REPEATS:
        return docs.join(F.broadcast(later), ["doc_key", "input_file", "line_number"], "left_anti")
    return docs.withColumn("_rank", F.row_number().over(first)).where("_rank = 1").drop("_rank")


def run(ctx: StageContext) -> dict[str, int]:
    """Read the Dolma files not read before into `documents` and `quarantine`, then record them in
    `input_files`; returns the stage counts."""
    spark, cfg = ctx.spark, ctx.cfg
    listing = input_files(spark, cfg.ingest, ctx.inputs)
    with ctx.tables.timed("list files"):
        todo, n_listed = unread_files(ctx, listing)
    skipped = other_files(cfg.ingest, ctx.inputs)
    if not todo:
        # a refresh with nothing new: no Python workers, no empty commits (the tables exist after it)
        for name in (s.DOCUMENTS, s.QUARANTINE, s.INPUT_FILES):
            ctx.tables.ensure(name)
        counts = dict.fromkeys(
            ("rows_in", "rows_out", "lines", "documents", "quarantined", "repeated_ids"), 0
        )
        return {**counts, "files_read": 0, "files_known": n_listed, "skipped_files": skipped}
    todo = [(r["input_file"], r["length"], r["modified_ms"]) for r in todo]
    todo_df = spark.createDataFrame(todo, struct(s.INPUT_FILES_COLUMNS))
    files = spread_files(spark, [(path, size) for path, size, _ in todo])
    # Parsed once, into a staging table that every later step reads: written as the Python workers
    # stream it, so memory follows a batch, not a file or the corpus. (An in-memory cache builds each
    # partition whole on the JVM heap before it can spill: a 622 MB gzip file, one partition, filled
    # a 2 GB heap.)
    # the parsed batches handed back to the JVM are as large as the ones Spark hands Python workers
    batch = arrow_batch_bytes(spark)
    parsed = files.mapInPandas(parse_files(cfg.ingest, batch), PARSED_SCHEMA)
    parsed = ctx.tables.stage("ingest_parsed", parsed)
    lineage = [F.lit(ctx.run_id).alias("run_id"), F.current_timestamp().alias("written_at")]
    quarantine = parsed.where("kind = 'quarantine'").select(*s.names(s.QUARANTINE_COLUMNS), *lineage)
    with ctx.tables.timed("count lines"):
        kinds = parsed.groupBy("kind").agg(F.count("*").alias("n")).collect()
    counts = {r["kind"]: r["n"] for r in kinds}
    with ctx.tables.timed("find repeated keys"):
        docs = first_occurrences(parsed.where("kind = 'doc'"), counts.get("doc", 0))
    docs = docs.select(*s.names(s.DOCUMENTS_COLUMNS), *lineage)
    n_docs_parsed, n_quarantined = counts.get("doc", 0), counts.get("quarantine", 0)
    # the MERGE's own count: right even when a concurrent run inserts into the table too
    new_docs = ctx.tables.merge_insert_new(s.DOCUMENTS, docs, ["doc_key"])
    if n_quarantined:
        ctx.tables.merge_insert_new(s.QUARANTINE, quarantine, ["input_file", "line_number"])
    else:  # every line parsed: no MERGE of nothing (a second of fixed cost on a clean refresh)
        ctx.tables.ensure(s.QUARANTINE)
    # last, once every line is committed: a file is read again unless it is recorded here, and a
    # file that could not be read (whole or in part) is not recorded, so the next run retries it
    unreadable = parsed.where(F.col("reason") == UNREADABLE_FILE).select("input_file")
    read_through = todo_df.join(unreadable, "input_file", "left_anti").select("*", *lineage)
    ctx.tables.merge_insert_new(s.INPUT_FILES, read_through, s.names(s.INPUT_FILES_COLUMNS))
    return {
        "rows_in": n_docs_parsed + n_quarantined,
        "rows_out": new_docs,
        "lines": n_docs_parsed + n_quarantined,
        "documents": new_docs,
        "quarantined": n_quarantined,
        "repeated_ids": n_docs_parsed - new_docs,
        "files_read": len(todo),
        "files_known": n_listed - len(todo),  # read by an earlier run, unchanged since
        "skipped_files": skipped,
    }
