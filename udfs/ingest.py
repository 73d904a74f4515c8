"""Python-worker side of `ingest`: file paths in, parsed lines out, each file streamed as it is read."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

import pandas as pd
import pyarrow.fs as pafs

from backforth_spark.config import IngestConfig
from backforth_spark.dolma import PARSED_COLUMNS, UNREADABLE_FILE, ParsedLine, parse_file

# Flush a batch to Spark after this many rows or characters of text, whichever first,
# so one huge file never sits in a Python worker as a single DataFrame.
_MAX_ROWS = 2_000
_MAX_CHARS = 64 * 1024 * 1024
_READ_BUFFER = 1 << 20


def split_uri(uri: str) -> tuple[str | None, str]:
    """(what Arrow's `FileSystem.from_uri` gets, the path in that filesystem) for a file path as Spark
    lists it; None for a local file. Spark's paths are not percent-encoded (a file named `a b%20#1.jsonl`
    is listed as `file:/in/a b%20#1.jsonl`), which Arrow's URI parser refuses or decodes, so only the
    scheme and authority go through it and the path is kept as listed."""
    if uri.startswith("dbfs:/"):  # read through the /dbfs mount Databricks clusters have
        return None, "/dbfs/" + uri.removeprefix("dbfs:/").lstrip("/")
    scheme, colon, rest = uri.partition(":")
    if not colon or uri.startswith("/") or len(scheme) == 1:  # a plain path (C:\... too)
        return None, uri
    if scheme == "file":  # file:/p (Hadoop's form), file:///p, file://localhost/p
        if rest.startswith("//"):
            rest = "/" + rest[2:].partition("/")[2]
        return None, rest
    if scheme in ("s3a", "s3n"):  # Spark's S3 connectors; Arrow's is s3
        scheme = "s3"
    authority, _, path = rest.removeprefix("//").partition("/")
    return f"{scheme}://{authority}", path


def open_input(uri: str) -> BinaryIO:
    """A stream of the file at `uri` (a path as Spark lists it), read as it is consumed: local paths
    and `file:` URIs, and the filesystems Arrow knows (s3, gs, hdfs, abfs). Spark's `s3a://` is Arrow's
    `s3://`; `dbfs:/` is read through the /dbfs mount Databricks clusters have."""
    root, path = split_uri(uri)
    if root is None:
        fs: pafs.FileSystem = pafs.LocalFileSystem()
    else:
        # Arrow names paths its own way (s3 and gs: "bucket/key", hdfs: "/path"): ask it for a probe
        # path under the root, then put the listed path in the probe's place
        fs, probe = pafs.FileSystem.from_uri(f"{root}/_")
        path = probe[:-1] + path
    return fs.open_input_stream(path, compression=None, buffer_size=_READ_BUFFER)


def _lines_of(path: str, cfg: IngestConfig) -> Iterator[ParsedLine]:
    try:
        stream = open_input(path)
    except Exception as exc:  # gone since it was listed, no permission, a filesystem Arrow cannot open
        yield ParsedLine("quarantine", path, 1, reason=UNREADABLE_FILE, detail=f"{type(exc).__name__}: {exc}")
        return
    with stream:
        yield from parse_file(path, stream, cfg)


def parse_files(cfg: IngestConfig) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas: (path) -> parsed lines. Each file is streamed line by line, so neither its size nor
    Spark's 2 GB value limit bounds it."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        rows: list[dict] = []
        chars = 0
        for batch in batches:
            for path in batch["path"]:
                for parsed in _lines_of(path, cfg):
                    rows.append(parsed.as_row())
                    chars += len(parsed.text or "")
                    if len(rows) >= _MAX_ROWS or chars >= _MAX_CHARS:
                        yield pd.DataFrame(rows, columns=PARSED_COLUMNS)
                        rows, chars = [], 0
        if rows:
            yield pd.DataFrame(rows, columns=PARSED_COLUMNS)

    return run
