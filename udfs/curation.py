"""Python-worker side of `export`: the curation checks and the source-copy rate of each pair."""

from __future__ import annotations

import pandas as pd
from pyspark.sql.functions import pandas_udf

# type objects, not DDL strings: parsing a string needs a live SparkContext at import. The UDFs are made
# when a stage asks for them (pyspark binds a UDF to classic or Spark Connect when it is made)
from pyspark.sql.types import DoubleType, StringType

from backforth_spark.core.config import CurateConfig
from backforth_spark.core.curate import response_issue, source_copy_rate


def response_issue_udf(cfg: CurateConfig):
    """A pandas UDF over (instruction, response, passage): the failed check's name per row, or null."""

    @pandas_udf(StringType())
    def run(instruction: pd.Series, response: pd.Series, passage: pd.Series) -> pd.Series:
        return pd.Series(
            [
                response_issue(i or "", r or "", cfg, p or "")
                for i, r, p in zip(instruction, response, passage, strict=True)
            ],
            dtype=object,
        )

    return run


def source_copy_udf():
    """A pandas UDF over (response, passage): the share of each response's word trigrams found in its
    passage."""

    @pandas_udf(DoubleType())
    def run(response: pd.Series, passage: pd.Series) -> pd.Series:
        return pd.Series(
            [round(source_copy_rate(r or "", p or ""), 4) for r, p in zip(response, passage, strict=True)]
        )

    return run
