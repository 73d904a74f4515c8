"""Python-worker side of `ingest`: file paths in, parsed lines out, each file streamed as it is read."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

import pandas as pd

from backforth_spark.core.config import IngestConfig
from backforth_spark.core.dolma import PARSED_COLUMNS, UNREADABLE_FILE, ParsedLine, parse_file
from backforth_spark.core.storage import filesystem

# Flush a batch to Spark after this many rows (or the stage's bytes of text, whichever first), so one
# huge file never sits in a Python worker as a single DataFrame.
_MAX_ROWS = 2_000
_READ_BUFFER = 1 << 20


def open_input(uri: str) -> BinaryIO:
    """A stream of the file at `uri` (a path as Spark lists it), read as it is consumed: local paths
    and `file:` URIs, and the filesystems Arrow knows (s3, gs, hdfs, abfs). Spark's `s3a://` is Arrow's
    `s3://`; `dbfs:/` is read through the /dbfs mount Databricks clusters have (Volumes at /Volumes)."""
    fs, path = filesystem(uri)
    return fs.open_input_stream(path, compression=None, buffer_size=_READ_BUFFER)


def _lines_of(path: str, cfg: IngestConfig) -> Iterator[ParsedLine]:
    try:
        stream = open_input(path)
    except Exception as exc:  # gone since it was listed, no permission, a filesystem Arrow cannot open
        yield ParsedLine("quarantine", path, 1, reason=UNREADABLE_FILE, detail=f"{type(exc).__name__}: {exc}")
        return
    with stream:
        yield from parse_file(path, stream, cfg)


def parse_files(
    cfg: IngestConfig, batch_chars: int
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas: (path) -> parsed lines, in batches of up to 2,000 rows or `batch_chars` characters
    of text. Each file is streamed line by line, so neither its size nor Spark's 2 GB value limit
    bounds it."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        rows: list[dict] = []
        chars = 0
        for batch in batches:
            for path in batch["path"]:
                for parsed in _lines_of(path, cfg):
                    rows.append(parsed.as_row())
                    chars += len(parsed.text or "")
                    if len(rows) >= _MAX_ROWS or chars >= batch_chars:
                        yield pd.DataFrame(rows, columns=PARSED_COLUMNS)
                        rows, chars = [], 0
        if rows:
            yield pd.DataFrame(rows, columns=PARSED_COLUMNS)

    return run
