"""The export's write: executor-written (Spark writes the shards) against driver-streamed (every row through
the driver's Python, as the export wrote before), on a local workdir and on an S3-compatible store.

    make bench-export PAIRS=100000     # or: .venv/bin/python benchmarks/export.py --pairs 100000

Builds PAIRS synthetic pairs (instructions of about 20 words, responses of about 250, the export's
lineage columns), stages them as a Parquet table, then writes them as the export writes a version
(JSON lines and Parquet shards of `export.shard_rows` rows, 100,000 by default, ordered by passage_id)
four times:
- executor-written: `stages.export.write_dataset` (repartitionByRange, one file a range, the card last);
- driver-streamed (the peer): the rows in order through `toLocalIterator`, each shard built on the
  driver and written through Arrow's filesystem, the card last;
each into a local folder and into a bucket of moto's S3 server (tests/object_store.py; Spark through
the s3a connector, the driver through Arrow's S3 filesystem). Local Spark with conf/local.yaml's
settings on this machine's cores: on a cluster the executor-written side gains the executors' cores
and disks, the driver-streamed one does not.

Prints each write's wall time and rows per second. Last line:
RESULT pairs=... local_executor_s=... local_driver_s=... s3_executor_s=... s3_driver_s=...
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backforth_spark.core import storage  # noqa: E402
from backforth_spark.core.config import load_config  # noqa: E402
from backforth_spark.core.dataset import CARD, shard_count  # noqa: E402
from tests.object_store import BUCKET, ObjectStore  # noqa: E402

WORDS = "the of and to in a is that for it as was with be by on not he this are or".split()  # noqa: SIM905


def pairs_table(spark, n: int, path: str):
    """n pairs with the columns the export's `records` reads, staged as Parquet at `path`."""
    from pyspark.sql import functions as F

    def text(words: int, salt: str):
        # deterministic words from the row id, so every run writes the same bytes
        picks = [F.element_at(F.lit(WORDS), (F.abs(F.hash("id", F.lit(f"{salt}{i}"))) % len(WORDS)) + 1)
                 for i in range(words)]  # fmt: skip
        return F.concat_ws(" ", *picks)

    df = spark.range(n).select(
        F.format_string("p%09d", "id").alias("passage_id"),
        F.format_string("d%09d", "id").alias("doc_key"),
        F.lit("common-crawl").alias("source"),
        F.col("id").cast("string").alias("id"),
        F.lit(5).alias("score"),
        (F.col("id") % 100 / 100.0).alias("source_copy"),
        text(20, "i").alias("instruction"),
        F.concat_ws(" ", *[text(25, f"r{k}") for k in range(10)]).alias("response"),
    )
    df.write.mode("overwrite").parquet(path)
    return spark.read.parquet(path)


def driver_streamed(rows, n_rows: int, out_uri: str, version: str, card: str, cfg) -> None:
    """The peer: every row through the driver, ordered; a shard at a time in both formats, the card last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(out_uri)
    # a local filesystem opens no file in a folder that does not exist (an object store has no folders)
    fs.create_dir(storage.filesystem(storage.join(out_uri, version, "data"))[1], recursive=True)
    shards = shard_count(n_rows, cfg.shard_rows)
    it = rows.orderBy("passage_id").toLocalIterator()
    for i in range(shards):
        batch = []
        for row in it:
            batch.append(row.asDict(recursive=True))
            if len(batch) == cfg.shard_rows:
                break
        stem = storage.join(out_uri, version, "data", f"part-{i:05d}")
        if "jsonl" in cfg.formats:
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch).encode()
            with fs.open_output_stream(storage.filesystem(stem + ".json")[1]) as out:
                out.write(body)
        if "parquet" in cfg.formats:
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(batch), buf)
            with fs.open_output_stream(storage.filesystem(stem + ".parquet")[1]) as out:
                out.write(buf.getvalue())
    storage.write_text(storage.join(out_uri, CARD), card)


def timed(label: str, n: int, write) -> float:
    started = time.perf_counter()
    write()
    wall = time.perf_counter() - started
    print(f"{label:<28} {wall:7.1f} s  {n / wall:8.0f} rows/s")
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=100_000)
    args = p.parse_args()

    from backforth_spark.spark.session import get_spark
    from backforth_spark.spark.stages.export import records, write_dataset

    root = Path(tempfile.mkdtemp(prefix="backforth-bench-export-"))
    store = ObjectStore(root / "moto.log")
    os.environ.update(store.env)  # the driver's Arrow and the JVM's AWS SDK find the store here
    cfg = load_config(REPO / "conf" / "local.yaml", [f"workdir={root / 'work'}"])
    jars = REPO / ".tools" / "s3a-jars"
    if not list(jars.glob("*.jar")):
        print("no s3a jars: run `make setup` (scripts/fetch_s3a_jars.py)", file=sys.stderr)
        return 2
    conf = {**cfg.spark.conf, **store.spark_conf(jars)}
    spark = get_spark(cfg.spark.model_copy(update={"conf": conf, "class_archive": None}))
    try:
        pairs = pairs_table(spark, args.pairs, str(root / "pairs"))
        rows = records(pairs, cfg.export)
        card = "---\nconfigs: []\n---\nbenchmark export\n"
        print(f"{args.pairs} pairs, formats {list(cfg.export.formats)}, {cfg.export.shard_rows} rows a shard")
        figures = {}
        for where, out in (("local", str(root / "export")), ("s3", f"s3a://{BUCKET}/export")):
            figures[f"{where}_executor_s"] = timed(
                f"{where}: executor-written", args.pairs,
                lambda out=out: write_dataset(rows, args.pairs, out + "/executors", "v1", card, cfg.export),
            )  # fmt: skip
            figures[f"{where}_driver_s"] = timed(
                f"{where}: driver-streamed (peer)", args.pairs,
                lambda out=out: driver_streamed(rows, args.pairs, out + "/driver", "v1", card, cfg.export),
            )  # fmt: skip
        files = storage.file_names(f"s3a://{BUCKET}/export/executors/v1/data")
        print(f"s3 executor-written files: {len(files)}")
    finally:
        spark.stop()
        store.stop()
    print("RESULT pairs=" + str(args.pairs) + " " + " ".join(f"{k}={v:.1f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
