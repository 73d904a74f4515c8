"""Python-worker side of `export`: the curation checks on each (instruction, response) pair."""

from __future__ import annotations

import pandas as pd
from pyspark.sql.functions import pandas_udf

# type objects, not DDL strings: parsing a string needs a live SparkContext at import
from pyspark.sql.types import StringType

from backforth_spark.config import CurateConfig
from backforth_spark.curate import response_issue


def response_issue_udf(cfg: CurateConfig):
    """A pandas UDF: the failed check's name per row, or null."""

    @pandas_udf(StringType())
    def run(instruction: pd.Series, response: pd.Series) -> pd.Series:
        return pd.Series(
            [response_issue(i or "", r or "", cfg) for i, r in zip(instruction, response, strict=True)],
            dtype=object,
        )

    return run
