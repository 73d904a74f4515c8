"""Python-worker side of `ingest`: file bytes in, parsed lines out."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pandas as pd

from backforth_spark.config import IngestConfig
from backforth_spark.dolma import PARSED_COLUMNS, parse_file

# Flush a batch to Spark after this many rows or characters of text, whichever first,
# so one huge file never sits in a Python worker as a single DataFrame.
_MAX_ROWS = 2_000
_MAX_CHARS = 64 * 1024 * 1024


def parse_files(cfg: IngestConfig) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        rows: list[dict] = []
        chars = 0
        for batch in batches:
            for path, content in zip(batch["path"], batch["content"], strict=True):
                for parsed in parse_file(path, bytes(content), cfg):
                    rows.append(parsed.as_row())
                    chars += len(parsed.text or "")
                    if len(rows) >= _MAX_ROWS or chars >= _MAX_CHARS:
                        yield pd.DataFrame(rows, columns=PARSED_COLUMNS)
                        rows, chars = [], 0
        if rows:
            yield pd.DataFrame(rows, columns=PARSED_COLUMNS)

    return run
