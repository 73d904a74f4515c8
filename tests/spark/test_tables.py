"""Catalog-based tables (Unity Catalog on Databricks; Spark's session catalog here): the same stages, the
same contracts, with tables named `catalog.schema.table` instead of paths."""

import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from pyspark import cloudpickle
from pyspark.sql import Row
from pyspark.sql import types as T
from pyspark.testing import assertDataFrameEqual

from backforth_spark.app.status import status
from backforth_spark.core import schemas as t
from backforth_spark.core.config import load_config
from backforth_spark.spark import tables
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.stages import chunk, dedup, ingest
from tests.conftest import DOC_COLUMNS, DOLMA_SAMPLE, LOCAL_CONF
from tests.spark.test_generate import INSTRUCTIONS, ScriptedEngine, run_stage

# _waits_for_a_rival runs in Spark's Python workers, which cannot import tests/: shipped by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_path_and_catalog_locations(spark, tmp_path):
    paths = tables.Tables(spark, tmp_path / "tables")
    assert paths.location(t.PASSAGES) == str(tmp_path / "tables" / "passages")
    assert paths.dataset_source(t.PASSAGES) == {"path": str(tmp_path / "tables" / "passages")}
    named = tables.Tables(spark, tmp_path / "tables", catalog_schema="main.backforth")
    assert named.location(t.PASSAGES) == "main.backforth.passages"
    assert named.dataset_source(t.PASSAGES) == {"delta_table_name": "main.backforth.passages"}


@pytest.mark.parametrize("staging_format", ["delta", "parquet"])
def test_a_staged_result_reads_back_its_rows_and_an_overwrite_replaces_them(spark, tmp_path, staging_format):
    scratch = tables.Tables(spark, tmp_path / "tables", "r1", staging_format=staging_format)
    pairs = "src string, dst string, similarity double"
    first = scratch.stage("pairs", spark.createDataFrame([("a", "b", 0.9), ("a", "c", None)], pairs))
    expected = [Row(src="a", dst="b", similarity=0.9), Row(src="a", dst="c", similarity=None)]
    assertDataFrameEqual(first, expected)
    again = scratch.stage("pairs", spark.createDataFrame([("x", "y", 0.5)], pairs))
    assertDataFrameEqual(again, [Row(src="x", dst="y", similarity=0.5)])
    empty = scratch.stage("none", spark.createDataFrame([], pairs))
    assert empty.count() == 0 and empty.columns == ["src", "dst", "similarity"]
    assert [phase for phase, _ in scratch.phase_log] == ["stage pairs", "stage pairs", "stage none"]
    is_delta = (tmp_path / "tables" / "_staging" / "r1" / "pairs" / "_delta_log").is_dir()
    assert is_delta == (staging_format == "delta")
    scratch.drop_staging()
    assert not (tmp_path / "tables" / "_staging" / "r1").exists()


def test_stages_run_on_catalog_tables(spark, tmp_path):
    schema = f"bf_{uuid.uuid4().hex[:8]}"
    spark.sql(f"CREATE SCHEMA spark_catalog.{schema} LOCATION '{tmp_path / 'warehouse'}'")
    cfg = load_config(
        LOCAL_CONF,
        [
            f"workdir={tmp_path / 'work'}",
            f"tables.catalog_schema=spark_catalog.{schema}",
            "tables.staging_format=delta",
            "chunk.max_passages_per_doc=1",
        ],
    )
    catalog = tables.Tables.from_config(spark, cfg, "run-1")
    ctx = StageContext(spark, cfg, catalog, "run-1", inputs=(str(DOLMA_SAMPLE),))

    assert ingest.run(ctx)["rows_out"] == 10
    assert ingest.run(replace(ctx))["rows_out"] == 0  # a rerun adds nothing
    dedup.run(ctx)
    n_passages = chunk.run(ctx)["rows_out"]
    bt = run_stage(ctx, "backtranslate", lambda: ScriptedEngine(reply="How do I do it?"))
    assert bt["generated"] == n_passages == 10

    # the tables are catalog tables, nothing was written by path under the workdir
    for name in (t.DOCUMENTS, t.DEDUP, t.PASSAGES, INSTRUCTIONS):
        assert spark.catalog.tableExists(f"spark_catalog.{schema}.{name}")
    assert not (tmp_path / "work" / "tables").exists()
    assert spark.table(f"spark_catalog.{schema}.instructions").where("status = 'ok'").count() == 10
    # time travel by version, as the export and MLflow lineage use it: the first ingest created the
    # table holding its documents (version 0), dedup's MERGE of decisions came on top of its own
    assert catalog.version(t.DOCUMENTS) == 0
    assert catalog.read(t.DOCUMENTS, version=0).count() == 10

    def staging_tables() -> list[str]:
        # (SHOW TABLES: the suite's session runs without generated code, where catalog.listTables fails)
        names = [r["tableName"] for r in spark.sql(f"SHOW TABLES IN spark_catalog.{schema}").collect()]
        return [name for name in names if name.startswith("_staging")]

    assert staging_tables()  # the stages staged their work in per-run tables...
    catalog.drop_staging()
    assert staging_tables() == []  # ...which are gone when the run ends

    report = status(ctx)
    assert report["tables"][t.DOCUMENTS]["rows"] == 10
    assert report["llm_stages"]["backtranslate"]["done"] == 10


def test_rows_for_keys_returns_their_rows_and_opens_only_the_files_of_their_runs(spark, tmp_path):
    from pyspark.sql import functions as F

    store = tables.Tables(spark, tmp_path / "tables")

    def commit(run_id, names):
        rows = [(n, 1, 0) for n in names]
        df = spark.createDataFrame(rows, tables.struct(t.INPUT_FILES_COLUMNS))
        df = df.select("*", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("written_at"))
        store.merge_insert_new(t.INPUT_FILES, df, ["input_file"])

    folder = tmp_path / "tables" / t.INPUT_FILES
    commit("r1", ["a", "b", "c"])
    first_files = set(folder.glob("*.parquet"))
    commit("r2", ["d", "e"])
    keys = spark.createDataFrame([("e",), ("d",)], "input_file string")
    found = store.rows_for_keys(t.INPUT_FILES, keys, key="input_file")
    for f in first_files:  # the first run's files are gone: reading any of them would fail
        f.unlink()
    assert sorted((r["input_file"], r["run_id"]) for r in found.collect()) == [("d", "r2"), ("e", "r2")]


def _input_files(spark, run_id: str, names: list[str]):
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(n, 1, 0) for n in names], tables.struct(t.INPUT_FILES_COLUMNS))
    return df.select("*", F.lit(run_id).alias("run_id"), F.current_timestamp().alias("written_at"))


def test_first_write_creates_the_table_in_one_commit_holding_the_rows(spark, tmp_path):
    store = tables.Tables(spark, tmp_path / "tables")
    assert store.merge_insert_new(t.INPUT_FILES, _input_files(spark, "r1", ["a", "b"]), ["input_file"]) == 2
    assert store.version(t.INPUT_FILES) == 0  # no empty commit before the rows
    assert [f.name for f in store.read(t.INPUT_FILES).schema] == store.schemas[t.INPUT_FILES].fieldNames()
    # the next write is a keyed MERGE: only the new key goes in
    assert store.merge_insert_new(t.INPUT_FILES, _input_files(spark, "r2", ["b", "c"]), ["input_file"]) == 1
    rows = sorted((r["input_file"], r["run_id"]) for r in store.read(t.INPUT_FILES).collect())
    assert rows == [("a", "r1"), ("b", "r1"), ("c", "r2")]


def test_a_table_created_by_another_writer_meanwhile_is_merged_into(spark, tmp_path, monkeypatch):
    store = tables.Tables(spark, tmp_path / "tables")
    store.merge_insert_new(t.INPUT_FILES, _input_files(spark, "other", ["a"]), ["input_file"])
    # this writer looked before the other created the table: it saw none, and its create is refused
    looked = []
    real_exists = tables.Tables.exists

    def exists_after_first_look(self, name):
        looked.append(name)
        return len(looked) > 1 and real_exists(self, name)

    monkeypatch.setattr(tables.Tables, "exists", exists_after_first_look)
    n = store.merge_insert_new(t.INPUT_FILES, _input_files(spark, "mine", ["a", "b"]), ["input_file"])
    rows = sorted((r["input_file"], r["run_id"]) for r in store.read(t.INPUT_FILES).collect())
    assert (n, rows) == (1, [("a", "other"), ("b", "mine")])


def _pending_rows(spark, rows):
    return spark.createDataFrame(rows, "doc_key string, run_id string")


def test_few_pending_rows_come_back_as_their_keys_runs_and_count(spark, tmp_path):
    store = tables.Tables(spark, tmp_path / "tables")
    rows = _pending_rows(spark, [("k2", "r2"), ("k1", "r1"), ("k3", "r2")])
    pending = store.collect_pending(rows, limit=3, phase="find")
    assert pending.runs == ["r1", "r2"] and pending.count == 3
    assertDataFrameEqual(pending.keys, [Row(doc_key="k1"), Row(doc_key="k2"), Row(doc_key="k3")])
    assert [phase for phase, _ in store.phase_log] == ["find"]


def test_more_pending_rows_than_the_limit_give_only_their_runs(spark, tmp_path):
    store = tables.Tables(spark, tmp_path / "tables")
    rows = _pending_rows(spark, [("k1", "r1"), ("k2", "r2"), ("k3", "r2")])
    pending = store.collect_pending(rows, limit=2, phase="find")
    assert (pending.runs, pending.keys, pending.count) == (["r1", "r2"], None, None)


def test_a_limit_of_zero_never_collects_keys(spark, tmp_path):
    store = tables.Tables(spark, tmp_path / "tables")
    pending = store.collect_pending(_pending_rows(spark, [("k1", "r1")]), limit=0, phase="find")
    assert (pending.runs, pending.keys, pending.count) == (["r1"], None, None)


def test_nothing_pending_has_no_runs_and_a_count_of_zero(spark, tmp_path):
    store = tables.Tables(spark, tmp_path / "tables")
    pending = store.collect_pending(_pending_rows(spark, []), limit=5, phase="find")
    assert pending.runs == [] and pending.count == 0


def _jobs_of(spark, group: str, action) -> int:
    """How many Spark jobs `action` runs (counted by a job group of its own)."""
    sc = spark.sparkContext
    sc.setJobGroup(group, group)
    try:
        action()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    return len(sc.statusTracker().getJobIdsForGroup(group))


def test_a_table_state_built_ahead_leaves_its_first_read_fewer_jobs(spark, tmp_path):
    store = tables.Tables(spark, tmp_path / "tables")
    for run_id, names in (("r1", ["a", "b"]), ("r2", ["c"]), ("r3", ["d"])):
        store.merge_insert_new(t.INPUT_FILES, _input_files(spark, run_id, names), ["input_file"])
    delta_log = spark.sparkContext._jvm.org.apache.spark.sql.delta.DeltaLog

    def first_read() -> None:
        assert store.read(t.INPUT_FILES).count() == 4

    group = f"cold-{uuid.uuid4().hex[:6]}"
    delta_log.clearCache()
    cold = _jobs_of(spark, group, first_read)
    delta_log.clearCache()
    # a table that does not exist is passed over
    store.build_states([t.INPUT_FILES, t.PASSAGES])
    warm = _jobs_of(spark, group.replace("cold", "warm"), first_read)
    assert warm < cold


def test_background_work_hands_back_its_value_or_its_error():
    assert tables.Background(lambda: 41 + 1, "answer").result() == 42

    def fails():
        raise ValueError("no table")

    with pytest.raises(ValueError, match="no table"):
        tables.Background(fails, "failing").result()


def test_background_work_keeps_the_callers_job_group(spark):
    sc = spark.sparkContext
    sc.setJobGroup("bg-group", "background work")
    try:
        seen = tables.Background(lambda: sc.getLocalProperty("spark.jobGroup.id"), "group").result()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert seen == "bg-group"


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("16777216", 16 * 2**20), ("16777216b", 16 * 2**20), ("16m", 16 * 2**20), ("64MB", 64 * 2**20),
     ("1g", 2**30)],
)  # fmt: skip
def test_the_arrow_batch_size_is_read_in_any_of_sparks_byte_spellings(spark, setting, expected):
    key = "spark.sql.execution.arrow.maxBytesPerBatch"
    before = spark.conf.get(key)
    spark.conf.set(key, setting)
    try:
        assert tables.arrow_batch_bytes(spark) == expected
    finally:
        spark.conf.set(key, before)


def _catalog_context(tmp_path, catalog_schema: str):
    from backforth_spark.app.pipeline import context_for

    cfg = load_config(
        LOCAL_CONF,
        [
            f"workdir={tmp_path / 'work'}",
            f"tables.catalog_schema={catalog_schema}",
            "tables.staging_format=delta",
        ],
    )
    return context_for(cfg, "run-1")


def test_a_catalog_schema_that_does_not_exist_is_one_line_before_any_work(spark, tmp_path):
    missing = f"spark_catalog.bf_missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(tables.NoDelta) as refused:
        _catalog_context(tmp_path, missing)
    message = str(refused.value)
    assert message.startswith(f"cannot create Delta tables in {missing}: ") and "\n" not in message
    assert "SCHEMA_NOT_FOUND" in message and "CREATE TABLE" in message
    assert not (tmp_path / "work").exists()


def test_a_catalog_schema_the_user_cannot_write_is_one_line_and_leaves_no_table(spark, tmp_path):
    # storage the tables cannot be written to: the schema's folder replaced by a file (a permission
    # cannot stand for it here: the suite may run as root)
    schema = f"bf_{uuid.uuid4().hex[:8]}"
    blocked = tmp_path / "warehouse"
    spark.sql(f"CREATE SCHEMA spark_catalog.{schema} LOCATION '{blocked}'")
    blocked.rmdir()
    blocked.write_text("")
    with pytest.raises(tables.NoDelta) as refused:
        _catalog_context(tmp_path, f"spark_catalog.{schema}")
    message = str(refused.value)
    assert message.startswith(f"cannot create Delta tables in spark_catalog.{schema}: "), message
    assert "\n" not in message
    assert spark.sql(f"SHOW TABLES IN spark_catalog.{schema}").count() == 0


def test_a_writable_catalog_schema_passes_the_check_and_keeps_no_probe(spark, tmp_path):
    schema = f"bf_{uuid.uuid4().hex[:8]}"
    spark.sql(f"CREATE SCHEMA spark_catalog.{schema} LOCATION '{tmp_path / 'warehouse'}'")
    ctx = _catalog_context(tmp_path, f"spark_catalog.{schema}")
    assert ctx.tables.catalog_schema == f"spark_catalog.{schema}"
    assert spark.sql(f"SHOW TABLES IN spark_catalog.{schema}").count() == 0


def test_an_llm_table_an_earlier_layout_wrote_takes_the_column_its_stage_gained(make_ctx):
    """The instructions table as it was before the stage gained `completion_tokens` (written without the
    column, one ok row and one engine error): a run reads it, retries the error and MERGEs its new rows;
    the old ok row stays, with no value in the new column."""
    from tests.spark.test_generate import _add_passages

    ctx = make_ctx("llm.max_attempts=3")
    _add_passages(ctx, ["a first passage", "BOOM a second passage"])
    run_stage(ctx, "backtranslate", lambda: ScriptedEngine(fail_on="BOOM"))
    earlier = ctx.tables.read(INSTRUCTIONS).drop("completion_tokens").localCheckpoint()
    where = ctx.tables.location(INSTRUCTIONS)
    earlier.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(where)
    assert "completion_tokens" not in ctx.spark.read.format("delta").load(where).columns

    later = replace(ctx, tables=tables.Tables(ctx.spark, ctx.tables.root, "later"))  # a new process
    counts = run_stage(later, "backtranslate", lambda: ScriptedEngine())
    assert counts["generated"] == 1  # the engine error alone went back to the engine
    rows = {r["passage_id"]: r for r in later.tables.read(INSTRUCTIONS).collect()}
    assert {p: (r["status"], r["attempts"], r["completion_tokens"]) for p, r in rows.items()} == {
        "p0": ("ok", 1, None),
        "p1": ("ok", 2, 5),
    }


# ---- a MERGE that provably loses a race to another writer ------------------------------------------

KV = T.StructType([T.StructField("k", T.StringType()), T.StructField("v", T.LongType())])


def _waits_for_a_rival(folder: str):
    """A mapInPandas function that, the first time it runs, says so (a file) and holds its rows until the
    test has committed a rival write (another file): the MERGE reading it has taken its snapshot by then."""

    def run(batches):
        started, committed = Path(folder) / "started", Path(folder) / "committed"
        started.touch()
        deadline = time.monotonic() + 120
        while not committed.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield from batches

    return run


def _race(spark, kv: tables.Tables, folder: Path):
    """MERGE b and c into `kv` from a thread while a rival appends z; returns the thread's outcome."""
    # one partition: the source's task holds one of the two task slots, the rival's write the other
    rows = spark.createDataFrame([("b", 2), ("c", 3)], KV).coalesce(1)
    source = rows.mapInPandas(_waits_for_a_rival(str(folder)), KV)
    outcome = {}

    def merge():
        try:
            outcome["metrics"] = kv.merge_insert_new("kv", source, ["k"])
        except Exception as exc:  # the thread's failure is the test's to read
            outcome["error"] = exc

    thread = threading.Thread(target=merge)
    thread.start()
    deadline = time.monotonic() + 120
    while not (folder / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    spark.createDataFrame([("z", 26)], KV).write.format("delta").mode("append").save(kv.location("kv"))
    (folder / "committed").touch()
    thread.join(180)
    return outcome


def _kv_rows(spark, kv) -> list[tuple]:
    return sorted(tuple(r) for r in spark.read.format("delta").load(kv.location("kv")).collect())


def test_a_merge_that_loses_a_race_retries_on_the_new_snapshot_and_duplicates_nothing(
    spark, tmp_path, caplog
):
    kv = tables.Tables(spark, tmp_path / "tables", "r1", merge_retries=2, schemas={"kv": KV})
    kv.merge_insert_new("kv", spark.createDataFrame([("a", 1)], KV), ["k"])  # creates it: version 0
    with caplog.at_level("WARNING", logger="backforth_spark.spark.tables"):
        outcome = _race(spark, kv, tmp_path)
    assert "error" not in outcome, outcome.get("error")
    # the conflict happened: Delta refused the first MERGE's commit, and the retry said so
    assert [r.message for r in caplog.records if "concurrent commit" in r.message] != []
    history = spark.sql(f"DESCRIBE HISTORY {kv.sql_name('kv')}").orderBy("version").collect()
    assert [r["operation"] for r in history] == ["WRITE", "WRITE", "MERGE"]  # create, the rival, the retry
    assert outcome["metrics"] == 2
    assert _kv_rows(spark, kv) == [("a", 1), ("b", 2), ("c", 3), ("z", 26)]


def test_a_merge_out_of_retries_fails_naming_its_table_and_commits_nothing(spark, tmp_path):
    kv = tables.Tables(spark, tmp_path / "tables", "r1", merge_retries=0, schemas={"kv": KV})
    kv.merge_insert_new("kv", spark.createDataFrame([("a", 1)], KV), ["k"])
    outcome = _race(spark, kv, tmp_path)
    assert isinstance(outcome.get("error"), RuntimeError)
    assert str(outcome["error"]).startswith("table kv: a concurrent writer kept committing first (1 tries)")
    assert _kv_rows(spark, kv) == [("a", 1), ("z", 26)]


def test_the_last_recorded_run_is_the_one_recorded_last_and_a_run_records_once(spark, tmp_path):
    first = tables.Tables(spark, tmp_path / "tables", "run-a")
    assert first.last_recorded_run() is None
    first.record_run('{"llm": {"model": "a"}}')
    first.record_run('{"llm": {"model": "a"}}')  # the same run again (a retried start): one row
    second = tables.Tables(spark, tmp_path / "tables", "run-b")
    second.record_run('{"llm": {"model": "b"}}')
    assert second.last_recorded_run() == ("run-b", '{"llm": {"model": "b"}}')
    assert second.read(t.RUNS).count() == 2


def test_maintain_compacts_each_table_clusters_it_by_its_key_once_and_deletes_what_it_replaced(
    spark, tmp_path
):
    root = tmp_path / "tables"
    for i in range(3):  # three runs, a commit of each in every table
        tables.Tables(spark, root, f"run-{i}").record_run(f'{{"n": {i}}}')
        lineage = (f"'run-{i}' AS run_id", "now() AS written_at")
        rows = [(f"p{i}{j}", f"cc/{i}", j, "text", 5, "ok", False, None) for j in range(3)]
        passages = spark.createDataFrame(rows, tables.struct(t.PASSAGES_COLUMNS)).selectExpr("*", *lineage)
        docs = [(f"cc/{i}{j}", "cc", f"{j}", "text", None, None, "{}", None, "f", j) for j in range(3)]
        docs = spark.createDataFrame(docs, DOC_COLUMNS).selectExpr("*", *lineage)
        for name, df in ((t.PASSAGES, passages), (t.DOCUMENTS, docs)):  # appends: the layout, not the MERGE
            df.coalesce(1).write.format("delta").mode("append").save(str(root / name))
    upkeep = tables.Tables(spark, root, "upkeep")
    names = (t.RUNS, t.PASSAGES, t.DOCUMENTS)
    before = {name: upkeep.read(name).collect() for name in names}
    detail = lambda name: spark.sql(f"DESCRIBE DETAIL {upkeep.sql_name(name)}").first()  # noqa: E731
    files = {name: detail(name)["numFiles"] for name in names}  # three commits: three files or more
    assert min(files.values()) >= 3
    assert upkeep.maintain(retention_hours=0) == {
        n: {"files_before": files[n], "files_after": 1} for n in names
    }
    for name in names:
        assertDataFrameEqual(upkeep.read(name), before[name])
        assert len(list((root / name).glob("*.parquet"))) == 1, name  # the replaced files are gone
    # the passages by their key, the documents by their run (what reads skip files by); `runs` by neither
    for name, key in ((t.PASSAGES, ["passage_id"]), (t.DOCUMENTS, ["run_id"]), (t.RUNS, [])):
        assert detail(name)["clusteringColumns"] == key
    # done already: the next upkeep neither compacts, clusters, nor sets a property again (its VACUUM
    # logs its start and end in the history)
    versions = {name: upkeep.version(name) for name in names}
    assert upkeep.maintain(retention_hours=0) == dict.fromkeys(names, {"files_before": 1, "files_after": 1})
    for name in names:
        history = spark.sql(f"DESCRIBE HISTORY {upkeep.sql_name(name)}").where(f"version > {versions[name]}")
        assert {r["operation"] for r in history.collect()} <= {"VACUUM START", "VACUUM END"}, name
