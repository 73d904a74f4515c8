"""The pipeline's Delta tables: where they live and how to read and MERGE them (Spark side).

Names and columns are declared in backforth_spark/core/schemas.py (and, for the LLM tables, in the stage
records); this module turns them into Spark schemas. Path-based tables live under `<workdir>/tables/<name>`,
catalog tables at `catalog.schema.<name>`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pyspark.errors import AnalysisException, PySparkException
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from backforth_spark.core import storage
from backforth_spark.core.config import byte_size, quote_name
from backforth_spark.core.generation import LLM_TASKS, LLMTask
from backforth_spark.core.schemas import CORE_TABLES, DOCUMENTS, LINEAGE, LINEAGE_NAMES, RUNS, Column
from backforth_spark.spark.session import spark_thread

log = logging.getLogger(__name__)

# Spark SQL type names used in backforth_spark/core/schemas.py
_TYPES = {
    "string": T.StringType(),
    "bigint": T.LongType(),
    "int": T.IntegerType(),
    "double": T.DoubleType(),
    "boolean": T.BooleanType(),
    "binary": T.BinaryType(),
    "timestamp": T.TimestampType(),
    "array<bigint>": T.ArrayType(T.LongType(), False),
}


def struct(columns: Sequence[Column]) -> T.StructType:
    """A Spark schema from declared (name, type, nullable) columns."""
    return T.StructType([T.StructField(name, _TYPES[typ], nullable) for name, typ, nullable in columns])


def table_schemas(tasks: Sequence[LLMTask] = LLM_TASKS) -> dict[str, T.StructType]:
    """Every table of a pipeline with these LLM stages, with lineage: the core tables, then one per stage."""
    out = {name: struct((*cols, *LINEAGE)) for name, cols in CORE_TABLES.items()}
    return out | {task.table: struct(task.columns) for task in tasks}


def arrow_batch_bytes(spark: SparkSession) -> int:
    """The most bytes of a batch between the JVM and a Python worker
    (`spark.sql.execution.arrow.maxBytesPerBatch`): every stage's Python batches follow it."""
    return byte_size(spark.conf.get("spark.sql.execution.arrow.maxBytesPerBatch", "64m"))


def without_lineage(schema: T.StructType) -> T.StructType:
    """The columns a Python worker produces: the table's schema less the lineage the driver adds."""
    return T.StructType([f for f in schema.fields if f.name not in LINEAGE_NAMES])


class ContractError(ValueError):
    """A stage's input lacks columns it needs."""


def require_columns(df: DataFrame, columns: list[str], what: str) -> None:
    """Fail before any expensive work when `df` lacks a column the stage reads."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ContractError(f"{what} lacks columns {missing}; it has {df.columns}")


class Background:
    """`fn()` run in a thread that keeps the caller's Spark job group and properties (pyspark's
    InheritableThread); `result()` waits for it and returns its value or raises its error."""

    def __init__(self, fn: Callable[[], Any], name: str, spark: SparkSession | None = None) -> None:
        self._outcome: dict[str, Any] = {}
        self._thread = spark_thread(spark, self._run, name, (fn,))
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller by result()
            self._outcome["error"] = exc

    def result(self) -> Any:
        self._thread.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]


# What `backforth maintain` liquid-clusters a table by, so that a compaction keeps the files a read skips
# by its statistics: passage_id where the table has one (a commit slice's MERGE reads one key range of
# an LLM table), run_id for the documents (dedup and chunk find a refresh's new documents by the runs
# that wrote them: run ids sort by time, so a run's rows stay in files of their own).
CLUSTER_KEY = "passage_id"
DOCUMENTS_CLUSTER_KEY = "run_id"
# Properties of every pipeline table, set when it is created (`backforth maintain` sets them on tables
# created before). Deletion vectors: a MERGE that replaces a retried row marks the old one deleted and
# writes only the new row, where it would otherwise rewrite the whole file that held it (measured on
# a slice MERGE: 0 files rewritten, against one per file holding a retry); old files also keep only
# their own run's rows. Readers need Delta 2.3 or later (Databricks Runtime 12.2 or later).
TABLE_PROPERTIES = {"delta.enableDeletionVectors": "true"}


def sql_string(value: str) -> str:
    """`value` as a Spark SQL string literal (backslash escapes, Spark's default)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class KeyRange:
    """The closed range [lowest, highest] of a table column that a MERGE's source keys all lie in."""

    column: str
    lowest: str
    highest: str


@dataclass(frozen=True)
class Pending:
    """Rows a stage still owes: the runs that wrote them and, when few enough to collect, their keys
    (a one-column DataFrame, small enough to broadcast) and how many."""

    runs: list[str]
    keys: DataFrame | None = None
    count: int | None = None


# Delta's optimistic-concurrency conflicts (another writer committed first), by the names of their
# exception classes: delta-spark's Python classes differ between classic sessions and Spark Connect,
# and a runtime that ships Delta itself need not have the delta-spark wheel at all
_CONFLICT_CLASSES = frozenset(
    {
        "DeltaConcurrentModificationException",
        "ConcurrentWriteException",
        "ConcurrentAppendException",
        "ConcurrentDeleteReadException",
        "ConcurrentDeleteDeleteException",
        "ConcurrentTransactionException",
        "MetadataChangedException",
        "ProtocolChangedException",
    }
)
# ... and by their error conditions, which is all a Spark Connect client gets of them when delta-spark's
# Python package has not taught it the classes
_CONFLICT_CONDITIONS = ("DELTA_CONCURRENT_", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED")


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is Delta's refusal of a commit because another writer committed first: by its
    Python class (delta-spark's, when its conversion is installed), by the Java class a classic
    session's Py4JJavaError wraps, or by its error condition (Spark Connect)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    java = getattr(exc, "java_exception", None)
    if java is not None:
        with contextlib.suppress(Exception):  # a JVM that is gone cannot name it
            names.add(java.getClass().getSimpleName())
    if names & _CONFLICT_CLASSES:
        return True
    condition = exc.getCondition() if isinstance(exc, PySparkException) else None
    return bool(condition) and condition.startswith(_CONFLICT_CONDITIONS)


# DESCRIBE DETAIL of a path that holds no Delta table (absent, empty, or other files)
_NOT_A_TABLE = ("DELTA_MISSING_DELTA_TABLE", "DELTA_PATH_DOES_NOT_EXIST", "PATH_NOT_FOUND")

# ... and what a session without Delta's SQL extension answers: it reads `DESCRIBE DETAIL x` as a
# DESCRIBE of a table named DETAIL, which it cannot find
_NO_DELTA = (
    "TABLE_OR_VIEW_NOT_FOUND", "PARSE_SYNTAX_ERROR", "DATA_SOURCE_NOT_FOUND",
    "UNSUPPORTED_DATASOURCE_FOR_DIRECT_QUERY",
)  # fmt: skip


class NoDelta(ValueError):
    """The Spark session (or the Spark Connect server behind it) cannot hold Delta tables where the config
    puts them: it has no Delta Lake, or the user cannot create tables in the catalog schema."""


def _first_line(exc: BaseException) -> str:
    """An exception's condition and the first line of its message (Spark's run to many lines)."""
    condition = getattr(exc, "getCondition", lambda: None)()
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"[{condition}] {text}" if condition and condition not in text else text


# a write in mode "error" found the table there: by path (Delta), by name (a catalog)
_ALREADY_EXISTS = ("DELTA_PATH_EXISTS", "TABLE_OR_VIEW_ALREADY_EXISTS")


@dataclass(frozen=True)
class Tables:
    """Where the pipeline's Delta tables live, and how to read and write them.

    Path-based (local, any Hadoop filesystem): `<root>/<name>`, staging under `<root>/_staging/<run_id>/`.
    Catalog-based (Unity Catalog, or any Spark catalog; `catalog_schema` = "catalog.schema"):
    `catalog.schema.<name>`, staging in `catalog.schema._staging_<run_id>_<name>`. Staging is per run
    either way, so concurrent runs never overwrite each other's."""

    spark: SparkSession
    root: str  # the tables' folder: a local path or any Hadoop filesystem URI (a Path is taken too)
    run_id: str = "shared"
    merge_retries: int = 5
    catalog_schema: str | None = None
    staging_format: str = "delta"  # or "parquet" (path-based tables only; see TablesConfig)
    schemas: Mapping[str, T.StructType] = field(default_factory=table_schemas)
    # names of the tables read through this object, in order (checked against the stage records)
    read_log: list[str] = field(default_factory=list, compare=False, repr=False)
    # (phase, seconds) of each Spark action run through this object, in order: the stages' breakdown
    phase_log: list[tuple[str, float]] = field(default_factory=list, compare=False, repr=False)
    # the tables whose columns this object has checked against their declared schema (_migrate)
    migrated: set[str] = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", str(self.root))

    @classmethod
    def from_config(
        cls, spark: SparkSession, cfg, run_id: str = "shared", tasks: Sequence[LLMTask] = LLM_TASKS
    ) -> Tables:
        """The tables of a config: catalog-based with `tables.catalog_schema`, else under workdir/tables."""
        return cls(
            spark,
            storage.join(cfg.workdir_uri, "tables"),
            run_id,
            catalog_schema=cfg.tables.catalog_schema,
            staging_format=cfg.tables.staging_format,
            schemas=table_schemas(tasks),
        )

    def location(self, name: str) -> str:
        """The table's path, or its catalog name."""
        return f"{self.catalog_schema}.{name}" if self.catalog_schema else storage.join(self.root, name)

    def dataset_source(self, name: str) -> dict[str, str]:
        """How MLflow names the table: {"path": ...} or {"delta_table_name": ...}."""
        return {"delta_table_name" if self.catalog_schema else "path": self.location(name)}

    def sql_name(self, name: str) -> str:
        """How SQL names the table: `catalog`.`schema`.`name`, or delta.`<path>`. Delta is reached
        through SQL alone, not delta-spark's DeltaTable API: under Spark Connect that API needs a
        Delta Connect plugin on the server, and SQL works on every server that has Delta."""
        if self.catalog_schema:
            return quote_name(self.location(name))
        return "delta.`" + self.location(name).replace("`", "``") + "`"

    def exists(self, name: str) -> bool:
        if self.catalog_schema:
            return self.spark.catalog.tableExists(quote_name(self.location(name)))
        try:
            self.spark.sql(f"DESCRIBE DETAIL {self.sql_name(name)}").collect()
        except AnalysisException as exc:
            if exc.getCondition() in _NOT_A_TABLE:
                return False
            if exc.getCondition() in _NO_DELTA:
                raise NoDelta(
                    "this Spark session has no Delta Lake (DESCRIBE DETAIL is not understood: "
                    f"{exc.getCondition()}): start Spark, or the Spark Connect server, with "
                    "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension and Delta's jars"
                ) from None
            raise
        return True

    def check_delta(self) -> None:
        """Raise NoDelta (a ValueError, one line) unless the session can hold the pipeline's tables, so
        that a run fails here, before any work, not inside a stage. By path: the session reads Delta
        tables (a Spark Connect server started without Delta fails). In a catalog: a Delta table can be
        created in the schema and dropped again (a missing schema, a missing grant, no Delta)."""
        if not self.catalog_schema:
            self.exists("_no_such_table")
            return
        # a probe rather than SHOW GRANTS: grants are Unity Catalog's syntax, and what a user may do
        # also depends on group membership, ownership and the storage behind the schema
        probe = quote_name(f"{self.catalog_schema}.`_backforth_write_check_{uuid.uuid4().hex[:12]}`")
        try:
            self.spark.sql(f"CREATE TABLE {probe} (id INT) USING DELTA")
            self.spark.sql(f"DROP TABLE {probe}")
        except Exception as exc:  # noqa: BLE001 (any refusal: pyspark, py4j or Spark Connect errors)
            raise NoDelta(
                f"cannot create Delta tables in {self.catalog_schema}: {_first_line(exc)}; the schema "
                "must exist and the user needs USE CATALOG, USE SCHEMA, CREATE TABLE and MODIFY on it"
            ) from None

    def history(self, name: str, version: int | None = None):
        """The table's latest commit (or commit `version`) as a Row of DESCRIBE HISTORY."""
        rows = self.spark.sql(f"DESCRIBE HISTORY {self.sql_name(name)}")
        if version is None:
            return rows.limit(1).first()
        return rows.where(F.col("version") == version).first()

    def version(self, name: str) -> int | None:
        """The table's current Delta version (None if it does not exist yet)."""
        if not self.exists(name):
            return None
        return self.history(name)["version"]

    def build_states(self, names: Sequence[str]) -> None:
        """Build the Delta state (the list of live files) of each existing table of `names`, for the
        stages' first reads to find cached in the Delta log. Only a head start: an error here is left
        for the stage's own read to report."""
        for name in names:
            try:
                if self.exists(name):
                    self._reader(name).inputFiles()
            except Exception as exc:
                log.debug("no head start on table %s: %s", name, exc)

    def read(self, name: str, version: int | None = None) -> DataFrame:
        """The table (empty with its schema if it does not exist yet); `version`: as of that Delta version."""
        self.read_log.append(name)
        if not self.exists(name):
            return self.spark.createDataFrame([], self.schemas[name])
        if version is None:
            self._migrate(name)
        return self._reader(name, version)

    def _migrate(self, name: str) -> None:
        """Add to table `name` the declared columns it lacks (a table an earlier layout wrote, before its
        stage gained a column), once per table and object. Delta adds them nullable: rows written before
        read null there, and the stages read and MERGE as into a new table. A concurrent writer adding
        them first is fine; any other failure is the caller's."""
        if name in self.migrated or name not in self.schemas:
            return
        missing = self._missing_columns(name)
        if missing:
            columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
            log.warning("table %s lacks declared columns; adding %s", name, columns)
            try:
                self.spark.sql(f"ALTER TABLE {self.sql_name(name)} ADD COLUMNS ({columns})")
            except Exception:
                if self._missing_columns(name):  # not another writer's doing
                    raise
        self.migrated.add(name)

    def _missing_columns(self, name: str) -> list[T.StructField]:
        have = {f.name.lower() for f in self._reader(name).schema.fields}
        return [f for f in self.schemas[name].fields if f.name.lower() not in have]

    def _reader(self, name: str, version: int | None = None) -> DataFrame:
        if self.catalog_schema:
            as_of = f" VERSION AS OF {int(version)}" if version is not None else ""
            return self.spark.sql(f"SELECT * FROM {self.sql_name(name)}{as_of}")
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.location(name))

    def _save(
        self,
        df: DataFrame,
        where: str,
        mode: str,
        partition_by: Sequence[str] = (),
        properties: Mapping[str, str] | None = None,
    ) -> None:
        """Write `df` as a Delta table at `where`; `properties` become the table's when this creates it."""
        writer = df.write.format("delta").mode(mode).partitionBy(*partition_by).options(**(properties or {}))
        if mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        if self.catalog_schema:
            writer.saveAsTable(quote_name(where))
        else:
            writer.save(where)

    def ensure(self, name: str) -> None:
        """Create the table empty with its declared schema if it does not exist yet."""
        if not self.exists(name):
            empty = self.spark.createDataFrame([], self.schemas[name])
            self._save(empty, self.location(name), "ignore", properties=TABLE_PROPERTIES)

    def properties(self, name: str) -> dict[str, str]:
        """The table properties of table `name` (it exists)."""
        listing = self.spark.sql(f"SHOW TBLPROPERTIES {self.sql_name(name)}").collect()
        return {r["key"]: r["value"] for r in listing}

    def set_properties(self, name: str, properties: Mapping[str, str]) -> None:
        """Set those of `properties` that table `name` lacks or holds otherwise (a commit, so only then;
        asked again after a concurrent writer's commit). Any key: a writer option sets only `delta.`
        keys Delta knows."""

        def alter() -> None:
            held = self.properties(name)
            changed = {k: v for k, v in properties.items() if held.get(k) != v}
            if changed:
                given = ", ".join(f"{sql_string(k)} = {sql_string(v)}" for k, v in changed.items())
                self.spark.sql(f"ALTER TABLE {self.sql_name(name)} SET TBLPROPERTIES ({given})")

        self._retrying_conflicts(name, "alter", alter)

    def staging_path(self, name: str) -> str:
        """A folder of this run's staging area (path-based tables), removed with it."""
        return storage.join(self.root, "_staging", self.run_id, name)

    def _staging_location(self, name: str) -> str:
        if self.catalog_schema:
            return f"{self.catalog_schema}.{self._staging_prefix}{name}"
        return self.staging_path(name)

    @property
    def _staging_prefix(self) -> str:
        return "_staging_" + "".join(c if c.isalnum() else "_" for c in self.run_id).lower() + "_"

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Record the wall time of the Spark work inside as `phase` in `phase_log`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_log.append((phase, time.perf_counter() - started))

    def runs_with_keys(self, name: str, keys: DataFrame, key: str = "doc_key") -> list[str]:
        """The run ids of the rows of table `name` whose `key` is among `keys` (a one-column
        DataFrame), from the key and run_id columns alone; empty when none of the keys is there."""
        table = self.read(name)
        with self.timed(f"find {name} rows"):
            runs = table.select(key, "run_id").join(keys, key, "left_semi").select("run_id").distinct()
            return sorted(r["run_id"] for r in runs.collect())

    def rows_for_keys(
        self, name: str, keys: DataFrame, key: str = "doc_key", runs: list[str] | None = None
    ) -> DataFrame:
        """The rows of table `name` whose `key` is among `keys` (a one-column DataFrame). Finds the runs
        that wrote them (`runs_with_keys`, unless given), then reads only those runs' rows: each commit
        writes files of its own run_id, so Delta's file statistics skip every other file, and a refresh
        reads its few pending rows, not the whole table's text."""
        run_ids = self.runs_with_keys(name, keys, key) if runs is None else runs
        return self.read(name).where(F.col("run_id").isin(run_ids)).join(keys, key, "left_semi")

    def collect_pending(self, rows: DataFrame, limit: int, phase: str, key: str = "doc_key") -> Pending:
        """The pending `rows` (a `key` and a `run_id` column), found in one job timed as `phase`: up
        to `limit` of them come back to the driver, and the reads after it join that list of keys
        instead of computing the anti-join of whole tables again (a refresh with few new rows). More
        than `limit`: only their runs, and the caller keeps its anti-join."""
        with self.timed(phase):
            if limit > 0:
                found = rows.select(key, "run_id").limit(limit + 1).collect()
                if len(found) <= limit:
                    keys = self.spark.createDataFrame(
                        [(r[key],) for r in found], T.StructType([rows.schema[key]])
                    )
                    return Pending(sorted({r["run_id"] for r in found}), keys, len(found))
            return Pending(sorted(r["run_id"] for r in rows.select("run_id").distinct().collect()))

    def stage(self, name: str, df: DataFrame, partition_by: Sequence[str] = ()) -> DataFrame:
        """Materialise `df` in a staging table (Delta, or Parquet by `staging_format`; overwritten each
        time) and read it back. Timed as `stage <name>`: everything lazy upstream of `df` runs here.
        `partition_by`: columns laying the table out in folders, so a filter on them reads only theirs."""
        where = self._staging_location(name)
        with self.timed(f"stage {name}"):
            if self.staging_format == "parquet":
                df.write.mode("overwrite").partitionBy(*partition_by).parquet(where)
            else:
                self._save(df, where, "overwrite", partition_by)
        if self.staging_format == "parquet":
            return self.spark.read.schema(df.schema).parquet(where)  # the schema: an empty result has no file
        if self.catalog_schema:
            return self.spark.table(quote_name(where))
        return self.spark.read.format("delta").load(where)

    def _merge(
        self, name: str, df: DataFrame, keys: list[str], clauses: str, within: KeyRange | None = None
    ) -> Row | None:
        """MERGE `df` into table `name` on `keys` with the SQL `clauses` (WHEN ...); its metrics row.
        `within`: the range (column, lowest, highest) that every key of `df` lies in."""
        self.read_log.append(name)  # a MERGE reads its target
        self.ensure(name)
        self._migrate(name)
        view = f"backforth_merge_{uuid.uuid4().hex}"  # the session's views are shared by its threads
        df.createOrReplaceTempView(view)
        try:
            cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
            if within is not None:
                # A condition on the target alone: Delta skips every file whose min/max of the column
                # lies outside it (file statistics), so the MERGE scans, and may rewrite, only files
                # of the source's key range. It changes no match: every source key is inside. (Literals:
                # Delta's MERGE does not bind spark.sql's parameters.)
                lowest, highest = sql_string(within.lowest), sql_string(within.highest)
                cond += f" AND t.`{within.column}` BETWEEN {lowest} AND {highest}"
            return self.spark.sql(
                f"MERGE INTO {self.sql_name(name)} AS t USING `{view}` AS s ON {cond} {clauses}"
            ).first()
        finally:
            self.spark.catalog.dropTempView(view)

    def drop_staging(self) -> None:
        """Remove this run's staging tables."""
        if not self.catalog_schema:
            storage.delete_dir(storage.join(self.root, "_staging", self.run_id))
            return
        for name in self._table_names():
            if name.startswith(self._staging_prefix):
                self.spark.sql(f"DROP TABLE IF EXISTS {quote_name(f'{self.catalog_schema}.`{name}`')}")

    def _table_names(self) -> list[str]:
        """The names of the tables in the catalog schema."""
        # SHOW TABLES, not catalog.listTables: the latter decodes its rows into Table objects, which fails
        # (EXPRESSION_DECODING_FAILED) in a session that evaluates without generated code
        # (spark.sql.codegen.factoryMode=NO_CODEGEN, as the test suite runs)
        listing = self.spark.sql(f"SHOW TABLES IN {quote_name(self.catalog_schema)}")
        return [r["tableName"] for r in listing.collect()]

    def _create_with(self, name: str, df: DataFrame) -> int | None:
        """Create table `name` holding `df`'s rows if it does not exist yet; returns how many rows, or
        None when the table exists (or another writer created it first), for the caller to MERGE.

        Into a table that does not exist, a MERGE is an empty commit to create it, then a join with
        nothing and a second commit: a second or two of fixed cost on every stage's first run."""
        if self.exists(name):
            return None
        rows = df.select(self.schemas[name].fieldNames())  # the declared columns, in their order
        try:
            with self.timed(f"create {name}"):
                # "error": fails if the table appeared since; two creators racing for version 0 make
                # Delta refuse the second commit
                self._save(rows, self.location(name), "error", properties=TABLE_PROPERTIES)
        except Exception as exc:
            if is_conflict(exc):
                return None  # in mode "error" the only conflict is another writer creating the table
            # Decided from the error: asked again, Delta may answer from the table state this
            # process cached before the other writer's commit, and still say the table is absent.
            if isinstance(exc, AnalysisException) and exc.getCondition() in _ALREADY_EXISTS:
                return None
            raise
        # version 0 is this write: its commit counted the rows (no job over them)
        return int(self.history(name, version=0)["operationMetrics"]["numOutputRows"])

    def _commit(self, name: str, df: DataFrame, build) -> dict[str, int]:
        """Build and execute a MERGE of `df`; returns its metrics (num_inserted_rows, num_updated_rows,
        ...). A table that does not exist yet is created holding `df`'s rows instead. When a concurrent
        writer commits first (Delta's optimistic concurrency), rebuild the MERGE on the new snapshot and
        try again. The MERGEs are keyed, so a retry never duplicates a row."""
        created = self._create_with(name, df)
        if created is not None:
            return {"num_inserted_rows": created, "num_updated_rows": 0}
        metrics = self._retrying_conflicts(name, "merge", build)
        return metrics.asDict() if metrics is not None else {}

    def _retrying_conflicts(self, name: str, what: str, action):
        """`action()`, timed as "<what> <name>", run again (with backoff) while a concurrent writer's
        commit makes Delta refuse it; RuntimeError naming the table when the retries run out."""
        for attempt in range(self.merge_retries + 1):
            try:
                with self.timed(f"{what} {name}"):
                    return action()
            except Exception as exc:
                if not is_conflict(exc):
                    raise
                if attempt == self.merge_retries:
                    raise RuntimeError(
                        f"table {name}: a concurrent writer kept committing first ({attempt + 1} tries); "
                        f"nothing of this {what.upper()} was committed; rerun to resume"
                    ) from exc
                log.warning(
                    "table %s: concurrent commit, retrying the %s (%s)",
                    name,
                    what.upper(),
                    type(exc).__name__,
                )
                time.sleep(0.5 * 2**attempt + random.random())
        raise AssertionError("unreachable")

    def maintain(self, retention_hours: int) -> dict[str, dict[str, int]]:
        """OPTIMIZE, then VACUUM, each existing table (scratch tables aside); per table the live files
        before and after. A table is liquid-clustered by its `clustering_key` first (once). The
        retention becomes the table's `delta.deletedFileRetentionDuration`, which Delta's VACUUM keeps
        to and checks a shorter request against, so a reader or a MERGE that began before the compaction
        still finds its files. Safe beside a running refresh: OPTIMIZE is a commit like any other (a
        MERGE that loses to it is retried: Tables._commit)."""
        out = {}
        for name in self.schemas:
            if not self.exists(name):
                continue
            table = self.sql_name(name)
            detail = self.spark.sql(f"DESCRIBE DETAIL {table}").first()
            before = int(detail["numFiles"])
            key = self.clustering_key(name)
            if key is not None and not detail["clusteringColumns"]:
                # Liquid clustering: OPTIMIZE then lays files out by ranges of the key (and on later
                # runs clusters only what is new), where a plain OPTIMIZE would mix every range, and
                # every run, into each file
                log.info("table %s: clustering by %s", name, key)
                self.spark.sql(f"ALTER TABLE {table} CLUSTER BY ({key})")
            # a writer that commits over the files being compacted: compact again on its snapshot
            done = self._retrying_conflicts(
                name, "optimize", lambda t=table: self.spark.sql(f"OPTIMIZE {t}").first()
            )
            compacted = done["metrics"] if done is not None else None
            after = (
                before + compacted["numFilesAdded"] - compacted["numFilesRemoved"] if compacted else before
            )
            retention = {"delta.deletedFileRetentionDuration": f"interval {retention_hours} hours"}
            self.set_properties(name, {**TABLE_PROPERTIES, **retention})
            with self.timed(f"vacuum {name}"):  # live files stay as they are: only replaced ones go
                self.spark.sql(f"VACUUM {table}").collect()
            out[name] = {"files_before": before, "files_after": int(after)}
        return out

    def clustering_key(self, name: str) -> str | None:
        """The column `maintain` clusters table `name` by (CLUSTER_KEY, DOCUMENTS_CLUSTER_KEY), if any."""
        if CLUSTER_KEY in self.schemas[name].fieldNames():
            return CLUSTER_KEY
        return DOCUMENTS_CLUSTER_KEY if name == DOCUMENTS else None

    def record_run(self, settings: str) -> None:
        """Record this run's settings (config.recorded_settings) in table `runs`, once per run id."""
        row = self.spark.createDataFrame([(settings, self.run_id)], "settings string, run_id string")
        self.merge_insert_new(RUNS, row.withColumn("written_at", F.current_timestamp()), ["run_id"])

    def last_recorded_run(self) -> tuple[str, str] | None:
        """(run id, settings) of the run recorded last in table `runs`, or None when none is."""
        if not self.exists(RUNS):
            return None
        last = self.read(RUNS).orderBy(F.col("written_at").desc(), F.col("run_id").desc()).first()
        return None if last is None else (last["run_id"], last["settings"])

    def merge_insert_new(self, name: str, df: DataFrame, keys: list[str]) -> int:
        """Insert rows whose key is not in the table yet (idempotent append); returns how many."""
        metrics = self._commit(
            name, df, lambda: self._merge(name, df, keys, "WHEN NOT MATCHED THEN INSERT *")
        )
        return int(metrics.get("num_inserted_rows", 0))

    def merge_upsert_unless_ok(
        self, name: str, df: DataFrame, keys: list[str], within: KeyRange | None = None
    ) -> dict[str, int]:
        """Insert new keys; replace an existing row only if it is not `ok` (a retry). `within`: the key
        range `df` lies in, which bounds the files the MERGE reads (see _merge)."""
        return self._commit(
            name,
            df,
            lambda: self._merge(
                name,
                df,
                keys,
                "WHEN MATCHED AND t.status <> 'ok' THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *",
                within,
            ),
        )
