"""Table names and their columns, declared once, as plain data (no Spark import).

A column is (name, Spark SQL type, nullable). `backforth_spark.spark.tables` turns these into Spark schemas;
the LLM tables' columns are derived from their stage records (`generation.LLMTask.columns`).
"""

from __future__ import annotations

Column = tuple[str, str, bool]

DOCUMENTS = "documents"
QUARANTINE = "quarantine"
DEDUP = "dedup_decisions"
MINHASH = "minhash_signatures"
PASSAGES = "passages"
INPUT_FILES = "input_files"
RUNS = "runs"

# Lineage columns carried by every row a stage writes.
LINEAGE: tuple[Column, ...] = (("run_id", "string", False), ("written_at", "timestamp", False))
LINEAGE_NAMES = tuple(name for name, _, _ in LINEAGE)

DOCUMENTS_COLUMNS: tuple[Column, ...] = (
    ("doc_key", "string", False),  # injective in (source, id): see dolma.doc_key
    ("source", "string", False),
    ("id", "string", False),
    ("text", "string", False),
    ("added", "string", True),
    ("created", "string", True),
    ("metadata", "string", True),  # the Dolma metadata object as JSON text
    ("url", "string", True),
    ("input_file", "string", False),
    ("line_number", "bigint", False),
)

# The Dolma files ingest has read through (no unreadable part): a refresh reads only files not listed
# here, or listed with another size or modification time.
INPUT_FILES_COLUMNS: tuple[Column, ...] = (
    ("input_file", "string", False),
    ("length", "bigint", False),
    ("modified_ms", "bigint", False),  # the file's modification time, epoch milliseconds
)

QUARANTINE_COLUMNS: tuple[Column, ...] = (
    ("input_file", "string", False),
    ("line_number", "bigint", False),
    ("reason", "string", False),
    ("detail", "string", True),
    ("raw_prefix", "string", True),
)

DEDUP_COLUMNS: tuple[Column, ...] = (
    ("doc_key", "string", False),
    ("norm_hash", "string", False),
    ("cluster_id", "string", False),  # the representative's doc_key
    ("is_representative", "boolean", False),
    ("reason", "string", False),  # representative | exact | url | near
    ("similarity", "double", True),  # near: estimated Jaccard to the representative
)

MINHASH_COLUMNS: tuple[Column, ...] = (
    ("doc_key", "string", False),
    ("signature", "binary", False),  # num_perm little-endian uint32 values
    ("bands", "array<bigint>", False),
)

PASSAGES_COLUMNS: tuple[Column, ...] = (
    ("passage_id", "string", False),
    ("doc_key", "string", False),
    ("passage_index", "int", False),
    ("text", "string", True),
    ("n_tokens", "int", True),
    ("status", "string", False),  # ok | too_short | too_long | over_limit | low_quality
    ("truncated", "boolean", False),
    ("quality_filter", "string", True),  # the filter a low_quality passage failed
)

# One row per run that ran an LLM stage or the export: the settings that decide what each stage owes
# (config.recorded_settings, JSON), so that `backforth status` judges the workdir by them.
RUNS_COLUMNS: tuple[Column, ...] = (("settings", "string", False),)

# Shared by every LLM stage's table; each adds its pass-through and parsed value columns.
GENERATION_COLUMNS: tuple[Column, ...] = (
    ("passage_id", "string", False),
    ("fingerprint", "string", False),
    ("status", "string", False),  # ok | parse_error | engine_error | too_long | empty | refused
    ("error", "string", True),
    ("raw_output", "string", True),
    ("finish_reason", "string", True),
    ("prompt_tokens", "int", True),
    ("completion_tokens", "int", True),
    ("latency_s", "double", True),
    ("attempts", "int", False),
    ("model", "string", False),
    ("template", "string", False),
    ("template_hash", "string", False),
    ("sampling", "string", False),  # the generation parameters as JSON
    ("device", "string", True),  # the GPU address(es) the engine ran on, if any
)

# The tables every pipeline has, whatever LLM stages it runs (columns without lineage).
CORE_TABLES: dict[str, tuple[Column, ...]] = {
    DOCUMENTS: DOCUMENTS_COLUMNS,
    QUARANTINE: QUARANTINE_COLUMNS,
    INPUT_FILES: INPUT_FILES_COLUMNS,
    DEDUP: DEDUP_COLUMNS,
    MINHASH: MINHASH_COLUMNS,
    PASSAGES: PASSAGES_COLUMNS,
    RUNS: RUNS_COLUMNS,
}


def names(columns: tuple[Column, ...]) -> list[str]:
    return [name for name, _, _ in columns]
