import gzip
import json
from dataclasses import replace

import pytest
import zstandard

from backforth_spark.core import dolma as ingest
from backforth_spark.core import schemas as t
from backforth_spark.core.config import IngestConfig
from backforth_spark.spark.stages import ingest as ingest_stage
from backforth_spark.spark.tables import struct

CFG = IngestConfig()


def _doc(i, text="Some text.", source="cc"):
    return json.dumps({"id": str(i), "text": text, "source": source, "metadata": {"url": f"http://x/{i}"}})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", ingest.MALFORMED_JSON),
        (b"[1, 2]", ingest.NOT_AN_OBJECT),
        (b'{"text": "no id"}', ingest.MISSING_ID),
        (b'{"id": "1"}', ingest.MISSING_TEXT),
        (b'{"id": "1", "text": 42}', ingest.NON_STRING_TEXT),
        (b'{"id": "1", "text": "caf\xe9"}', ingest.INVALID_UTF8),
        (b'{"id": "1", "text": "  \\n "}', ingest.EMPTY_TEXT),
        (b"   ", ingest.BLANK_LINE),
        (b'{"id": "1", "text": "lone \\ud800 surrogate"}', ingest.UNENCODABLE_TEXT),  # JSON allows it
        (b'{"id": "\\udfff", "text": "fine"}', ingest.UNENCODABLE_TEXT),
        (b'{"id": "1", "text": "ok", "metadata": {"k": "\\ud83d"}}', ingest.UNENCODABLE_TEXT),
        (b'{"id": "1", "text": "upper \\uDBFF case"}', ingest.UNENCODABLE_TEXT),
        (b'{"id": "1", "text": "ok", "\\uDC00key": 1}', ingest.UNENCODABLE_TEXT),  # in a key
        (b'{"id": "1", "text": "reversed \\ude00\\ud83d pair"}', ingest.UNENCODABLE_TEXT),
        (b'{"id": true, "text": "a bool is no id"}', ingest.MISSING_ID),
        (b'{"id": ["a"], "text": "a list is no id"}', ingest.MISSING_ID),
    ],
)
def test_bad_lines_are_quarantined_with_a_reason(raw, reason):
    parsed = ingest.parse_line("f.jsonl", 7, raw, CFG)
    assert (parsed.kind, parsed.reason, parsed.line_number) == ("quarantine", reason, 7)
    assert parsed.detail


def test_surrogate_pairs_and_escaped_backslashes_are_documents():
    pair = ingest.parse_line("f.jsonl", 1, b'{"id": "1", "text": "smile \\ud83d\\ude00 ok"}', CFG)
    assert (pair.kind, pair.text) == ("doc", "smile \U0001f600 ok")
    # an escaped backslash then "ud800": the text holds those six characters, no surrogate
    literal = ingest.parse_line("f.jsonl", 2, b'{"id": "1", "text": "path \\\\ud800 x"}', CFG)
    assert (literal.kind, literal.text) == ("doc", "path \\ud800 x")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id": "1", "text": "x", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"id": ' + b"9" * 5_000 + b', "text": "an id longer than Python reads"}',
        b'{"id": "1", "text": "x", "metadata": {"n": ' + b"7" * 5_000 + b"}}",
    ],
    ids=["nested-metadata", "nested-array", "long-integer-id", "long-integer-metadata"],
)
def test_valid_json_python_cannot_hold_is_quarantined_not_raised(raw):
    parsed = ingest.parse_line("f.jsonl", 3, raw, CFG)
    assert (parsed.kind, parsed.reason, parsed.line_number) == ("quarantine", ingest.UNREADABLE_JSON, 3)
    assert parsed.detail.startswith(("RecursionError", "ValueError"))


def test_good_line_becomes_a_document_with_url_and_metadata():
    parsed = ingest.parse_line("f.jsonl", 1, _doc(3).encode(), CFG)
    assert parsed.kind == "doc"
    assert (parsed.source, parsed.id, parsed.url) == ("cc", "3", "http://x/3")
    assert json.loads(parsed.metadata) == {"url": "http://x/3"}


@pytest.mark.parametrize(
    ("raw", "doc_id", "text"),
    [
        (b'\xef\xbb\xbf{"id": "bom", "text": "after a byte-order mark"}', "bom", "after a byte-order mark"),
        (b'{"id": 7, "text": "a number id"}', "7", "a number id"),
        (b'{"id": 7.5, "text": "a float id"}', "7.5", "a float id"),
        (
            b'{"id": "nul", "text": "a NUL \\u0000 and \\u0007 controls"}',
            "nul",
            "a NUL \x00 and \x07 controls",
        ),
        (
            b'{"id": "pair", "text": "an emoji \\ud83d\\ude00 in escapes"}',
            "pair",
            "an emoji \U0001f600 in escapes",
        ),
    ],
)
def test_odd_but_valid_lines_become_documents(raw, doc_id, text):
    parsed = ingest.parse_line("f.jsonl", 1, raw, CFG)
    assert (parsed.kind, parsed.id, parsed.text) == ("doc", doc_id, text)


def test_document_keys_are_injective_and_readable():
    pairs = [("cc/news", "a"), ("cc", "news/a"), ("cc", "news%2Fa"), ("cc%2Fnews", "a"), ("a", "b/c/d")]
    keys = [ingest.doc_key(source, doc_id) for source, doc_id in pairs]
    assert len(set(keys)) == len(pairs)  # all of these collided, or could, under "<source>/<id>"
    assert ingest.doc_key("cc", "a") == "cc/a"
    assert keys[:2] == ["cc%2Fnews/a", "cc/news%2Fa"]


def test_missing_source_gets_the_configured_default():
    parsed = ingest.parse_line("f", 1, b'{"id": 5, "text": "hi"}', CFG)
    assert (parsed.source, parsed.id) == ("unknown", "5")


def test_gzip_and_zstd_files_are_read_line_by_line():
    body = (_doc(1) + "\n" + _doc(2) + "\n").encode()
    for path, data in [
        ("a.jsonl.gz", gzip.compress(body)),
        ("a.json.zst", zstandard.ZstdCompressor().compress(body)),
        ("a.jsonl", body),
    ]:
        parsed = list(ingest.parse_file(path, data, CFG))
        assert [p.id for p in parsed] == ["1", "2"], path
        assert [p.line_number for p in parsed] == [1, 2]


def test_a_truncated_gzip_is_one_quarantine_row_after_the_lines_read():
    data = gzip.compress(("\n".join(_doc(i) for i in range(200)) + "\n").encode())[:-40]
    parsed = list(ingest.parse_file("a.jsonl.gz", data, CFG))
    assert parsed[-1].reason == ingest.UNREADABLE_FILE
    assert all(p.kind == "doc" for p in parsed[:-1])


@pytest.mark.parametrize("path", ["a.jsonl", "a.jsonl.gz", "a.json.zst"])
def test_a_line_over_the_limit_is_quarantined_and_the_file_read_on(path):
    cfg = IngestConfig(max_line_bytes=1024)
    long_line = _doc("long", "word " * 100_000)  # about 500 KB
    exactly = json.dumps({"id": "edge", "text": ""})
    exactly = json.dumps({"id": "edge", "text": "z" * (1024 - len(exactly))})  # exactly the limit
    assert len(exactly.encode()) == 1024
    body = "\r\n".join([_doc(1), long_line, exactly, _doc(2)]).encode()  # no newline after the last
    codec = {"a.jsonl": bytes, "a.jsonl.gz": gzip.compress, "a.json.zst": zstandard.compress}[path]
    parsed = list(ingest.parse_file(path, codec(body), cfg))
    assert [(p.line_number, p.kind, p.reason) for p in parsed] == [
        (1, "doc", None),
        (2, "quarantine", ingest.LINE_TOO_LONG),
        (3, "doc", None),
        (4, "doc", None),
    ]
    assert parsed[1].detail == f"the line has {len(long_line)} bytes; ingest.max_line_bytes is 1024"
    assert parsed[1].raw_prefix == long_line[: CFG.raw_prefix_chars]
    assert parsed[2].id == "edge" and parsed[3].id == "2"


def test_a_line_that_breaks_the_parser_costs_that_line_not_the_rest_of_the_file(monkeypatch):
    real = ingest.parse_line

    def breaks_on_the_second(path, line_number, raw, cfg):
        if line_number == 2:
            raise LookupError("a failure no reason names")
        return real(path, line_number, raw, cfg)

    monkeypatch.setattr(ingest, "parse_line", breaks_on_the_second)
    body = "\n".join(_doc(i) for i in range(4)).encode()
    parsed = list(ingest.parse_file("a.jsonl", body, CFG))
    assert [(p.line_number, p.kind, p.reason) for p in parsed] == [
        (1, "doc", None),
        (2, "quarantine", ingest.UNEXPECTED_ERROR),
        (3, "doc", None),
        (4, "doc", None),
    ]
    assert parsed[1].detail == "LookupError: a failure no reason names"


def test_a_worker_out_of_memory_fails_the_stage_instead_of_quarantining_a_good_line(monkeypatch):
    real = ingest.parse_line

    def short_of_memory_on_the_second(path, line_number, raw, cfg):
        if line_number == 2:
            raise MemoryError
        return real(path, line_number, raw, cfg)

    monkeypatch.setattr(ingest, "parse_line", short_of_memory_on_the_second)
    body = "\n".join(_doc(i) for i in range(4)).encode()
    with pytest.raises(MemoryError):
        list(ingest.parse_file("a.jsonl", body, CFG))


def _write_corpus(folder):
    folder.mkdir()
    good = [_doc(i, f"Document number {i}. " * 5) for i in range(5)]
    bad = [
        b"{oops",
        b'{"text": "no id here"}',
        b'{"id": "x1", "text": ["a", "list"]}',
        b'{"id": "x2", "text": "bad \xff byte"}',
        b'{"id": "x3", "text": "   "}',
    ]
    repeated = _doc(0, "A different text under an id already seen.")
    lines = [g.encode() for g in good[:3]] + bad + [repeated.encode()]
    (folder / "part-0.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "part-1.jsonl.gz").write_bytes(gzip.compress(("\n".join(good[3:]) + "\n").encode()))
    (folder / "notes.txt").write_text("not a Dolma file, must be ignored\n")
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-0.jsonl.crc").write_bytes(b"crc")
    return 3 + len(bad) + 1 + 2


def test_ingest_accounts_for_every_line_and_is_idempotent(make_ctx, tmp_path):
    n_lines = _write_corpus(tmp_path / "in")
    ctx = make_ctx()
    counts = ingest_stage.run(replace(ctx, inputs=(str(tmp_path / "in"),)))
    assert counts["lines"] == n_lines == 11
    assert (counts["documents"], counts["quarantined"], counts["repeated_ids"]) == (5, 5, 1)
    assert counts["lines"] == counts["documents"] + counts["quarantined"] + counts["repeated_ids"]
    assert counts["skipped_files"] == 3  # notes.txt, _SUCCESS and a .crc file: not Dolma data

    docs = ctx.tables.read(t.DOCUMENTS)
    declared = struct((*t.DOCUMENTS_COLUMNS, *t.LINEAGE))
    assert [(f.name, f.dataType) for f in docs.schema] == [(f.name, f.dataType) for f in declared]
    first = docs.where("doc_key = 'cc/0'").collect()[0]
    # the first occurrence of a repeated id wins, deterministically
    assert (first["line_number"], first["text"].startswith("Document number 0")) == (1, True)
    reasons = sorted(r["reason"] for r in ctx.tables.read(t.QUARANTINE).collect())
    assert reasons == sorted(
        [
            ingest.MALFORMED_JSON,
            ingest.MISSING_ID,
            ingest.NON_STRING_TEXT,
            ingest.INVALID_UTF8,
            ingest.EMPTY_TEXT,
        ]
    )

    versions = [ctx.tables.version(name) for name in (t.DOCUMENTS, t.QUARANTINE, t.INPUT_FILES)]
    again = ingest_stage.run(replace(ctx, inputs=(str(tmp_path / "in"),)))
    assert (again["files_read"], again["files_known"], again["lines"]) == (0, 2, 0)
    assert ctx.tables.read(t.DOCUMENTS).count() == 5
    assert ctx.tables.read(t.QUARANTINE).count() == 5
    # nothing new to read: no commit to any table
    assert [ctx.tables.version(name) for name in (t.DOCUMENTS, t.QUARANTINE, t.INPUT_FILES)] == versions


def test_a_refresh_reads_new_and_changed_files_and_retries_an_unreadable_one(make_ctx, tmp_path):
    folder = tmp_path / "in"
    _write_corpus(folder)
    ctx = replace(make_ctx(), inputs=(str(folder),))
    ingest_stage.run(ctx)
    with (folder / "part-0.jsonl").open("ab") as f:  # a file that grew since it was read
        f.write((_doc(10, "A line added later to a file already read.") + "\n").encode())
    truncated = gzip.compress(("\n".join(_doc(i) for i in range(20, 220)) + "\n").encode())[:-40]
    (folder / "part-2.jsonl.gz").write_bytes(truncated)

    second = ingest_stage.run(ctx)
    assert (second["files_read"], second["files_known"]) == (2, 1)  # part-1 unchanged: not read
    assert second["documents"] > 100  # the added line, and the truncated file's lines before the cut
    third = ingest_stage.run(ctx)
    assert (third["files_read"], third["files_known"], third["documents"]) == (1, 2, 0)  # part-2 again
    recorded = {r["input_file"].rsplit("/", 1)[1] for r in ctx.tables.read(t.INPUT_FILES).collect()}
    assert recorded == {"part-0.jsonl", "part-1.jsonl.gz"}


def test_a_10_mb_document_goes_through(make_ctx, tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    text = ("A long paragraph of web text that goes on and on. " * 20 + "\n") * 10_000
    assert len(text) > 10_000_000
    (folder / "big.jsonl").write_text(_doc("big", text) + "\n" + _doc("small") + "\n")
    ctx = make_ctx()
    counts = ingest_stage.run(replace(ctx, inputs=(str(folder / "*.jsonl"),)))
    assert counts["documents"] == 2
    row = ctx.tables.read(t.DOCUMENTS).where("id = 'big'").selectExpr("length(text) AS n").collect()[0]
    assert row["n"] == len(text)


def test_lines_no_parser_holds_are_accounted_and_the_file_recorded_as_read(make_ctx, tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    lines = [
        _doc(1, "Before the hostile lines."),
        '{"id": "deep", "text": "x", "metadata": ' + "[" * 50_000 + "]" * 50_000 + "}",
        _doc(2, "word " * 50_000),  # over the 200 KB limit set below
        '{"id": ' + "9" * 5_000 + ', "text": "x"}',
        _doc(3, "After the hostile lines."),
    ]
    (folder / "part-0.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    ctx = make_ctx("ingest.max_line_bytes=200000", inputs=(str(folder),))
    counts = ingest_stage.run(ctx)
    assert (counts["lines"], counts["documents"], counts["quarantined"]) == (5, 2, 3)
    reasons = {r["line_number"]: r["reason"] for r in ctx.tables.read(t.QUARANTINE).collect()}
    assert reasons == {2: ingest.UNREADABLE_JSON, 3: ingest.LINE_TOO_LONG, 4: ingest.UNREADABLE_JSON}
    assert {r["id"] for r in ctx.tables.read(t.DOCUMENTS).collect()} == {"1", "3"}
    # read through: recorded, so the next run does not read it again
    assert ingest_stage.run(ctx)["files_read"] == 0


def test_ingest_without_inputs_is_a_clear_error(make_ctx):
    with pytest.raises(ValueError, match="input"):
        ingest_stage.run(make_ctx())


# ---- files of any size: streamed by the Python workers, never held whole ------------------------------


def test_a_file_is_streamed_from_its_uri_line_by_line(tmp_path):
    from udfs.ingest import open_input

    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(_doc(i) for i in range(3)) + "\n").encode()))
    for uri in (str(path), path.as_uri(), f"file:{path}"):  # a path, file:///..., Spark's file:/...
        with open_input(uri) as stream:
            parsed = list(ingest.parse_file(str(path), stream, CFG))
        assert [(p.id, p.line_number) for p in parsed] == [("0", 1), ("1", 2), ("2", 3)], uri


@pytest.mark.parametrize(
    ("uri", "split"),
    [
        ("file:/in/a b%20#1?.jsonl", (None, "/in/a b%20#1?.jsonl")),  # Spark lists paths unencoded
        ("file:///in/ünï [1].jsonl", (None, "/in/ünï [1].jsonl")),
        ("file://localhost/in/x.jsonl", (None, "/in/x.jsonl")),
        ("/in/{a}.jsonl", (None, "/in/{a}.jsonl")),
        ("s3a://bucket/dir/a b#1.jsonl.gz", ("s3://bucket", "dir/a b#1.jsonl.gz")),
        ("gs://bucket/k%2F.json", ("gs://bucket", "k%2F.json")),
        ("hdfs://nn:8020/data/a b.jsonl", ("hdfs://nn:8020", "data/a b.jsonl")),
        (
            "abfss://c@acct.dfs.core.windows.net/p/q r.jsonl",
            ("abfss://c@acct.dfs.core.windows.net", "p/q r.jsonl"),
        ),
        ("dbfs:/mnt/in/a b.jsonl", (None, "/dbfs/mnt/in/a b.jsonl")),
        # Unity Catalog Volumes, in both of Spark's spellings, live at /Volumes for Python
        ("dbfs:/Volumes/main/s/v/a.jsonl", (None, "/Volumes/main/s/v/a.jsonl")),
        ("/Volumes/main/s/v/a.jsonl", (None, "/Volumes/main/s/v/a.jsonl")),
    ],
)
def test_a_listed_path_keeps_its_characters_and_only_its_root_is_parsed(uri, split):
    from backforth_spark.core.storage import split_uri

    assert split_uri(uri) == split


def test_files_named_with_spaces_percents_and_brackets_are_read(make_ctx, tmp_path):
    folder = tmp_path / "odd names"
    folder.mkdir()
    names = ["a b.jsonl", "pct%20x.jsonl", "hash#1.jsonl", "ünï.jsonl", "q?.jsonl", "br[1].jsonl.gz",
             "brace{a}.jsonl", "back\\slash.jsonl", "colon:x.json.zst"]  # fmt: skip
    for i, name in enumerate(names):
        body = (_doc(i, f"The document in {name}.") + "\n").encode()
        body = gzip.compress(body) if name.endswith(".gz") else body
        body = zstandard.compress(body) if name.endswith(".zst") else body
        (folder / name).write_bytes(body)
    ctx = make_ctx(inputs=(str(folder),))
    counts = ingest_stage.run(ctx)
    assert (counts["files_read"], counts["documents"], counts["quarantined"]) == (len(names), len(names), 0)
    read = {r["input_file"].rsplit("/", 1)[1] for r in ctx.tables.read(t.DOCUMENTS).collect()}
    assert read == set(names)
    assert ingest_stage.run(ctx)["files_read"] == 0  # every one recorded as read


def test_a_file_gone_since_it_was_listed_is_one_quarantine_row(tmp_path):
    import pandas as pd

    from udfs.ingest import parse_files

    [out] = parse_files(CFG, 1 << 20)(iter([pd.DataFrame({"path": [f"file:{tmp_path / 'gone.jsonl'}"]})]))
    assert list(out["kind"]) == ["quarantine"] and list(out["reason"]) == [ingest.UNREADABLE_FILE]


def test_the_biggest_files_go_to_different_partitions(spark, tmp_path):
    from backforth_spark.spark.stages.ingest import spread_files

    listing = [(f"file:/f{i}", size) for i, size in enumerate([10, 5_000, 7, 9_000, 8, 6_000])]
    parts = spread_files(spark, listing).rdd.glom().map(lambda rows: [r.path for r in rows]).collect()
    assert sorted(p for part in parts for p in part) == [f"file:/f{i}" for i in range(6)]
    biggest = {"file:/f1", "file:/f3", "file:/f5"}
    assert all(len(biggest & set(part)) <= 1 for part in parts)


@pytest.mark.parametrize("broadcast_limit", [1_000_000, 0], ids=["broadcast", "ranked"])
def test_the_first_line_of_each_key_wins_whichever_way_repeats_are_dropped(
    spark, monkeypatch, broadcast_limit
):
    from pyspark.testing import assertDataFrameEqual

    monkeypatch.setattr(ingest_stage, "BROADCAST_REPEATS", broadcast_limit)
    schema = "doc_key string, input_file string, line_number long, text string"
    rows = [
        ("k1", "b", 3, "t1"),
        ("k1", "a", 9, "t2"),
        ("k2", "a", 1, "t3"),
        ("k1", "a", 2, "t4"),
        ("k3", "c", 5, "t5"),
    ]
    expected = [("k1", "a", 2, "t4"), ("k2", "a", 1, "t3"), ("k3", "c", 5, "t5")]
    got = ingest_stage.first_occurrences(spark.createDataFrame(rows, schema), len(rows))
    assertDataFrameEqual(got, spark.createDataFrame(expected, schema))
