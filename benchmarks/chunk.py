"""Chunking throughput of the pure chunker with the default model's tokenizer (no Spark).

    .venv/bin/python benchmarks/chunk.py [--docs N]

Documents are the Dolma sample's texts repeated to N; prints documents/s and tokens/s, then a
machine-readable last line: RESULT n_docs=... seconds=... docs_s=... tokens_s=...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from backforth_spark.core.chunking import chunk_document
from backforth_spark.core.config import load_config
from backforth_spark.core.model import resolve_model
from udfs.chunking import HFTokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--sample", default=str(REPO.parent / "shared" / "data" / "dolma-sample"))
    args = parser.parse_args()

    cfg = load_config(REPO / "conf" / "local.yaml", ["chunk.max_passages_per_doc=null"])
    texts = [
        json.loads(line)["text"]
        for f in sorted(Path(args.sample).glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    docs = [texts[i % len(texts)] for i in range(args.docs)]
    tokenizer = HFTokenizer(resolve_model(cfg.llm))

    started = time.perf_counter()
    passages = [p for d in docs for p in chunk_document(d, tokenizer, cfg.chunk)]
    seconds = time.perf_counter() - started
    tokens = sum(p.n_tokens or 0 for p in passages)
    print(f"{len(docs)} documents, {len(passages)} passages, {tokens} tokens in {seconds:.2f} s")
    print(f"{len(docs) / seconds:.1f} documents/s, {tokens / seconds:.0f} tokens/s")
    rates = f"docs_s={len(docs) / seconds:.1f} tokens_s={tokens / seconds:.0f}"
    print(f"RESULT n_docs={len(docs)} seconds={seconds:.2f} {rates}")


if __name__ == "__main__":
    main()
