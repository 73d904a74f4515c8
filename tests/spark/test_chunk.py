import json
import re
from pathlib import Path

import pytest

from backforth_spark.core import chunking as chunk
from backforth_spark.core import schemas as t
from backforth_spark.core.config import ChunkConfig, load_config
from backforth_spark.core.model import resolve_model
from backforth_spark.spark.stages import chunk as chunk_stage
from tests.conftest import DOLMA_SAMPLE, LOCAL_CONF, REPO, add_documents


class WordTokenizer:
    """One token per whitespace-separated word: enough to test the splitting logic."""

    edge_tokens = 0

    def token_offsets(self, text):
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        return [a for a, _ in spans], [b for _, b in spans]

    def token_offsets_batch(self, texts):
        return [self.token_offsets(t) for t in texts]


W = WordTokenizer()


def _para(n, word="w"):
    return " ".join(f"{word}{i}" for i in range(n)) + "."


def test_short_document_is_one_passage():
    [p] = chunk.chunk_document(
        "A short text of seven words here.", W, ChunkConfig(max_tokens=10, min_tokens=2)
    )
    assert (p.status, p.n_tokens, p.truncated) == ("ok", 7, False)


def test_document_below_min_tokens_is_marked_too_short():
    [p] = chunk.chunk_document("Two words", W, ChunkConfig(max_tokens=10, min_tokens=5))
    assert p.status == chunk.TOO_SHORT


def test_split_packs_whole_paragraphs_within_the_limit():
    text = "\n\n".join([_para(4, "a"), _para(4, "b"), _para(4, "c")])
    ps = chunk.chunk_document(text, W, ChunkConfig(max_tokens=9, min_tokens=1))
    assert [p.text for p in ps] == [_para(4, "a") + "\n\n" + _para(4, "b"), _para(4, "c")]
    assert all(p.n_tokens <= 9 for p in ps)


def test_single_lines_are_boundaries_when_there_are_no_blank_lines():
    text = "\n".join([_para(5, "a"), _para(5, "b")])
    ps = chunk.chunk_document(text, W, ChunkConfig(max_tokens=6, min_tokens=1))
    assert [p.text for p in ps] == [_para(5, "a"), _para(5, "b")]


def test_an_overlong_sentence_is_cut_by_tokens():
    ps = chunk.chunk_document(_para(25), W, ChunkConfig(max_tokens=10, min_tokens=1))
    assert [p.n_tokens for p in ps] == [10, 10, 5]
    assert " ".join(p.text for p in ps) == _para(25)


def test_drop_policy_keeps_one_row_saying_why():
    [p] = chunk.chunk_document(_para(30), W, ChunkConfig(max_tokens=10, min_tokens=1, too_long="drop"))
    assert (p.status, p.text, p.n_tokens) == (chunk.TOO_LONG, None, 30)


def test_truncate_policy_keeps_the_first_passage():
    text = "\n\n".join([_para(8, "a"), _para(8, "b")])
    [p] = chunk.chunk_document(text, W, ChunkConfig(max_tokens=10, min_tokens=1, too_long="truncate"))
    assert (p.text, p.truncated) == (_para(8, "a"), True)


def test_passages_over_the_per_document_limit_are_marked_not_lost():
    text = "\n\n".join(_para(8, x) for x in "abcd")
    ps = chunk.chunk_document(text, W, ChunkConfig(max_tokens=10, min_tokens=1, max_passages_per_doc=2))
    assert [p.status for p in ps] == ["ok", "ok", chunk.OVER_LIMIT, chunk.OVER_LIMIT]


def test_passage_ids_are_stable_and_distinct():
    assert chunk.passage_id("cc/1", 0) == chunk.passage_id("cc/1", 0)
    assert chunk.passage_id("cc/1", 0) != chunk.passage_id("cc/1", 1)


def test_chunk_stage_uses_the_model_tokenizer_and_only_new_representatives(make_ctx):
    from backforth_spark.core.model import resolve_model
    from udfs.chunking import HFTokenizer

    ctx = make_ctx(
        "chunk.max_tokens=64", "chunk.min_tokens=4", "chunk.max_passages_per_doc=null", "chunk.min_words=null"
    )
    long_text = "\n".join(
        f"Line {i} says something about topic {i} in a complete sentence." for i in range(40)
    )
    docs = [
        ("cc/a", long_text),
        ("cc/b", "A short document about one thing, long enough to keep."),
        ("cc/c", "A duplicate that is not a representative."),
    ]
    add_documents(ctx, docs, representatives={"cc/a", "cc/b"})
    counts = chunk_stage.run(ctx)
    assert counts["rows_in"] == 2
    rows = ctx.tables.read(t.PASSAGES).collect()
    assert {r["doc_key"] for r in rows} == {"cc/a", "cc/b"}
    tokenizer = HFTokenizer(resolve_model(ctx.cfg.llm))
    for r in rows:
        # n_tokens counts the document's tokens in the slice; alone it may differ by one per edge
        assert r["status"] == "ok" and abs(r["n_tokens"] - tokenizer.count(r["text"])) <= 2
        assert tokenizer.count(r["text"]) <= 64
        assert r["text"] in long_text or r["text"] in docs[1][1]  # a verbatim slice
    assert len([r for r in rows if r["doc_key"] == "cc/a"]) > 1
    version = ctx.tables.version(t.PASSAGES)
    assert chunk_stage.run(ctx) == {"rows_in": 0, "rows_out": 0}  # nothing new: nothing chunked twice
    assert ctx.tables.version(t.PASSAGES) == version  # and no empty commit


@pytest.mark.parametrize("collected_keys", [20_000, 1], ids=["keys-collected", "too-many-to-collect"])
def test_chunk_stage_reads_only_pending_representatives_whether_or_not_their_keys_are_collected(
    make_ctx, monkeypatch, collected_keys
):
    monkeypatch.setattr(chunk_stage, "COLLECTED_KEYS", collected_keys)
    ctx = make_ctx("chunk.min_words=null", "chunk.min_tokens=4")
    add_documents(ctx, [("cc/a", "An older document about harbours and the boats in them.")], {"cc/a"})
    assert chunk_stage.run(ctx)["rows_in"] == 1
    docs = [
        ("cc/b", "A newer document about mountains and the paths that cross them."),
        ("cc/c", "A third document, about kitchens and the knives kept in drawers."),
        ("cc/d", "A copy that is not a representative."),
    ]
    add_documents(ctx, docs, representatives={"cc/b", "cc/c"})
    counts = chunk_stage.run(ctx)
    assert (counts["rows_in"], counts["rows_out"]) == (2, 2)
    rows = ctx.tables.read(t.PASSAGES).groupBy("doc_key").count().collect()
    assert sorted((r["doc_key"], r["count"]) for r in rows) == [("cc/a", 1), ("cc/b", 1), ("cc/c", 1)]


_MIXED_DOCS = [
    ("cc/good", "A plain sentence about rivers and the stones that sit along their banks today."),
    ("cc/nav", "Home\nLogin\nContact us\nNews | Sport\nA line."),
    ("cc/tiny", "Two words"),
]


def _counts_by_status_and_filter(rows) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[f"passages_{r['status']}"] = out.get(f"passages_{r['status']}", 0) + 1
        if r["quality_filter"] is not None:
            out[f"filtered_{r['quality_filter']}"] = out.get(f"filtered_{r['quality_filter']}", 0) + 1
    return out


def test_chunk_stage_counts_exactly_what_it_inserted(make_ctx):
    from pyspark.sql import functions as F

    ctx = make_ctx("chunk.max_tokens=64", "chunk.min_tokens=4", "chunk.min_words=5")
    first, later = _MIXED_DOCS[:2], _MIXED_DOCS[2:] + [("cc/more", _MIXED_DOCS[0][1] + " Again.")]
    add_documents(ctx, first, representatives={k for k, _ in first})
    counts = chunk_stage.run(ctx)
    rows = ctx.tables.read(t.PASSAGES).collect()
    assert counts == {"rows_in": 2, "rows_out": 1, **_counts_by_status_and_filter(rows)}
    assert counts["filtered_navigation_lines"] == 1
    assert "count passages" not in dict(ctx.tables.phase_log)  # counted by the MERGE's own query

    # a row already holding cc/more's first passage id (as a concurrent run's insert would): the
    # MERGE skips that passage, and the counts are those of the rows this call did insert
    add_documents(ctx, later, representatives={k for k, _ in later})
    taken = ctx.spark.createDataFrame(
        [(chunk.passage_id("cc/more", 0), "cc/elsewhere", 0, "x", 1, "ok", False, None)],
        chunk_stage.CHUNK_SCHEMA,
    ).select("*", F.lit("other-run").alias("run_id"), F.current_timestamp().alias("written_at"))
    ctx.tables.merge_insert_new(t.PASSAGES, taken, ["passage_id"])
    counts = chunk_stage.run(ctx)
    mine = ctx.tables.read(t.PASSAGES).where(F.col("run_id") == ctx.run_id).collect()
    added = [r for r in mine if r["doc_key"] in ("cc/tiny", "cc/more")]
    assert [r["doc_key"] for r in added] == ["cc/tiny"]  # cc/more's only passage was taken
    assert counts == {"rows_in": 1, "rows_out": 0, **_counts_by_status_and_filter(added)}


def test_overlap_repeats_the_tail_of_the_previous_passage():
    text = "\n\n".join(_para(4, x) for x in "abcd")  # four units of 4 tokens
    ps = chunk.chunk_document(text, W, ChunkConfig(max_tokens=9, min_tokens=1, overlap_tokens=5))
    assert [p.text for p in ps] == [
        _para(4, "a") + "\n\n" + _para(4, "b"),
        _para(4, "b") + "\n\n" + _para(4, "c"),
        _para(4, "c") + "\n\n" + _para(4, "d"),
    ]


@pytest.mark.parametrize(
    ("text", "setting", "issue"),
    [
        ("only three words", {"min_words": 5}, "too_few_words"),
        ("$$$ ### @@@ !!! words", {"max_symbol_ratio": 0.3}, "symbol_ratio"),
        ("call 555 1234 5678 9012 now", {"max_digit_ratio": 0.3}, "digit_ratio"),
        ("buy now\nbuy now\nbuy now\nreal line", {"max_repeated_line_ratio": 0.3}, "repeated_lines"),
        (
            "Home\nLogin\nNews | Sport | Weather\nA real sentence here.",
            {"max_navigation_line_ratio": 0.5},
            "navigation_lines",
        ),
        (
            "A plain, well-formed sentence about cooking pasta.",
            {"min_words": 5, "max_symbol_ratio": 0.3},
            None,
        ),
    ],
)
def test_quality_filters_name_the_first_failure(text, setting, issue):
    assert chunk.quality_issue(text, ChunkConfig(**setting)) == issue


def test_symbols_and_digits_are_counted_as_the_regexes_match_them_at_every_code_point():
    import re
    import sys

    every = "".join(map(chr, range(sys.maxunicode + 1)))  # surrogates and unassigned points too
    pieces = [every[i : i + 65536] for i in range(0, len(every), 65536)]
    pieces += ["", "plain words 123", "٣ digits ١٢ ⅻ ½ ²", "a_b\u00a0\u3000c €$ 👍🏽 e\u0301"]
    for piece in pieces:
        expected = (len(re.findall(r"[^\w\s]", piece)), len(re.findall(r"\d", piece)))
        assert chunk.symbol_and_digit_counts(piece) == expected, repr(piece[:20])


def test_filtered_passages_are_kept_with_their_reason():
    [p] = chunk.chunk_document(
        "Home\nLogin\nContact us\nA line.",
        W,
        ChunkConfig(max_tokens=50, min_tokens=1, max_navigation_line_ratio=0.5),
    )
    assert (p.status, p.quality_filter) == (chunk.LOW_QUALITY, "navigation_lines")


def test_slice_counts_come_from_one_tokenisation():
    tokens = chunk._Tokens(W.token_offsets("aa bb cc dd"))
    assert [tokens.count(0, 2), tokens.count(0, 5), tokens.count(1, 4), tokens.count(2, 3)] == [1, 2, 2, 0]
    assert tokens.windows(0, 11, 3) == [(0, 8), (9, 11)]


def test_passages_are_verbatim_slices_and_keep_odd_whitespace():
    text = "a1 a2 a3.\n \n\nb1 b2   b3.\n\n\n\nc1 c2 c3."
    ps = chunk.chunk_document(text, W, ChunkConfig(max_tokens=6, min_tokens=1))
    assert [p.text for p in ps] == ["a1 a2 a3.\n \n\nb1 b2   b3.", "c1 c2 c3."]
    assert [p.n_tokens for p in ps] == [6, 3]


def test_real_tokenizer_passages_fit_when_tokenised_alone():
    from backforth_spark.core.config import load_config
    from backforth_spark.core.model import resolve_model
    from udfs.chunking import HFTokenizer

    texts = [json.loads(line)["text"] for f in sorted(DOLMA_SAMPLE.glob("*.jsonl")) for line in f.open()]
    tokenizer = HFTokenizer(resolve_model(load_config(REPO / "conf" / "local.yaml").llm))
    cfg = ChunkConfig(max_tokens=48, min_tokens=1)
    passages = [p for text in texts for p in chunk.chunk_document(text, tokenizer, cfg)]
    assert len(passages) > 200
    for p in passages:
        alone = tokenizer.count(p.text)
        assert alone <= 48 and abs(alone - p.n_tokens) <= 2


def test_the_tokenizer_read_from_its_file_gives_what_transformers_gives():
    from transformers import AutoTokenizer

    from backforth_spark.core.config import load_config
    from backforth_spark.core.model import resolve_model
    from udfs.chunking import HFTokenizer

    model = resolve_model(load_config(REPO / "conf" / "local.yaml").llm)
    texts = [json.loads(line)["text"] for f in sorted(DOLMA_SAMPLE.glob("*.jsonl")) for line in f.open()]
    texts += ["<|im_start|>user\nspecial tokens in the text<|im_end|>", "émoji 👍🏽 and\ttabs"]
    # characters of 2, 3 and 4 bytes that byte-level tokens cut inside, combining marks, controls, NUL
    texts += [
        "日本語のテキスト、中文文本。",
        "e\u0301 a\u0308 \ufeffBOM \u200bzero\u200dwidth",
        "\x00\x01\r\n\r\n\x7f end",
    ]
    texts += ["𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🇫🇷🏳️‍🌈 " * 20, "", " ", "\n\n\n", "<|endoftext|><|endoftext|>x<|im_end|>"]
    reference = AutoTokenizer.from_pretrained(model).backend_tokenizer
    ours = HFTokenizer(model)
    assert (
        ours.byte_lengths is not None
    )  # byte-level BPE: offsets from the ids, checked against the library's
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False)
        assert list(zip(*ours.token_offsets(text), strict=True)) == expected.offsets
        assert ours.count(text) == len(expected.ids)


def test_offsets_follow_from_byte_lengths_of_tokens_covering_the_text():
    import numpy as np

    # "héllo" is 6 bytes: tokens of 1, 2 (the é), 3 bytes; then a token ending inside "€" (3 bytes)
    assert chunk.offsets_from_byte_lengths("héllo", np.array([1, 2, 3])) == ([0, 1, 2], [1, 2, 5])
    assert chunk.offsets_from_byte_lengths("a€", np.array([2, 2])) == ([0, 1], [2, 2])
    assert chunk.offsets_from_byte_lengths("ab cd", np.array([2, 3])) == ([0, 2], [2, 5])
    assert chunk.offsets_from_byte_lengths("", np.array([], dtype=np.int64)) == ([], [])


def test_byte_lengths_that_do_not_cover_the_text_give_nothing():
    import numpy as np

    assert chunk.offsets_from_byte_lengths("abcd", np.array([1, 2])) is None  # short of the text
    assert chunk.offsets_from_byte_lengths("ab", np.array([1, 2])) is None  # past it
    assert chunk.offsets_from_byte_lengths("é", np.array([1])) is None  # 2 bytes, not 1
    assert chunk.offsets_from_byte_lengths("ab", np.array([0, 2])) is None  # an empty token


def _saved_tokenizer(folder, spec_change):
    """A model folder holding the default model's tokenizer.json with `spec_change` applied."""
    from backforth_spark.core.config import load_config
    from backforth_spark.core.model import resolve_model

    source = Path(resolve_model(load_config(REPO / "conf" / "local.yaml").llm)) / "tokenizer.json"
    spec = json.loads(source.read_text())
    spec_change(spec)
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


TEXTS_A_NORMALISER_CHANGES = [
    "e\u0301t\u0301e\u0301 cafe\u0301",
    "ﬁne ligatures ½ and ｆｕｌｌ width",
    "plain ascii",
]


@pytest.mark.parametrize(
    "normalizer",
    [{"type": "NFC"}, {"type": "NFKC"}, {"type": "Sequence", "normalizers": [{"type": "Lowercase"}]}],
    ids=["nfc", "nfkc", "lowercase"],
)
def test_tokenizers_with_a_normaliser_give_the_library_offsets(tmp_path, normalizer):
    from tokenizers import Tokenizer

    from udfs.chunking import HFTokenizer

    def with_normalizer(spec):
        spec["normalizer"] = normalizer

    folder = _saved_tokenizer(tmp_path / "model", with_normalizer)
    ours, library = HFTokenizer(str(folder)), Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS_A_NORMALISER_CHANGES:
        expected = library.encode(text, add_special_tokens=False).offsets
        assert list(zip(*ours.token_offsets(text), strict=True)) == expected
        assert list(zip(*ours.token_offsets_batch([text, text])[1], strict=True)) == expected


def test_a_tokenizer_that_is_not_byte_level_gives_the_library_offsets(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from udfs.chunking import HFTokenizer, byte_level_lengths

    words = Tokenizer(WordLevel({"[UNK]": 0, "héllo": 1, "wörld": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    (tmp_path / "words").mkdir()
    words.save(str(tmp_path / "words" / "tokenizer.json"))
    ours = HFTokenizer(str(tmp_path / "words"))
    assert byte_level_lengths(ours.backend) == (None, False)
    assert ours.token_offsets_batch(["héllo  wörld, x"]) == [([0, 7, 12, 14], [5, 12, 13, 15])]


def test_batched_chunking_gives_each_document_what_chunking_it_alone_gives():
    from backforth_spark.core.config import load_config
    from backforth_spark.core.model import resolve_model
    from udfs.chunking import HFTokenizer

    texts = [json.loads(line)["text"] for f in sorted(DOLMA_SAMPLE.glob("*.jsonl")) for line in f.open()]
    # more texts than one tokeniser batch, and one of several segments among them
    texts = (texts * 8)[: chunk.TOKENISE_BATCH + 5] + [("long paragraph " * 40 + "\n\n") * 500]
    tokenizer = HFTokenizer(resolve_model(load_config(REPO / "conf" / "local.yaml").llm))
    cfg = ChunkConfig(max_tokens=64, min_tokens=1)
    batched = list(chunk.chunk_texts(texts, tokenizer, cfg))
    assert batched == [chunk.chunk_document(t, tokenizer, cfg) for t in texts]
    assert len(batched[-1]) > 100  # the long text was split too


# ---- big documents in bounded memory ------------------------------------------------------------------


class RecordingTokenizer(WordTokenizer):
    """Records the length of every text it tokenises."""

    def __init__(self):
        self.lengths = []

    def token_offsets(self, text):
        self.lengths.append(len(text))
        return super().token_offsets(text)


def test_segments_cut_at_the_coarsest_boundary_and_cover_the_text():
    text = ("word " * 30 + "\n\n") * 40 + "x" * 500  # paragraphs of 152 characters, then one long word
    parts = chunk.segments(text, size=1000)
    assert parts[0][0] == 0 and parts[-1][1] == len(text)
    assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:], strict=False))  # no gap, no overlap
    assert all(b - a <= 1000 for a, b in parts)
    assert all(text[b - 2 : b] == "\n\n" for _, b in parts[:-2])  # blank lines were there to cut at


def test_a_document_far_larger_than_a_segment_is_tokenised_a_segment_at_a_time():
    paragraph = "alpha beta gamma delta epsilon " * 20 + "\n\n"
    text = paragraph * 4000  # about 2.5 MB
    tokenizer = RecordingTokenizer()
    passages = chunk.chunk_document(text, tokenizer, ChunkConfig(max_tokens=300, min_tokens=1))
    assert max(tokenizer.lengths) <= chunk.SEGMENT_CHARS
    # every passage is a verbatim slice within the limit, and together they hold every word
    assert all(p.status == "ok" and p.n_tokens <= 300 for p in passages)
    assert sum(len(p.text.split()) for p in passages) == len(text.split())
    assert [p.index for p in passages] == list(range(len(passages)))


def test_truncating_a_big_document_tokenises_only_its_first_segment():
    text = ("alpha beta gamma " * 50 + "\n\n") * 3000
    tokenizer = RecordingTokenizer()
    [first] = chunk.chunk_document(text, tokenizer, ChunkConfig(max_tokens=100, too_long="truncate"))
    assert first.truncated and first.n_tokens <= 100 and len(tokenizer.lengths) == 1


# ---- tiktoken on the model's vocabulary ---------------------------------------------------------------


def _default_tokenizer_folder() -> Path:
    from backforth_spark.core.config import load_config
    from backforth_spark.core.model import resolve_model

    return Path(resolve_model(load_config(REPO / "conf" / "local.yaml").llm))


def _bytes_in_the_vocabulary(vocab: dict[str, int]) -> set[int]:
    """The byte values that a byte-level BPE vocabulary holds a one-byte token for. Such vocabularies
    write each byte as one character: printable Latin-1 bytes as themselves, the other 68 as U+0100
    onwards in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable} | {chr(0x100 + i): b for i, b in enumerate(others)}
    return {alphabet[token] for token in vocab if token in alphabet}


def test_tiktoken_on_the_default_vocabulary_gives_the_library_tokens_for_every_code_point():
    from tokenizers import Tokenizer

    from udfs.chunking import HFTokenizer

    folder = _default_tokenizer_folder()
    ours, library = HFTokenizer(str(folder)), Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ours.ranked is not None
    # every code point whose UTF-8 bytes all have a token (the others go to the library: the test
    # below), read from the vocabulary here, not from the code under test
    present = _bytes_in_the_vocabulary(library.get_vocab())
    assert len(present) < 256  # this vocabulary lacks some bytes (0x04, 0xF1, ...): both paths run
    points = [
        c
        for c in range(0x110000)
        if not 0xD800 <= c < 0xE000 and all(b in present for b in chr(c).encode("utf-8"))
    ]
    assert len(points) > 587_000  # planes 0-3 and 12-16 (9 x 65,536 less 2,048 surrogates) but a few
    # each character between letters, digits, punctuation, spaces and a contraction: the regex split
    # classifies it, the merges join it with its neighbours
    texts = [
        "".join(f"a{chr(c)}1 {chr(c)}! {chr(c)}{chr(c)}'s\n" for c in points[i : i + 4096])
        for i in range(0, len(points), 4096)
    ]
    expected = library.encode_batch_fast(texts, add_special_tokens=False)
    for text, want in zip(texts, expected, strict=True):
        found = ours.ranked.ids(text)
        assert found is not None, text[:40]  # the fast path takes every block: none is skipped
        assert found == want.ids, text[:40]


def test_characters_with_bytes_outside_the_vocabulary_go_to_the_library():
    from tokenizers import Tokenizer

    from udfs.chunking import HFTokenizer

    folder = _default_tokenizer_folder()
    ours, library = HFTokenizer(str(folder)), Tokenizer.from_file(str(folder / "tokenizer.json"))
    # the default vocabulary has no token for byte 0x04 nor for 0xF1 (U+40000's first byte): the
    # library drops them, tiktoken would panic
    assert library.encode("\x04", add_special_tokens=False).ids == []
    assert len(library.encode("\U00040000", add_special_tokens=False).ids) == 3  # of its 4 bytes
    for text in ["a\x04b", "x \U00040000 y", "\U000bffff", "fine\U00010000text"]:
        expected = library.encode(text, add_special_tokens=False).offsets
        assert list(zip(*ours.token_offsets(text), strict=True)) == expected
    assert ours.ranked.ids("a\x04b") is None and ours.ranked.ids("x \U00040000 y") is None
    assert ours.ranked.ids("fine\U00010000text") is not None  # its bytes are all in the vocabulary


def test_a_split_then_byte_level_tokenizer_is_encoded_by_tiktoken_too(tmp_path):
    from tokenizers import Tokenizer

    from udfs.chunking import HFTokenizer

    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )

    def llama3_layout(spec):  # Llama 3's pre-tokenizer on the default vocabulary
        spec["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        }

    folder = _saved_tokenizer(tmp_path / "model", llama3_layout)
    ours, library = HFTokenizer(str(folder)), Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ours.ranked is not None
    texts = [json.loads(line)["text"] for f in sorted(DOLMA_SAMPLE.glob("*.jsonl")) for line in f.open()]
    texts += ["IT'S 12345678 we'LL\r\n\r\n  x", "日本語 ١٢٣٤ 👩‍👩‍👧 <|im_end|>", ""]
    for text in texts:
        assert ours.ranked.ids(text) == library.encode(text, add_special_tokens=False).ids


def _tiny_bpe(folder: Path, merges: list[tuple[str, str]], added=()) -> Path:
    """A byte-level BPE tokenizer with the 256 byte characters and `merges`, ids in merge order."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Tokenizer(BPE(vocab, list(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(list(added))
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_tiktoken_is_used_on_a_tiny_vocabulary_whose_merges_rebuild_their_tokens(tmp_path):
    from tokenizers import Tokenizer

    from udfs.chunking import HFTokenizer

    folder = _tiny_bpe(tmp_path / "ok", [("a", "b"), ("ab", "c"), ("c", "c"), ("abc", "cc")])
    ours, library = HFTokenizer(str(folder)), Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ours.ranked is not None
    for text in ["abccc abcabc ccab", "abcc", "ab c"]:
        assert ours.ranked.ids(text) == library.encode(text, add_special_tokens=False).ids


def test_tiktoken_is_refused_where_its_merges_would_differ_from_the_library(tmp_path):
    from tokenizers import AddedToken, Tokenizer

    from udfs.chunking import HFTokenizer, ranked_bpe

    # "abc" is merged from "ab" + "c", but "bc" merges first, so the library never builds "abc" from
    # its letters; tiktoken would return "abc" whole
    unreachable = _tiny_bpe(tmp_path / "unreachable", [("b", "c"), ("a", "b"), ("ab", "c")])
    # merge order against id order: tiktoken merges by id
    swapped = _tiny_bpe(tmp_path / "swapped", [("a", "b"), ("c", "c")])
    spec = json.loads((swapped / "tokenizer.json").read_text())
    spec["model"]["merges"].reverse()
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    # an added token matched with the space before it stripped: tiktoken matches text as it is
    stripped = _tiny_bpe(tmp_path / "stripped", [("a", "b")], [AddedToken("<x>", lstrip=True)])
    for folder in (unreachable, swapped, stripped):
        library = Tokenizer.from_file(str(folder / "tokenizer.json"))
        assert ranked_bpe(library) is None, folder.name
        ours = HFTokenizer(str(folder))
        for text in ["abc", "x abcc ab  <x>cab"]:
            expected = library.encode(text, add_special_tokens=False).offsets
            assert list(zip(*ours.token_offsets(text), strict=True)) == expected, folder.name


def test_the_chunkers_python_workers_fetch_a_gated_hub_tokenizer_once_with_the_drivers_token(
    make_ctx, tmp_path, monkeypatch
):
    """llm.model a Hub id: each Python worker fetches its tokenizer through the cache folder, with the
    token read from the driver's environment (the workers' environment never had it)."""
    from tokenizers import Tokenizer

    from tests.core.test_model import REPO, TOKEN, TOKENIZER_FILES
    from tests.hub_stand_in import HubStandIn

    monkeypatch.setenv("BACKFORTH_TEST_HUB_TOKEN", TOKEN)
    folder = Path(resolve_model(load_config(LOCAL_CONF).llm))
    with HubStandIn(folder, REPO, TOKEN) as hub:
        ctx = make_ctx(
            f"llm.model={REPO}", f"llm.hub_cache_dir={tmp_path / 'hub'}", f"llm.hub_endpoint={hub.endpoint}",
            "llm.hub_token_env=BACKFORTH_TEST_HUB_TOKEN", "chunk.min_tokens=4", "chunk.min_words=null",
        )  # fmt: skip
        docs = [(f"cc/river-{i}", f"River {i} carries stones and sand down to the sea.") for i in range(4)]
        add_documents(ctx, docs, representatives={k for k, _ in docs})
        counts = chunk_stage.run(ctx)
        downloads = dict(hub.downloads)
    assert (counts["rows_in"], counts.get("passages_ok")) == (4, 4), counts
    # the model's own tokenizer, read by the tokenizers library from the folder the stand-in serves
    tokens = Tokenizer.from_file(str(folder / "tokenizer.json"))
    rows = ctx.tables.read(t.PASSAGES).collect()
    assert {r["n_tokens"] for r in rows} == {
        len(tokens.encode(text, add_special_tokens=False).ids) for _, text in docs
    }
    # the tokenizer's files once each (the Python workers shared the folder), never the weights
    assert downloads == dict.fromkeys(TOKENIZER_FILES, 1)
    assert all(TOKEN not in str(r.asDict()) for r in rows)
