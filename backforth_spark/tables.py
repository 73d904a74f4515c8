"""Table names and schemas, declared once. A stage's contract is the schema of what it writes.

Tables are path-based Delta tables under `<workdir>/tables/<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

DOCUMENTS = "documents"
QUARANTINE = "quarantine"
DEDUP = "dedup_decisions"
MINHASH = "minhash_signatures"
PASSAGES = "passages"
INSTRUCTIONS = "instructions"
SCORES = "scores"
RESPONSES = "responses"

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

SCHEMAS: dict[str, T.StructType] = {
    DOCUMENTS: DOCUMENTS_SCHEMA,
    QUARANTINE: QUARANTINE_SCHEMA,
    DEDUP: DEDUP_SCHEMA,
    MINHASH: MINHASH_SCHEMA,
    PASSAGES: PASSAGES_SCHEMA,
    INSTRUCTIONS: INSTRUCTIONS_SCHEMA,
    SCORES: SCORES_SCHEMA,
    RESPONSES: RESPONSES_SCHEMA,
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


@dataclass(frozen=True)
class Tables:
    """Where the pipeline's Delta tables live, and how to read and write them."""

    spark: SparkSession
    root: Path

    def location(self, name: str) -> str:
        return str(self.root / name)

    def exists(self, name: str) -> bool:
        from delta.tables import DeltaTable

        return DeltaTable.isDeltaTable(self.spark, self.location(name))

    def read(self, name: str) -> DataFrame:
        if not self.exists(name):
            return self.spark.createDataFrame([], SCHEMAS[name])
        return self.spark.read.format("delta").load(self.location(name))

    def ensure(self, name: str) -> None:
        """Create the table empty with its declared schema if it does not exist yet."""
        if not self.exists(name):
            empty = self.spark.createDataFrame([], SCHEMAS[name])
            empty.write.format("delta").mode("ignore").save(self.location(name))

    def stage(self, name: str, df: DataFrame) -> DataFrame:
        """Materialise `df` in a staging Delta table (overwritten each time) and read it back."""
        path = str(self.root / "_staging" / name)
        df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(path)
        return self.spark.read.format("delta").load(path)

    def _merge(self, name: str, df: DataFrame, keys: list[str]):
        from delta.tables import DeltaTable

        self.ensure(name)
        cond = " AND ".join(f"t.{k} = s.{k}" for k in keys)
        return DeltaTable.forPath(self.spark, self.location(name)).alias("t").merge(df.alias("s"), cond)

    def merge_insert_new(self, name: str, df: DataFrame, keys: list[str]) -> None:
        """Insert rows whose key is not in the table yet (idempotent append)."""
        self._merge(name, df, keys).whenNotMatchedInsertAll().execute()

    def merge_upsert_unless_ok(self, name: str, df: DataFrame, keys: list[str]) -> None:
        """Insert new keys; replace an existing row only if it is not `ok` (a retry)."""
        (
            self._merge(name, df, keys)
            .whenMatchedUpdateAll(condition="t.status <> 'ok'")
            .whenNotMatchedInsertAll()
            .execute()
        )
