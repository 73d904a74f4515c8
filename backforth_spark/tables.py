"""Table names and schemas, declared once. A stage's contract is the schema of what it writes.

Tables are path-based Delta tables under `<workdir>/tables/<name>`.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

log = logging.getLogger(__name__)

DOCUMENTS = "documents"
QUARANTINE = "quarantine"
DEDUP = "dedup_decisions"
MINHASH = "minhash_signatures"
PASSAGES = "passages"
INSTRUCTIONS = "instructions"
SCORES = "scores"
RESPONSES = "responses"
GROUNDING = "grounding"
DISTILLATIONS = "distillations"

# Lineage columns carried by every row a stage writes.
LINEAGE = [
    T.StructField("run_id", T.StringType(), False),
    T.StructField("written_at", T.TimestampType(), False),
]

DOCUMENTS_SCHEMA = T.StructType(
    [
        T.StructField("doc_key", T.StringType(), False),  # "<source>/<id>"
        T.StructField("source", T.StringType(), False),
        T.StructField("id", T.StringType(), False),
        T.StructField("text", T.StringType(), False),
        T.StructField("added", T.StringType(), True),
        T.StructField("created", T.StringType(), True),
        T.StructField("metadata", T.StringType(), True),  # the Dolma metadata object as JSON text
        T.StructField("url", T.StringType(), True),
        T.StructField("input_file", T.StringType(), False),
        T.StructField("line_number", T.LongType(), False),
        *LINEAGE,
    ]
)

QUARANTINE_SCHEMA = T.StructType(
    [
        T.StructField("input_file", T.StringType(), False),
        T.StructField("line_number", T.LongType(), False),
        T.StructField("reason", T.StringType(), False),
        T.StructField("detail", T.StringType(), True),
        T.StructField("raw_prefix", T.StringType(), True),
        *LINEAGE,
    ]
)

DEDUP_SCHEMA = T.StructType(
    [
        T.StructField("doc_key", T.StringType(), False),
        T.StructField("norm_hash", T.StringType(), False),
        T.StructField("cluster_id", T.StringType(), False),  # the representative's doc_key
        T.StructField("is_representative", T.BooleanType(), False),
        T.StructField("reason", T.StringType(), False),  # representative | exact | url | near
        T.StructField("similarity", T.DoubleType(), True),  # near: estimated Jaccard to the representative
        *LINEAGE,
    ]
)

MINHASH_SCHEMA = T.StructType(
    [
        T.StructField("doc_key", T.StringType(), False),
        T.StructField("signature", T.BinaryType(), False),  # num_perm little-endian uint32 values
        T.StructField("bands", T.ArrayType(T.LongType(), False), False),
        *LINEAGE,
    ]
)

PASSAGES_SCHEMA = T.StructType(
    [
        T.StructField("passage_id", T.StringType(), False),
        T.StructField("doc_key", T.StringType(), False),
        T.StructField("passage_index", T.IntegerType(), False),
        T.StructField("text", T.StringType(), True),
        T.StructField("n_tokens", T.IntegerType(), True),
        T.StructField(
            "status", T.StringType(), False
        ),  # ok | too_short | too_long | over_limit | low_quality
        T.StructField("truncated", T.BooleanType(), False),
        T.StructField("quality_filter", T.StringType(), True),  # the filter a low_quality passage failed
        *LINEAGE,
    ]
)

# Shared by the three LLM stages; each adds its parsed value columns.
GENERATION_COLUMNS = [
    T.StructField("passage_id", T.StringType(), False),
    T.StructField("fingerprint", T.StringType(), False),
    T.StructField("status", T.StringType(), False),  # ok | parse_error | engine_error | too_long | empty
    T.StructField("error", T.StringType(), True),
    T.StructField("raw_output", T.StringType(), True),
    T.StructField("finish_reason", T.StringType(), True),
    T.StructField("prompt_tokens", T.IntegerType(), True),
    T.StructField("completion_tokens", T.IntegerType(), True),
    T.StructField("latency_s", T.DoubleType(), True),
    T.StructField("attempts", T.IntegerType(), False),
    T.StructField("model", T.StringType(), False),
    T.StructField("template", T.StringType(), False),
    T.StructField("template_hash", T.StringType(), False),
    T.StructField("sampling", T.StringType(), False),  # the generation parameters as JSON
    T.StructField("device", T.StringType(), True),  # the GPU address(es) the engine ran on, if any
]

INSTRUCTIONS_SCHEMA = T.StructType(
    [*GENERATION_COLUMNS, T.StructField("instruction", T.StringType(), True), *LINEAGE]
)
SCORES_SCHEMA = T.StructType(
    [
        *GENERATION_COLUMNS,
        T.StructField("instruction", T.StringType(), True),
        T.StructField("reason", T.StringType(), True),
        T.StructField("score", T.IntegerType(), True),
        *LINEAGE,
    ]
)
RESPONSES_SCHEMA = T.StructType(
    [
        *GENERATION_COLUMNS,
        T.StructField("instruction", T.StringType(), True),
        T.StructField("score", T.IntegerType(), True),
        T.StructField("response", T.StringType(), True),
        *LINEAGE,
    ]
)

GROUNDING_SCHEMA = T.StructType(
    [
        *GENERATION_COLUMNS,
        T.StructField("response", T.StringType(), True),  # the rewrite that was judged
        T.StructField("reason", T.StringType(), True),
        T.StructField("score", T.IntegerType(), True),  # 1..5: how faithful the rewrite is to its passage
        *LINEAGE,
    ]
)
DISTILLATIONS_SCHEMA = T.StructType(
    [
        *GENERATION_COLUMNS,
        T.StructField("instruction", T.StringType(), True),
        T.StructField("response", T.StringType(), True),  # answered from the instruction alone
        *LINEAGE,
    ]
)

SCHEMAS: dict[str, T.StructType] = {
    DOCUMENTS: DOCUMENTS_SCHEMA,
    QUARANTINE: QUARANTINE_SCHEMA,
    DEDUP: DEDUP_SCHEMA,
    MINHASH: MINHASH_SCHEMA,
    PASSAGES: PASSAGES_SCHEMA,
    INSTRUCTIONS: INSTRUCTIONS_SCHEMA,
    SCORES: SCORES_SCHEMA,
    RESPONSES: RESPONSES_SCHEMA,
    GROUNDING: GROUNDING_SCHEMA,
    DISTILLATIONS: DISTILLATIONS_SCHEMA,
}


def without_lineage(schema: T.StructType) -> T.StructType:
    """The columns a Python worker produces: the table's schema less the lineage the driver adds."""
    lineage = {f.name for f in LINEAGE}
    return T.StructType([f for f in schema.fields if f.name not in lineage])


class ContractError(ValueError):
    """A stage's input lacks columns it needs."""


def require_columns(df: DataFrame, columns: list[str], what: str) -> None:
    """Fail before any expensive work when `df` lacks a column the stage reads."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ContractError(f"{what} lacks columns {missing}; it has {df.columns}")


def _conflict_types() -> tuple[type[BaseException], ...]:
    from delta import exceptions as e

    return (
        e.DeltaConcurrentModificationException,
        e.ConcurrentWriteException,
        e.ConcurrentAppendException,
        e.ConcurrentDeleteReadException,
        e.ConcurrentDeleteDeleteException,
        e.ConcurrentTransactionException,
        e.MetadataChangedException,
        e.ProtocolChangedException,
    )


@dataclass(frozen=True)
class Tables:
    """Where the pipeline's Delta tables live, and how to read and write them.

    Path-based (local, any Hadoop filesystem): `<root>/<name>`, staging under `<root>/_staging/<run_id>/`.
    Catalog-based (Unity Catalog, or any Spark catalog; `catalog_schema` = "catalog.schema"):
    `catalog.schema.<name>`, staging in `catalog.schema._staging_<run_id>_<name>`. Staging is per run
    either way, so concurrent runs never overwrite each other's."""

    spark: SparkSession
    root: Path
    run_id: str = "shared"
    merge_retries: int = 5
    catalog_schema: str | None = None

    @classmethod
    def from_config(cls, spark: SparkSession, cfg, run_id: str = "shared") -> Tables:
        """The tables of a config: catalog-based with `tables.catalog_schema`, else under workdir/tables."""
        return cls(spark, cfg.workdir_path / "tables", run_id, catalog_schema=cfg.tables.catalog_schema)

    def location(self, name: str) -> str:
        """The table's path, or its catalog name."""
        return f"{self.catalog_schema}.{name}" if self.catalog_schema else str(self.root / name)

    def dataset_source(self, name: str) -> dict[str, str]:
        """How MLflow names the table: {"path": ...} or {"delta_table_name": ...}."""
        return {"delta_table_name" if self.catalog_schema else "path": self.location(name)}

    def _delta(self, name: str):
        from delta.tables import DeltaTable

        if self.catalog_schema:
            return DeltaTable.forName(self.spark, self.location(name))
        return DeltaTable.forPath(self.spark, self.location(name))

    def exists(self, name: str) -> bool:
        from delta.tables import DeltaTable

        if self.catalog_schema:
            return self.spark.catalog.tableExists(self.location(name))
        return DeltaTable.isDeltaTable(self.spark, self.location(name))

    def version(self, name: str) -> int | None:
        """The table's current Delta version (None if it does not exist yet)."""
        if not self.exists(name):
            return None
        return self._delta(name).history(1).first()["version"]

    def read(self, name: str, version: int | None = None) -> DataFrame:
        """The table (empty with its schema if it does not exist yet); `version`: as of that Delta version."""
        if not self.exists(name):
            return self.spark.createDataFrame([], SCHEMAS[name])
        if self.catalog_schema:
            as_of = f" VERSION AS OF {int(version)}" if version is not None else ""
            return self.spark.sql(f"SELECT * FROM {self.location(name)}{as_of}")
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.location(name))

    def _save(self, df: DataFrame, where: str, mode: str) -> None:
        writer = df.write.format("delta").mode(mode)
        if mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        if self.catalog_schema:
            writer.saveAsTable(where)
        else:
            writer.save(where)

    def ensure(self, name: str) -> None:
        """Create the table empty with its declared schema if it does not exist yet."""
        if not self.exists(name):
            self._save(self.spark.createDataFrame([], SCHEMAS[name]), self.location(name), "ignore")

    def _staging_location(self, name: str) -> str:
        if self.catalog_schema:
            return f"{self.catalog_schema}.{self._staging_prefix}{name}"
        return str(self.root / "_staging" / self.run_id / name)

    @property
    def _staging_prefix(self) -> str:
        return "_staging_" + "".join(c if c.isalnum() else "_" for c in self.run_id).lower() + "_"

    def stage(self, name: str, df: DataFrame) -> DataFrame:
        """Materialise `df` in a staging Delta table (overwritten each time) and read it back."""
        where = self._staging_location(name)
        self._save(df, where, "overwrite")
        return self.spark.table(where) if self.catalog_schema else self.spark.read.format("delta").load(where)

    def _merge(self, name: str, df: DataFrame, keys: list[str]):
        self.ensure(name)
        cond = " AND ".join(f"t.{k} = s.{k}" for k in keys)
        return self._delta(name).alias("t").merge(df.alias("s"), cond)

    def drop_staging(self) -> None:
        """Remove this run's staging tables."""
        if not self.catalog_schema:
            shutil.rmtree(self.root / "_staging" / self.run_id, ignore_errors=True)
            return
        for table in self.spark.catalog.listTables(self.catalog_schema):
            if table.name.startswith(self._staging_prefix):
                self.spark.sql(f"DROP TABLE IF EXISTS {self.catalog_schema}.{table.name}")

    def _commit(self, name: str, build) -> dict[str, int]:
        """Build and execute a MERGE; returns its metrics (num_inserted_rows, num_updated_rows, ...).
        When a concurrent writer commits first (Delta's optimistic concurrency), rebuild it on the new
        snapshot and try again. The MERGEs are keyed, so a retry never duplicates a row."""
        for attempt in range(self.merge_retries + 1):
            try:
                metrics = build().execute().first()
                return metrics.asDict() if metrics is not None else {}
            except _conflict_types() as exc:
                if attempt == self.merge_retries:
                    raise RuntimeError(
                        f"table {name}: a concurrent writer kept committing first ({attempt + 1} tries); "
                        "nothing of this MERGE was committed; rerun to resume"
                    ) from exc
                log.warning("table %s: concurrent commit, retrying the MERGE (%s)", name, type(exc).__name__)
                time.sleep(0.5 * 2**attempt + random.random())
        raise AssertionError("unreachable")

    def merge_insert_new(self, name: str, df: DataFrame, keys: list[str]) -> int:
        """Insert rows whose key is not in the table yet (idempotent append); returns how many."""
        metrics = self._commit(name, lambda: self._merge(name, df, keys).whenNotMatchedInsertAll())
        return int(metrics.get("num_inserted_rows", 0))

    def merge_upsert_unless_ok(self, name: str, df: DataFrame, keys: list[str]) -> dict[str, int]:
        """Insert new keys; replace an existing row only if it is not `ok` (a retry)."""
        self._commit(
            name,
            lambda: (
                self._merge(name, df, keys)
                .whenMatchedUpdateAll(condition="t.status <> 'ok'")
                .whenNotMatchedInsertAll()
            ),
        )
