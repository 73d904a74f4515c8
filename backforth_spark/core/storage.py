"""Files of the workdir, by URI: a local path or any filesystem Arrow knows (s3/s3a, gs, abfs, hdfs).

Tables and data files go through Spark; the driver's own few files (the dataset card, the export's
pointer, a run summary) and the removal of a run's staging go through Arrow's filesystems here, never
`os`, `shutil` or `open`, so the workdir may be an object store no executor shares a disk with.

Arrow's, not fsspec's: pyarrow is already a dependency (Spark's pandas UDFs need it), its filesystems
cover S3 (with the AWS SDK's own credential chain: the standard environment variables, `AWS_ENDPOINT_URL`
included, profiles, instance roles), GCS, Azure and HDFS without a package per store, and the ingest
workers open their inputs with it already.

Spark and Arrow spell some locations differently: Hadoop's S3 connector is `s3a://` where Arrow's is
`s3://`; Databricks serves `dbfs:/X` to Python at `/dbfs/X`, except Unity Catalog Volumes, which Spark may
list as `dbfs:/Volumes/...` and which live at `/Volumes/...`.
"""

from __future__ import annotations

import contextlib
import os
import re

import pyarrow as pa
import pyarrow.fs as pafs


def is_local(uri: str) -> bool:
    """Whether `uri` is a path on this machine's disk (a plain path or a `file:` URI)."""
    scheme, colon, _ = uri.partition(":")
    return not colon or uri.startswith("/") or len(scheme) == 1 or scheme == "file"


# Stores whose renames copy and delete, object by object: a rename there is neither atomic nor cheap
OBJECT_STORE_SCHEMES = frozenset(
    {"s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "wasb", "wasbs", "adl", "oss", "cos", "dbfs"}
)


def is_object_store(uri: str) -> bool:
    """Whether `uri` names an object store (S3, GCS, Azure, DBFS), not a disk or HDFS."""
    return not is_local(uri) and uri.partition(":")[0].lower() in OBJECT_STORE_SCHEMES


def absolute(uri: str) -> str:
    """`uri` with a local path made absolute (`~` expanded); any other URI as given, less a final `/`."""
    if not is_local(uri):
        return uri.rstrip("/") if not uri.endswith(":/") else uri
    path = split_uri(uri)[1]
    return os.path.abspath(os.path.expanduser(path))


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended, `/`-separated (also for a local path)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def split_uri(uri: str) -> tuple[str | None, str]:
    """(what Arrow's `FileSystem.from_uri` gets, the path in that filesystem) for a location as Spark
    spells it; None for a local file. Spark's paths are not percent-encoded (a file named `a b%20#1.jsonl`
    is listed as `file:/in/a b%20#1.jsonl`), which Arrow's URI parser refuses or decodes, so only the
    scheme and authority go through it and the path is kept as given."""
    if uri.startswith("dbfs:/"):  # Databricks: Volumes at /Volumes, the rest of DBFS at /dbfs
        rest = "/" + uri.removeprefix("dbfs:").lstrip("/")
        return None, rest if rest.startswith("/Volumes/") else "/dbfs" + rest
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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Arrow's filesystem for `uri` and the path in it."""
    root, path = split_uri(uri)
    if root is None:
        return pafs.LocalFileSystem(), path
    # Arrow names paths its own way (s3 and gs: "bucket/key", hdfs: "/path"): ask it for a probe path
    # under the root, then put the given path in the probe's place
    fs, probe = pafs.FileSystem.from_uri(f"{root}/_")
    return fs, probe[:-1] + path


class StorageError(ValueError):
    """A location this machine cannot use: no filesystem for its scheme, or the store refused or could
    not be reached. The message names the location and what to install or set, never a credential."""


# what to install or set for a store that cannot be reached, by Arrow's scheme
_HOW = {
    "s3": "the endpoint and credentials any S3 tool reads (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
    "AWS_SECRET_ACCESS_KEY, AWS_REGION, a profile or an instance role)",
    "gs": "Google credentials (GOOGLE_APPLICATION_CREDENTIALS or the machine's service account)",
    "abfs": "Azure credentials (AZURE_STORAGE_ACCOUNT_NAME with a key, or DefaultAzureCredential's)",
    "abfss": "Azure credentials (AZURE_STORAGE_ACCOUNT_NAME with a key, or DefaultAzureCredential's)",
    "hdfs": "Hadoop's client (HADOOP_HOME, CLASSPATH) and the namenode's address",
}


def check_reachable(uri: str) -> None:
    """Raise StorageError (one line) unless Arrow can open `uri`'s filesystem and look at `uri` there."""
    root, _ = split_uri(uri)
    scheme = (root or "file:").split(":")[0]
    try:
        fs, path = filesystem(uri)
        fs.get_file_info(path)
    except pa.ArrowInvalid as exc:  # a scheme Arrow has no filesystem for
        raise StorageError(
            f"{uri}: no filesystem for scheme {scheme!r} here ({_first_line(exc)}); use a local path or "
            "an s3://, s3a://, gs://, abfs(s)://, hdfs:// or dbfs:/ URI"
        ) from None
    except Exception as exc:  # refused credentials, an unknown bucket, an unreachable endpoint
        how = _HOW.get(scheme, "its credentials")
        raise StorageError(f"{uri} cannot be reached ({_first_line(exc)}); set {how}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def write_text(uri: str, text: str) -> None:
    """Write `text` (UTF-8) to the file at `uri`, replacing it: one object PUT on an object store, so a
    reader sees the old file or the new one, never half of one."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path), recursive=True)
        # a local file replaced by a rename, as an object store replaces an object
        tmp = f"{path}.{os.getpid()}.tmp"
        with fs.open_output_stream(tmp) as out:
            out.write(text.encode("utf-8"))
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as out:
        out.write(text.encode("utf-8"))


def read_text(uri: str) -> str | None:
    """The text of the file at `uri`, or None when there is none."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode("utf-8")
    except FileNotFoundError:
        return None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def subfolders(uri: str) -> list[str]:
    """The names of the folders directly under `uri` (none when it does not exist)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def file_names(uri: str) -> list[str]:
    """The names of the files directly under `uri`, sorted (none when it does not exist)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)


def delete_dir(uri: str) -> None:
    """Remove the folder at `uri` and everything under it; nothing when it is not there."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


_GLOB_CHARS = re.compile(r"[*?{]")


def names_under(pattern: str, component_regex) -> list[str]:
    """The names of the files under what `pattern` names (a file, a folder, or a Hadoop-style glob
    whose components may hold `*`, `?` and `{a,b}`), recursively and hidden files included (Spark's
    own listing skips names that start with `_` or `.`). `component_regex` turns one glob component
    into a compiled regular expression (backforth_spark.core.dolma.glob_regex)."""
    fs, path = filesystem(absolute(pattern) if is_local(pattern) else pattern)
    parts = path.split("/")
    first = next((i for i, part in enumerate(parts) if _GLOB_CHARS.search(part)), len(parts))
    base = "/".join(parts[:first]) or "/"
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return [info.base_name] if first == len(parts) else []
    if info.type != pafs.FileType.Directory:
        return []
    below = [component_regex(part) for part in parts[first:]]
    names = []
    for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        rel = f.path[len(base) :].lstrip("/").split("/")
        # the file itself matches the glob's components, or sits under a folder that does
        matches = len(rel) >= len(below) and all(rx.match(p) for rx, p in zip(below, rel, strict=False))
        if f.type == pafs.FileType.File and matches:
            names.append(f.base_name)
    return names
