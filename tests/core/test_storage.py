"""Listing inputs through Arrow's filesystems: what Spark's own listing hides (names starting with `_`
or `.`) is seen, and globs select as Hadoop's do."""

from __future__ import annotations

import pytest

from backforth_spark.core import storage
from backforth_spark.core.dolma import glob_regex

FILES = ("a/x.jsonl.gz", "a/_SUCCESS", "a/.x.jsonl.gz.crc", "b/deep/y.json.zst", "c/notes.txt", "top.jsonl")


@pytest.fixture
def tree(tmp_path):
    for name in FILES:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("", ["_SUCCESS", ".x.jsonl.gz.crc", "x.jsonl.gz", "y.json.zst", "notes.txt", "top.jsonl"]),
        ("/a", ["_SUCCESS", ".x.jsonl.gz.crc", "x.jsonl.gz"]),
        ("/{a,c}", ["_SUCCESS", ".x.jsonl.gz.crc", "x.jsonl.gz", "notes.txt"]),
        ("/*/*.gz", ["x.jsonl.gz"]),  # a component's * stops at the next /
        ("/b/*", ["y.json.zst"]),  # a folder the glob names brings what is under it
        ("/top.jsonl", ["top.jsonl"]),
        ("/absent", []),
    ],
)
def test_names_under_a_path_folder_or_glob_include_hidden_files(tree, pattern, expected):
    assert sorted(storage.names_under(f"{tree}{pattern}", glob_regex)) == sorted(expected)


def test_a_file_uri_lists_as_its_path_does(tree):
    assert storage.names_under(f"file:{tree}/c", glob_regex) == ["notes.txt"]
