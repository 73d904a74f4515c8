from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from backforth_spark.config import Config, load_config
from backforth_spark.context import StageContext
from backforth_spark.tables import Tables

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONF = REPO / "conf" / "local.yaml"
DOLMA_SAMPLE = REPO.parent / "shared" / "data" / "dolma-sample"


@pytest.fixture(scope="session")
def base_cfg(tmp_path_factory) -> Config:
    return load_config(LOCAL_CONF, [f"workdir={tmp_path_factory.mktemp('work')}"])


@pytest.fixture(scope="session")
def spark(base_cfg):
    from backforth_spark.session import get_spark

    session = get_spark(base_cfg.spark)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture
def make_ctx(spark, base_cfg, tmp_path):
    """A stage context with its own empty tables; `overrides` are dotted config overrides."""

    def make(*overrides: str) -> StageContext:
        cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path}", *overrides])
        return StageContext(spark, cfg, Tables(spark, tmp_path / "tables"), f"test-{uuid.uuid4().hex[:6]}")

    return make


DOC_COLUMNS = (
    "doc_key string, source string, id string, text string, added string, created string, "
    "metadata string, url string, input_file string, line_number long"
)


def add_documents(ctx: StageContext, docs: list[tuple[str, str]], representatives: set[str] | None = None):
    """Write (doc_key, text) rows into `documents`; with `representatives`, also their dedup decisions."""
    from pyspark.sql import functions as F

    from backforth_spark import tables as t

    lineage = [F.lit(ctx.run_id).alias("run_id"), F.current_timestamp().alias("written_at")]
    rows = [
        (k, "cc", k.split("/")[1], text, None, None, None, None, "f", i + 1)
        for i, (k, text) in enumerate(docs)
    ]
    df = ctx.spark.createDataFrame(rows, DOC_COLUMNS).select("*", *lineage)
    ctx.tables.merge_insert_new(t.DOCUMENTS, df, ["doc_key"])
    if representatives is not None:
        decisions = ctx.spark.createDataFrame(
            [
                (k, k, k, k in representatives, "representative" if k in representatives else "exact", None)
                for k, _ in docs
            ],
            "doc_key string, norm_hash string, cluster_id string, is_representative boolean, reason string, "
            "similarity double",
        )
        ctx.tables.merge_insert_new(t.DEDUP, decisions.select("*", *lineage), ["doc_key"])
