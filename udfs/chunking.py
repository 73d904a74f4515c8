"""Python-worker side of `chunk`: documents in, passages out, measured with the model's tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pandas as pd
from tokenizers import Tokenizer

from backforth_spark.chunking import chunk_texts, passage_id
from backforth_spark.config import ChunkConfig
from backforth_spark.schemas import PASSAGES_COLUMNS, names

CHUNK_COLUMNS = names(PASSAGES_COLUMNS)


class HFTokenizer:
    """Token offsets from a Hugging Face fast tokenizer (the generation model's own)."""

    edge_tokens = 1

    def __init__(self, model: str) -> None:
        local = Path(model) / "tokenizer.json"
        if local.is_file():
            # The Rust library alone reads a model folder's tokenizer.json: importing transformers (and
            # torch with it) took 8.8 s and about 1 GB in every Python worker that chunks, to get the
            # same tokenizer (special tokens aside, which chunking never adds).
            self.backend = Tokenizer.from_file(str(local))
            return
        from transformers import AutoTokenizer  # a hub id, or a folder with only a slow tokenizer

        tok = AutoTokenizer.from_pretrained(model)
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"chunking needs a fast (Rust) tokenizer with offsets; {model} has none")
        # the Rust tokenizer directly: transformers' per-call wrapping costs more than the encoding
        self.backend = tok.backend_tokenizer

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self.backend.encode(text, add_special_tokens=False).offsets

    def token_spans_batch(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        return [e.offsets for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

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
