"""Commit slices of an LLM stage against targets of growing size: the table work alone.

    make bench-llm-commits    # or: .venv/bin/python benchmarks/llm_commits.py --sizes 10000,100000,1000000

For each target size T, in a process and Spark session of its own (local[2], `conf/local.yaml`, staging
in Delta as on a cluster): a passages table of T + OWED passages (32-hex ids, as the chunker's hashes) and
a backtranslate table holding an `ok` row of the current fingerprint for the first T, written in files of
10,000 rows laid out by passage id (the layout slice MERGEs and `backforth maintain`'s clustering give a
table). Then the backtranslate stage runs with a scripted engine (every prompt answered at once, so the
clock is the table work) and `llm.commit_rows` cutting the OWED rows into slices. Each slice's Spark jobs
carry a tag (`backforth-backtranslate-slice-<k>`); from the event log, per slice: the input records of
every scan (the slice's staged rows, its results, the MERGE's source and the target files it did not
skip) and the span of its jobs; from the table's history, the files each MERGE rewrote. Last line:
RESULT sizes=... rows_read_per_slice=... files_rewritten_per_slice=... seconds_per_slice=... ratio_s=...
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OWED = 20_000
RETRIES = 2_000  # of the owed rows, those with a failed try in the table (the MERGE replaces them)
COMMIT_ROWS = 5_000
ROWS_PER_FILE = 10_000


class InstantEngine:
    """Answers every prompt with one instruction, at once."""

    model = "instant"
    max_model_len = 4096

    def count_prompt_tokens(self, prompts):
        return [32] * len(prompts)

    def chat(self, conversations, params):
        from backforth_spark.core.engines.engine import Completion

        return [Completion("How does this work?", "stop", 32, 6) for _ in conversations]

    def complete(self, prompts, params):
        return self.chat(prompts, params)

    def close(self):
        pass


def _filled(spark, schema, n: int, given: dict):
    """`n` rows of `schema`: the `given` column expressions, every other column a constant of its type."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    constant = {
        T.StringType: F.lit(""), T.LongType: F.lit(0).cast("long"), T.IntegerType: F.lit(0),
        T.DoubleType: F.lit(0.0), T.BooleanType: F.lit(False), T.TimestampType: F.current_timestamp(),
    }  # fmt: skip
    cols = []
    for field in schema.fields:
        expr = given.get(field.name)
        if expr is None:
            expr = constant.get(type(field.dataType), F.lit(None)).cast(field.dataType)
        cols.append(expr.alias(field.name))
    return spark.range(n).select(*cols)


def one_size(target_rows: int, workdir: Path, deletion_vectors: bool = True) -> dict:
    """Build the tables for `target_rows`, run the stage, return its per-slice figures."""
    from pyspark import cloudpickle
    from pyspark.sql import functions as F

    from backforth_spark.core import schemas as s
    from backforth_spark.core.config import load_config
    from backforth_spark.core.generation import BACKTRANSLATE
    from backforth_spark.spark.context import StageContext
    from backforth_spark.spark.session import get_spark
    from backforth_spark.spark.stages import generate
    from backforth_spark.spark.tables import TABLE_PROPERTIES, Tables

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    events = workdir / "events"
    events.mkdir(parents=True)
    cfg = load_config(
        REPO / "conf" / "local.yaml",
        [
            f"workdir={workdir}", "tracking.enabled=false", "tables.staging_format=delta",
            f"llm.commit_rows={COMMIT_ROWS}", "llm.num_partitions=2",
            "spark.conf.spark.eventLog.enabled=true", f"spark.conf.spark.eventLog.dir={events}",
            "spark.conf.spark.eventLog.compress=false",
        ],
    )  # fmt: skip
    spark = get_spark(cfg.spark)
    tables = Tables.from_config(spark, cfg, "bench")
    pid = F.md5(F.col("id").cast("string"))
    passages = _filled(
        spark, tables.schemas[s.PASSAGES], target_rows + OWED,
        {"passage_id": pid, "text": F.lit("A passage that explains how a thing works."),
         "n_tokens": F.lit(12), "status": F.lit("ok")},
    )  # fmt: skip
    passages.write.format("delta").save(tables.location(s.PASSAGES))
    ctx = StageContext(spark, cfg, tables, "bench", engine_factory=InstantEngine)
    fingerprint = generate.current_specs(ctx)[BACKTRANSLATE.name].fingerprint
    failed = F.col("id") >= target_rows  # the retries: passages after the first target_rows
    target = _filled(
        spark, tables.schemas[BACKTRANSLATE.table], target_rows + RETRIES,
        {"passage_id": pid, "fingerprint": F.lit(fingerprint), "attempts": F.lit(1),
         "status": F.when(failed, "engine_error").otherwise("ok"),
         "instruction": F.when(failed, None).otherwise("What is it?"), "run_id": F.lit("seed")},
    )  # fmt: skip
    files = max(1, target_rows // ROWS_PER_FILE)
    # as the pipeline creates its tables (TABLE_PROPERTIES: deletion vectors)
    properties = TABLE_PROPERTIES if deletion_vectors else {"delta.enableDeletionVectors": "false"}
    laid = target.repartitionByRange(files, "passage_id").write.format("delta").options(**properties)
    laid.save(tables.location(BACKTRANSLATE.table))
    version = tables.version(BACKTRANSLATE.table)
    counts = generate.run(ctx, BACKTRANSLATE)
    history = spark.sql(f"DESCRIBE HISTORY {tables.sql_name(BACKTRANSLATE.table)}")
    merges = history.where(f"version > {version} AND operation = 'MERGE'").orderBy("version").collect()
    rewritten = [int(r["operationMetrics"]["numTargetFilesRemoved"]) for r in merges]
    marked = [int(r["operationMetrics"]["numTargetDeletionVectorsAdded"]) for r in merges]
    updated = [int(r["operationMetrics"]["numTargetRowsUpdated"]) for r in merges]
    spark.stop()
    reads, spans = _per_slice(events)
    assert counts["owed"] == OWED and counts["generated"] == OWED, counts
    assert counts["retried_engine_error"] == RETRIES == sum(updated), (counts, updated)
    return {"target_rows": target_rows, "target_files": files, "slices": counts["commits"],
            "rows_read": reads, "seconds": spans, "files_rewritten": rewritten,
            "deletion_vectors": marked}  # fmt: skip


def _per_slice(event_dir: Path) -> tuple[list[int], list[float]]:
    """Per slice tag, in slice order: input records of its scans and the span of its jobs (s). A job
    Delta starts from another thread carries only its query's execution tag: it counts for the slice
    whose tagged jobs share that execution."""
    logs = sorted(f for f in event_dir.rglob("*") if f.is_file())
    events = [json.loads(line) for log in logs for line in log.open() if line.startswith("{")]
    starts = [e for e in events if e["Event"] == "SparkListenerJobStart"]

    def tags(event) -> list[str]:
        return ((event.get("Properties") or {}).get("spark.job.tags") or "").split(",")

    slice_of_execution = {}
    for event in starts:
        found = [t for t in tags(event) if "-backforth-backtranslate-slice-" in t]
        if found:
            k = int(found[0].rsplit("-", 1)[1])
            slice_of_execution.update({t: k for t in tags(event) if "-execution-root-id-" in t})
    slice_of_stage, slice_of_job = {}, {}
    read: dict[int, int] = defaultdict(int)
    start: dict[int, float] = {}
    end: dict[int, float] = {}
    for event in events:
        kind = event["Event"]
        if kind == "SparkListenerJobStart":
            found = [slice_of_execution[t] for t in tags(event) if t in slice_of_execution]
            if found:
                k = found[0]
                slice_of_job[event["Job ID"]] = k
                slice_of_stage.update({stage_id: k for stage_id in event["Stage IDs"]})
                start[k] = min(start.get(k, float("inf")), event["Submission Time"] / 1000)
        elif kind == "SparkListenerJobEnd" and event["Job ID"] in slice_of_job:
            k = slice_of_job[event["Job ID"]]
            end[k] = max(end.get(k, 0.0), event["Completion Time"] / 1000)
        elif kind == "SparkListenerStageCompleted":
            info = event["Stage Info"]
            k = slice_of_stage.get(info["Stage ID"])
            for acc in info.get("Accumulables", []) if k is not None else []:
                if acc.get("Name") == "internal.metrics.input.recordsRead":
                    read[k] += int(acc["Value"])
    order = sorted(start)
    return [read[k] for k in order], [round(end[k] - start[k], 2) for k in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--workdir", default="/tmp/backforth-bench-llm-commits")
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--without-deletion-vectors",
        action="store_true",
        help="the peer: the target without deletion vectors",
    )
    args = parser.parse_args()
    root = Path(args.workdir)
    if args.one_size is not None:
        print(
            json.dumps(one_size(args.one_size, root / str(args.one_size), not args.without_deletion_vectors))
        )
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    results = []
    for size in (int(x) for x in args.sizes.split(",")):
        proc = subprocess.run(
            [sys.executable, __file__, "--one-size", str(size), "--workdir", str(root),
             *(["--without-deletion-vectors"] if args.without_deletion_vectors else [])],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            sys.exit(f"target {size}: {proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"owed {OWED:,} rows ({RETRIES:,} of them retries of a failed row), commit_rows {COMMIT_ROWS:,}; "
          "a scripted engine: no generation cost")  # fmt: skip
    print(f"{'target rows':>12} {'files':>6} {'slices':>6} {'rows read/slice':>16} "
          f"{'files rewritten/slice':>22} {'s/slice':>8}")  # fmt: skip
    medians = []
    for r in results:
        row = (
            statistics.median(r["rows_read"]),
            statistics.median(r["files_rewritten"]) if r["files_rewritten"] else 0,
            statistics.median(r["seconds"]),
        )
        medians.append(row)
        print(f"{r['target_rows']:>12,} {r['target_files']:>6} {r['slices']:>6} {row[0]:>16,.0f} "
              f"{row[1]:>22.1f} {row[2]:>8.2f}   rows read {r['rows_read']}, s {r['seconds']}, "
              f"deletion vectors {r['deletion_vectors']}")  # fmt: skip
    ratio = medians[-1][2] / medians[0][2] if medians[0][2] else float("nan")
    print(
        f"RESULT sizes={args.sizes} rows_read_per_slice={'/'.join(f'{m[0]:.0f}' for m in medians)} "
        f"files_rewritten_per_slice={'/'.join(f'{m[1]:.0f}' for m in medians)} "
        f"seconds_per_slice={'/'.join(f'{m[2]:.2f}' for m in medians)} ratio_s={ratio:.2f}"
    )


if __name__ == "__main__":
    main()
