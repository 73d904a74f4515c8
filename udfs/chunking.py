"""Python-worker side of `chunk`: documents in, passages out, measured with the model's tokenizer."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tokenizers import Tokenizer

from backforth_spark.chunking import TokenOffsets, chunk_texts, offsets_from_byte_lengths, passage_id
from backforth_spark.config import ChunkConfig
from backforth_spark.schemas import PASSAGES_COLUMNS, names

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


def _split_offsets(pairs: list[tuple[int, int]]) -> TokenOffsets:
    return [a for a, _ in pairs], [b for _, b in pairs]


class HFTokenizer:
    """Token offsets from a Hugging Face fast tokenizer (the generation model's own)."""

    edge_tokens = 1

    def __init__(self, model: str) -> None:
        self.backend = _backend(model)
        self.byte_lengths, self.needs_nfc = byte_level_lengths(self.backend)

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
        out = []
        encoded = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        for text, encoding in zip(texts, encoded, strict=True):
            found = None
            if not self.needs_nfc or unicodedata.is_normalized("NFC", text):
                ids = np.asarray(encoding.ids, dtype=np.int64)
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


def tokenizer_for(model: str) -> HFTokenizer:
    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = HFTokenizer(model)
    return _TOKENIZERS[model]


def chunk_documents(
    model: str, cfg: ChunkConfig
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        tokenizer = tokenizer_for(model)
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
