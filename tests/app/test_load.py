"""Memory follows the partition, not the corpus: a corpus with more text than the JVM's whole heap runs
through ingest, dedup and chunk; and a run that does run out of memory ends in one line naming the
stage, what ran out and the setting to raise, with its staging dropped.

Each test is a CLI run of its own (a JVM with the small heap it names), as a user runs it."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from backforth_spark.core.config import load_config
from tests.conftest import LOCAL_CONF, cli
from tests.load_corpus import build_long_documents

JAVA_OPTIONS = load_config(LOCAL_CONF).spark.conf["spark.driver.extraJavaOptions"]
# A heap far below Spark's default: Spark refuses less than 1.5x its reserved 300 MB unless told to
# reserve less (spark.testing.reservedMemory, as Spark's own tests do).
SMALL_HEAP_MB = 320
SMALL_HEAP = (
    f"spark.conf.spark.driver.memory={SMALL_HEAP_MB}m",
    f"spark.conf.spark.testing.reservedMemory={64 * 2**20}",
    # the serial collector: G1's 1 MB regions on a heap this small fragment under multi-MB buffers
    f"spark.conf.spark.driver.extraJavaOptions={JAVA_OPTIONS} -XX:+UseSerialGC",
)
# What a task holds follows the buffer sizes the config gives Spark; sized for that heap here, as a
# cluster config sizes them for its executors: a Parquet row group (which a writer buffers and a reader
# decodes a batch of) of 8 MB.
SIZED_FOR_IT = (f"spark.conf.spark.hadoop.parquet.block.size={8 * 2**20}",)
# The load corpus: documents of about 1.3 MB (books and long papers are), 10% exact copies, in several
# files and one big one; chunking keeps one passage of each (its first segment is all it tokenises)
LOAD_DOCS, LOAD_CHARS = 270, 1_300_000


def _run(workdir: Path, inputs: Path, stages: str, *settings: str):
    summary = workdir / "summary.json"
    proc = cli(
        "run", "--config", str(LOCAL_CONF), "--stages", stages, "--input", str(inputs),
        "--workdir", str(workdir), "--set", "tracking.enabled=false", "--summary-json", str(summary),
        *[x for s in settings for x in ("--set", s)],
        timeout=900,
    )  # fmt: skip
    return proc, (json.loads(summary.read_text()) if summary.exists() else None)


def test_a_corpus_with_more_text_than_the_heap_runs_through_ingest_dedup_and_chunk(tmp_path):
    planted = build_long_documents(LOAD_DOCS, LOAD_CHARS, tmp_path / "in")
    # a stage that held the corpus's text (or a file's: the big one has 40%) could not fit the heap
    assert planted["text_chars"] > SMALL_HEAP_MB * 2**20
    proc, summary = _run(
        tmp_path / "work", tmp_path / "in", "ingest,dedup,chunk", *SMALL_HEAP, *SIZED_FOR_IT,
        "chunk.too_long=truncate",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ingest, dedup, chunk = (summary["stages"][name] for name in ("ingest", "dedup", "chunk"))
    assert ingest["documents"] == LOAD_DOCS and ingest["quarantined"] == 0
    assert dedup["rows_in"] == LOAD_DOCS and dedup["exact_duplicates"] == planted["exact"]
    assert chunk["rows_in"] == dedup["rows_out"] == LOAD_DOCS - planted["exact"]


def _one_long_document(folder: Path, chars: int) -> Path:
    """A gzip'd Dolma file of one document of `chars` characters (a few KB on disk)."""
    folder.mkdir(parents=True)
    words = ("lorem ipsum dolor sit amet consectetur " * (chars // 39 + 1))[:chars]
    doc = {"id": "long", "source": "test", "text": words}
    (folder / "long.jsonl.gz").write_bytes(gzip.compress((json.dumps(doc) + "\n").encode()))
    return folder


def _says_what_ran_out(proc, stage: str, what: str, setting: str) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "py4j" not in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    assert line.startswith(f"error: stage {stage} failed: ran out of memory: "), line
    assert what in line and f"{setting}=" in line and f"--set spark.conf.{setting}=" in line, line
    return line


def test_a_jvm_out_of_heap_ends_in_one_line_naming_the_stage_and_the_heap(tmp_path):
    # a 200 MB document: the JVM holds it several times over (Arrow batch, row, Parquet page)
    inputs = _one_long_document(tmp_path / "in", 200 * 2**20)
    proc, summary = _run(
        tmp_path / "work", inputs, "ingest", *SMALL_HEAP, f"ingest.max_line_bytes={256 * 2**20}"
    )
    line = _says_what_ran_out(proc, "ingest", "JVM heap", "spark.driver.memory")
    assert f"spark.driver.memory={SMALL_HEAP_MB}m" in line
    assert summary["failed_stage"] == "ingest" and summary["error"] in line
    assert not (tmp_path / "work" / "tables" / "_staging" / summary["run_id"]).exists()


def test_a_python_worker_out_of_memory_ends_in_one_line_naming_the_stage_and_the_worker(tmp_path):
    # the worker holds the line's bytes, its text and the parsed document: more than its limit allows
    inputs = _one_long_document(tmp_path / "in", 200 * 2**20)
    proc, summary = _run(
        tmp_path / "work", inputs, "ingest",
        "spark.conf.spark.executor.pyspark.memory=900m", f"ingest.max_line_bytes={256 * 2**20}",
    )  # fmt: skip
    line = _says_what_ran_out(proc, "ingest", "Python worker", "spark.executor.pyspark.memory")
    assert "spark.executor.pyspark.memory=900m" in line
    assert not (tmp_path / "work" / "tables" / "_staging" / summary["run_id"]).exists()
