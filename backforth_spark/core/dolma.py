"""Reading Dolma files: one JSON document per line, optionally gzip or zstd compressed (pure Python).

Every line becomes a document or a quarantine record saying why not; parsing never raises. The
`ingest` stage (backforth_spark/spark/stages/ingest.py) runs this in Spark and accounts for every line:
lines = new documents + quarantined + repeated (source, id).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from backforth_spark.core.config import IngestConfig

# Reasons a line is quarantined.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_ID = "missing_id"
MISSING_TEXT = "missing_text"
NON_STRING_TEXT = "non_string_text"
INVALID_UTF8 = "invalid_utf8"
UNENCODABLE_TEXT = "unencodable_text"  # JSON escapes UTF-8 cannot carry (a lone surrogate such as \ud800)
EMPTY_TEXT = "empty_text"
BLANK_LINE = "blank_line"
UNREADABLE_FILE = "unreadable_file"
# valid JSON beyond what Python's reader holds: nesting deeper than its recursion limit, an integer of
# more than 4,300 digits
UNREADABLE_JSON = "unreadable_json"
LINE_TOO_LONG = "line_too_long"  # more bytes than ingest.max_line_bytes: never held in memory whole
UNEXPECTED_ERROR = "unexpected_error"  # a failure no other reason names: the line, not the file, is lost

PARSED_COLUMNS = [
    "kind",  # "doc" or "quarantine"
    "doc_key",
    "source",
    "id",
    "text",
    "added",
    "created",
    "metadata",
    "url",
    "input_file",
    "line_number",
    "reason",
    "detail",
    "raw_prefix",
]


@dataclass(frozen=True)
class ParsedLine:
    kind: str
    input_file: str
    line_number: int
    doc_key: str | None = None
    source: str | None = None
    id: str | None = None
    text: str | None = None
    added: str | None = None
    created: str | None = None
    metadata: str | None = None
    url: str | None = None
    reason: str | None = None
    detail: str | None = None
    raw_prefix: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in PARSED_COLUMNS}


def open_lines(path: str, data: bytes | BinaryIO, max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Yield (raw line, its length in bytes) for each line of a Dolma file (its bytes, or a binary stream
    read as it goes), decompressing by extension. A line longer than `max_bytes` comes as its first
    `max_bytes` bytes with its full length: memory holds at most one bounded line and the codec's
    buffers, whatever the file's or the line's size."""
    raw: BinaryIO = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    if path.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
    elif path.endswith(".zst"):
        raw = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    elif not isinstance(raw, io.BytesIO):
        # Arrow's streams claim io.BufferedIOBase but cannot read lines: a buffered reader over them can
        raw = io.BufferedReader(raw)
    # room for the limit and a "\r\n": a line the limit long is read whole
    while line := raw.readline(max_bytes + 2):
        if line.endswith(b"\n") or len(line) < max_bytes + 2:  # the whole line (or the file's last)
            line = line.rstrip(b"\r\n")
            yield line[:max_bytes], len(line)
            continue
        # too long: read on to the line's end in bounded pieces, keeping only its start
        size, tail = len(line), line
        while not tail.endswith(b"\n") and (piece := raw.readline(max_bytes + 2)):
            size, tail = size + len(piece), tail[-1:] + piece  # a "\r\n" may straddle two reads
        yield line[:max_bytes], size - (2 if tail.endswith(b"\r\n") else 1 if tail.endswith(b"\n") else 0)


_BOM = b"\xef\xbb\xbf"
# A lone surrogate can only come from a \uD800-\uDFFF escape: the line itself decoded as UTF-8
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def glob_regex(file_glob: str) -> re.Pattern[str]:
    """A file-name glob with {a,b} alternatives (Hadoop's syntax) as a regular expression."""
    out, i = [], 0
    while i < len(file_glob):
        c = file_glob[i]
        if c == "{":
            end = file_glob.index("}", i)
            out.append("(?:" + "|".join(re.escape(x) for x in file_glob[i + 1 : end].split(",")) + ")")
            i = end + 1
            continue
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _escape(part: str) -> str:
    # "%" first, so an escaped "/" cannot be confused with a literal "%2F"
    return part.replace("%", "%25").replace("/", "%2F")


def doc_key(source: str, doc_id: str) -> str:
    """The document's key: `<source>/<id>` with "%" and "/" percent-escaped in each part. Injective in
    (source, id): the only unescaped "/" separates the two, and escaping is reversible. Readable:
    ("cc", "a") -> "cc/a"; ("cc/news", "a") -> "cc%2Fnews/a"; ("cc", "news/a") -> "cc/news%2Fa"."""
    return f"{_escape(source)}/{_escape(doc_id)}"


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def parse_line(path: str, line_number: int, raw: bytes, cfg: IngestConfig) -> ParsedLine:
    """One Dolma line -> a document, or a quarantine record saying why not. Never raises."""

    def bad(reason: str, detail: str) -> ParsedLine:
        prefix = raw[: cfg.raw_prefix_chars].decode("utf-8", errors="replace")
        return ParsedLine("quarantine", path, line_number, reason=reason, detail=detail, raw_prefix=prefix)

    if raw.startswith(_BOM):  # a byte-order mark, common in files written on some platforms
        raw = raw[len(_BOM) :]
    if not raw.strip():
        return bad(BLANK_LINE, "the line is empty")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return bad(INVALID_UTF8, str(exc))
    try:
        obj = json.loads(line)
        # JSON may escape code points UTF-8 cannot encode (lone surrogates); Arrow and Delta cannot hold
        # them. Checked by encoding the parsed values, only for a line with a surrogate's escape in it
        # (a pair is fine): that costs as much as parsing, and web text rarely has one.
        if _SURROGATE_ESCAPE.search(line):
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as exc:
        return bad(MALFORMED_JSON, str(exc))
    except UnicodeEncodeError as exc:
        return bad(UNENCODABLE_TEXT, f"{exc.reason} at position {exc.start} of a decoded value")
    except (ValueError, RecursionError) as exc:  # [[[[... thousands deep, or a 5,000-digit number
        return bad(UNREADABLE_JSON, f"{type(exc).__name__}: {exc}")
    if not isinstance(obj, dict):
        return bad(NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    doc_id = obj.get("id")
    if doc_id is None or isinstance(doc_id, (dict, list, bool)) or str(doc_id) == "":
        return bad(MISSING_ID, "no usable 'id' field")
    if "text" not in obj or obj["text"] is None:
        return bad(MISSING_TEXT, "no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        return bad(NON_STRING_TEXT, f"'text' is a {type(text).__name__}")
    if not text.strip():
        return bad(EMPTY_TEXT, "'text' is empty or whitespace only")
    source = obj.get("source")
    source = source if isinstance(source, str) and source else cfg.default_source
    metadata = obj.get("metadata")
    url = metadata.get("url") if isinstance(metadata, dict) else None
    doc_id = doc_id if isinstance(doc_id, str) else json.dumps(doc_id)
    return ParsedLine(
        "doc",
        path,
        line_number,
        doc_key=doc_key(source, doc_id),
        source=source,
        id=doc_id,
        text=text,
        added=_opt_str(obj.get("added")),
        created=_opt_str(obj.get("created")),
        metadata=None if metadata is None else json.dumps(metadata, ensure_ascii=False),
        url=url if isinstance(url, str) else None,
    )


def parse_file(path: str, data: bytes | BinaryIO, cfg: IngestConfig) -> Iterator[ParsedLine]:
    """All lines of one file (its bytes or a stream), numbered from 1. A file that cannot be read to its
    end (cut short, corrupt) keeps the lines read before the damage, then one quarantine row saying
    where reading stopped."""
    lines = open_lines(path, data, cfg.max_line_bytes)
    line_number = 0
    while True:
        try:
            raw, size = next(lines)
        except StopIteration:
            return
        except MemoryError:  # the worker's shortage, not the file's: the stage fails and says so
            raise
        except Exception as exc:  # a truncated gzip, a corrupt zstd frame
            yield ParsedLine(
                "quarantine",
                path,
                line_number + 1,
                reason=UNREADABLE_FILE,
                detail=f"{type(exc).__name__}: {exc} (after line {line_number})",
            )
            return
        line_number += 1
        yield _parsed(path, line_number, raw, size, cfg)


def _parsed(path: str, line_number: int, raw: bytes, size: int, cfg: IngestConfig) -> ParsedLine:
    """`parse_line`, for a line that may have come cut to ingest.max_line_bytes; whatever goes wrong
    with one line costs that line, never the rest of its file."""
    prefix = raw[: cfg.raw_prefix_chars].decode("utf-8", errors="replace")
    if size > len(raw):
        detail = f"the line has {size} bytes; ingest.max_line_bytes is {cfg.max_line_bytes}"
        return ParsedLine(
            "quarantine", path, line_number, reason=LINE_TOO_LONG, detail=detail, raw_prefix=prefix
        )
    try:
        return parse_line(path, line_number, raw, cfg)
    except MemoryError:  # the worker's shortage, not the line's: quarantined, a good line would be lost
        raise
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        return ParsedLine(
            "quarantine", path, line_number, reason=UNEXPECTED_ERROR, detail=detail, raw_prefix=prefix
        )
