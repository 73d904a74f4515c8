"""Python-worker side of `dedup`: the normalised-text hash as a vectorised UDF."""

from __future__ import annotations

import pandas as pd
from pyspark.sql.functions import pandas_udf

from backforth_spark.text import norm_hash


@pandas_udf("string")
def norm_hash_udf(text: pd.Series) -> pd.Series:
    return text.map(norm_hash)
