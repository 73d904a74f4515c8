"""Python-worker side of `chunk`: documents in, passages out, measured with the model's tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pandas as pd

from backforth_spark.chunk import chunk_document, passage_id
from backforth_spark.config import ChunkConfig
from backforth_spark.tables import PASSAGES_SCHEMA, without_lineage

CHUNK_SCHEMA = without_lineage(PASSAGES_SCHEMA)


class HFTokenCounter:
    """Counts tokens with a Hugging Face tokenizer (the generation model's own)."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        ids = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def windows(self, text: str, size: int) -> list[str]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return [self.tok.decode(ids[i : i + size]) for i in range(0, len(ids), size)]


# One tokenizer per Python worker, reused across tasks (Spark reuses workers).
_COUNTERS: dict[str, HFTokenCounter] = {}


def _counter(model: str) -> HFTokenCounter:
    if model not in _COUNTERS:
        _COUNTERS[model] = HFTokenCounter(model)
    return _COUNTERS[model]


def chunk_documents(
    model: str, cfg: ChunkConfig
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        counter = _counter(model)
        for batch in batches:
            rows = []
            for key, text in zip(batch["doc_key"], batch["text"], strict=True):
                for p in chunk_document(text, counter, cfg):
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
            out = pd.DataFrame(rows, columns=CHUNK_SCHEMA.fieldNames())
            yield out.astype({"passage_index": "int32", "n_tokens": "Int32", "truncated": bool})

    return run
