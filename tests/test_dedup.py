from pyspark.testing import assertDataFrameEqual

from backforth_spark import dedup
from backforth_spark import tables as t
from tests.conftest import add_documents


def _decisions(ctx):
    return ctx.tables.read(t.DEDUP).select("doc_key", "cluster_id", "is_representative", "reason")


def test_exact_duplicates_keep_the_smallest_key(make_ctx, spark):
    ctx = make_ctx()
    add_documents(ctx, [("cc/2", "Hello, World!"), ("cc/1", "hello world"), ("cc/3", "Something else.")])
    counts = dedup.run(ctx)
    assert counts == {"rows_in": 3, "rows_out": 2, "exact_duplicates": 1}
    expected = spark.createDataFrame(
        [
            ("cc/1", "cc/1", True, "representative"),
            ("cc/2", "cc/1", False, "exact"),
            ("cc/3", "cc/3", True, "representative"),
        ],
        "doc_key string, cluster_id string, is_representative boolean, reason string",
    )
    assertDataFrameEqual(_decisions(ctx), expected)


def test_incremental_run_keeps_old_representative_and_decides_only_new_docs(make_ctx, spark):
    ctx = make_ctx()
    add_documents(ctx, [("cc/5", "The same page.")])
    dedup.run(ctx)
    # a new copy with a smaller key must not displace the representative already chosen
    add_documents(ctx, [("cc/0", "the same page"), ("cc/7", "A new page.")])
    counts = dedup.run(ctx)
    assert counts == {"rows_in": 2, "rows_out": 1, "exact_duplicates": 1}
    rows = {r["doc_key"]: r for r in _decisions(ctx).collect()}
    assert rows["cc/5"]["is_representative"] and not rows["cc/0"]["is_representative"]
    assert rows["cc/0"]["cluster_id"] == "cc/5"
    assert dedup.run(ctx) == {"rows_in": 0, "rows_out": 0, "exact_duplicates": 0}
