"""Python-worker side of `chunk`: documents in, passages out, measured with the model's tokenizer."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tiktoken
from tokenizers import Tokenizer
from tokenizers.models import BPE

from backforth_spark.core.chunking import TokenOffsets, chunk_texts, offsets_from_byte_lengths, passage_id
from backforth_spark.core.config import ChunkConfig
from backforth_spark.core.model import Hub
from backforth_spark.core.schemas import PASSAGES_COLUMNS, names

CHUNK_COLUMNS = names(PASSAGES_COLUMNS)


def _backend(model: str) -> Tokenizer:
    """The Rust tokenizer of `model` (a folder or a hub id)."""
    local = Path(model) / "tokenizer.json"
    if local.is_file():
        # The Rust library alone reads a model folder's tokenizer.json: importing transformers (and
        # torch with it) took 8.8 s and about 1 GB in every Python worker that chunks, to get the
        # same tokenizer (special tokens aside, which chunking never adds).
        return Tokenizer.from_file(str(local))
    from transformers import AutoTokenizer  # a hub id, or a folder with only a slow tokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"chunking needs a fast (Rust) tokenizer with offsets; {model} has none")
    # the Rust tokenizer directly: transformers' per-call wrapping costs more than the encoding
    return tok.backend_tokenizer


def _is_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_is_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []))
    return pre_tokenizer.get("type") == "ByteLevel"


def byte_level_lengths(backend: Tokenizer) -> tuple[np.ndarray | None, bool]:
    """(each token id's length in UTF-8 bytes, whether text is NFC-normalised first) for a byte-level
    BPE tokenizer (GPT-2's family: Llama 3, Qwen 2, SmolLM), whose tokens cover a text's bytes end to
    end; (None, False) for any other (SentencePiece-style ones replace spaces, other normalisers
    rewrite text)."""
    spec = json.loads(backend.to_str())
    normalizer = spec.get("normalizer")
    if (
        spec.get("model", {}).get("type") != "BPE"
        or not _is_byte_level(spec.get("pre_tokenizer"))
        or (normalizer is not None and normalizer.get("type") != "NFC")
    ):
        return None, False
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    lengths = np.zeros(max([*vocab.values(), *added, 0]) + 1, dtype=np.int64)
    for token, i in vocab.items():
        lengths[i] = len(token)  # byte-level: one character of a token's text stands for one byte
    for i, token in added.items():
        lengths[i] = len(token.content.encode())  # matched in the text as it is
    return lengths, normalizer is not None


# The split a ByteLevel pre-tokenizer with use_regex makes (GPT-2's), spelled for tiktoken's regex engine.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text a candidate fast tokenizer must encode exactly as the library does before it is used: scripts,
# digits, contractions, whitespace runs, symbols and emoji (the regex engines differ in Unicode tables).
_PROBE = (
    "It's 3.14159 -- they'll've DONE it!\r\n\n\t  Ünïcödé naïve café 東京都 2024年 "
    "مرحبا بالعالم १२३ ٤٥٦ Ⅻ ½ ﬁ x² 𝔘𝔫𝔦 👩‍👩‍👧 🇫🇷 \u00a0\u2003\u3000 a\u0301 <|tag|> ```code```\n"
)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is spelled as in the vocabulary."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {c: b for b, c in chars.items()}


def _split_pattern(pre_tokenizer: dict | None) -> str | None:
    """The regex a byte-level pre-tokenizer splits text with, or None for any other pre-tokenizer."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "ByteLevel":
        use_regex = pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space")
        return _GPT2_SPLIT if use_regex else None
    parts = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else []
    if len(parts) != 2:
        return None
    split, byte_level = parts  # Llama 3's and Qwen 2's layout: a regex split, then bytes to characters
    regex = (split.get("pattern") or {}).get("Regex")
    if (
        split.get("type") != "Split"
        or regex is None
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
        or byte_level.get("add_prefix_space")
    ):
        return None
    return regex


def _missing_bytes_pattern(present: np.ndarray) -> re.Pattern[str]:
    """Characters with a UTF-8 byte the vocabulary lacks (the library drops those), and surrogates."""
    cp = np.arange(0x110000, dtype=np.int64)
    lead = np.select(
        [cp < 0x80, cp < 0x800, cp < 0x10000], [cp, 0xC0 | cp >> 6, 0xE0 | cp >> 12], 0xF0 | cp >> 18
    )
    missing = ~present[lead]
    for shift, min_cp in ((12, 0x10000), (6, 0x800), (0, 0x80)):
        missing |= (cp >= min_cp) & ~present[0x80 | (cp >> shift) & 0x3F]
    missing[0xD800:0xE000] = True
    edges = np.flatnonzero(np.diff(np.concatenate([[0], missing.view(np.int8), [0]])))
    ranges = "".join(
        re.escape(chr(a)) + ("" if b - a == 1 else "-" + re.escape(chr(b - 1)))
        for a, b in zip(edges[::2], edges[1::2], strict=True)
    )
    return re.compile(f"[{ranges}]")


@dataclass(frozen=True)
class RankedBPE:
    """tiktoken's BPE run on a model's byte-level vocabulary: the library's tokens, about three times
    faster (3.2 against 1.0 s on 3,200 documents, one thread)."""

    encoding: tiktoken.Encoding
    unsupported: re.Pattern[str]  # text with any of these characters goes to the library

    def ids(self, text: str) -> list[int] | None:
        """The token ids of `text`, or None when only the library can encode it."""
        if self.unsupported.search(text):
            return None
        return self.encoding.encode(text, allowed_special="all")


def ranked_bpe(backend: Tokenizer) -> RankedBPE | None:
    """A RankedBPE that gives `backend`'s tokens, or None when that cannot be shown for this tokenizer.

    tiktoken merges the adjacent pair whose concatenation has the lowest id; the library merges the
    pair earliest in its merge list. They agree when (a) merge order is id order of the merged tokens
    and (b) every merged token, split into bytes, merges back into itself. By (b) a token's span can
    only ever be split at its own merge's seam, so every pair tiktoken may merge is one the library
    may too, in the same order by (a); (b) also covers tiktoken's shortcut for a piece that is a token.
    """
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    added = spec.get("added_tokens") or []
    contents = [t.get("content") or "" for t in added]
    if (
        model.get("type") != "BPE"
        or pattern is None
        or spec.get("normalizer") is not None
        or model.get("dropout") is not None
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        # added tokens are found in the text as they are: no stripping, word bounds or overlaps
        or any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added)
        or not all(contents)
        or any(b.startswith(a) for a, b in zip(sorted(contents), sorted(contents)[1:], strict=False))
    ):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    merged = [vocab.get(a + b) for a, b in merges]
    if any(i is None for i in merged) or any(x >= y for x, y in zip(merged, merged[1:], strict=False)):
        return None  # (a)
    strays = set(vocab.values()) - set(merged) - {t["id"] for t in added}
    if model.get("ignore_merges") and any(len(t) > 1 for t, i in vocab.items() if i in strays):
        return None  # the library returns a word found in the vocabulary as it is; tiktoken only merges
    # (b), asked of the library itself: its BPE on these merges, without a whole-word vocabulary lookup
    by_merges = BPE(vocab=vocab, merges=merges, ignore_merges=False)
    if any([t.value for t in by_merges.tokenize(a + b)] != [a + b] for a, b in merges):
        return None
    alphabet = _byte_alphabet()
    if any(c not in alphabet for a, b in merges for c in a + b):
        return None
    single = {token: i for token, i in vocab.items() if len(token) == 1 and token in alphabet}
    ranks = {bytes([alphabet[token]]): i for token, i in single.items()}
    ranks |= {bytes(alphabet[c] for c in a + b): vocab[a + b] for a, b in merges}
    present = np.zeros(256, dtype=bool)
    present[[alphabet[token] for token in single]] = True
    try:
        encoding = tiktoken.Encoding(
            "backforth-ranked-bpe",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens={t["content"]: t["id"] for t in added},
        )
    except ValueError:  # a split regex tiktoken's engine does not take
        return None
    fast = RankedBPE(encoding, _missing_bytes_pattern(present))
    if fast.ids(_PROBE) != backend.encode(_PROBE, add_special_tokens=False).ids:
        return None
    return fast


def _split_offsets(pairs: list[tuple[int, int]]) -> TokenOffsets:
    return [a for a, _ in pairs], [b for _, b in pairs]


class HFTokenizer:
    """Token offsets from a Hugging Face fast tokenizer (the generation model's own)."""

    edge_tokens = 1

    def __init__(self, model: str) -> None:
        self.backend = _backend(model)
        self.byte_lengths, self.needs_nfc = byte_level_lengths(self.backend)
        self.ranked = ranked_bpe(self.backend) if self.byte_lengths is not None else None

    def token_offsets(self, text: str) -> TokenOffsets:
        return self.token_offsets_batch([text])[0]

    def token_offsets_batch(self, texts: Sequence[str]) -> list[TokenOffsets]:
        texts = list(texts)
        if self.byte_lengths is None:
            return [
                _split_offsets(e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)
            ]
        # Byte-level BPE: the ids alone give the offsets (a third faster than asking the library for
        # them); a text they do not cover byte for byte (one a normaliser would change) is asked again.
        encoded = [self.ranked.ids(text) for text in texts] if self.ranked else [None] * len(texts)
        rest = [i for i, ids in enumerate(encoded) if ids is None]
        if rest:
            found_ids = self.backend.encode_batch_fast([texts[i] for i in rest], add_special_tokens=False)
            for i, encoding in zip(rest, found_ids, strict=True):
                encoded[i] = encoding.ids
        out = []
        for text, token_ids in zip(texts, encoded, strict=True):
            found = None
            if not self.needs_nfc or unicodedata.is_normalized("NFC", text):
                ids = np.asarray(token_ids, dtype=np.int64)
                found = offsets_from_byte_lengths(text, self.byte_lengths[ids])
            if found is None:
                found = _split_offsets(self.backend.encode(text, add_special_tokens=False).offsets)
            out.append(found)
        return out

    def count(self, text: str) -> int:
        """Tokens of `text` encoded on its own."""
        return len(self.backend.encode(text, add_special_tokens=False).ids)


# One tokenizer per Python worker, reused across tasks (Spark reuses workers).
_TOKENIZERS: dict[str, HFTokenizer] = {}


def tokenizer_for(model: str, hub: Hub | None = None) -> HFTokenizer:
    """The tokenizer of `model` (a folder or a Hub id, fetched through `hub`: its tokenizer files only),
    built once per process."""
    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = HFTokenizer(hub.fetch(model, weights=False) if hub else model)
    return _TOKENIZERS[model]


def chunk_documents(
    model: str, cfg: ChunkConfig, hub: Hub | None = None
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        tokenizer = tokenizer_for(model, hub)
        for batch in batches:
            rows = []
            chunked = chunk_texts(batch["text"].tolist(), tokenizer, cfg)
            for key, passages in zip(batch["doc_key"], chunked, strict=True):
                for p in passages:
                    rows.append(
                        {
                            "passage_id": passage_id(key, p.index),
                            "doc_key": key,
                            "passage_index": p.index,
                            "text": p.text,
                            "n_tokens": p.n_tokens,
                            "status": p.status,
                            "truncated": p.truncated,
                            "quality_filter": p.quality_filter,
                        }
                    )
            out = pd.DataFrame(rows, columns=CHUNK_COLUMNS)
            yield out.astype({"passage_index": "int32", "n_tokens": "Int32", "truncated": bool})

    return run
