"""Python-worker side of `dedup`: normalised-text hashes, MinHash signatures, pair similarities."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pandas as pd
from pyspark.sql.functions import pandas_udf

# type objects, not DDL strings: parsing a string needs a live SparkContext at import. Each UDF is made
# when a stage asks for it, not at import: pyspark binds a UDF to a classic session or to Spark Connect
# when it is made, and this module is imported before any session exists.
from pyspark.sql.types import DoubleType, StringType

from backforth_spark.core import minhash
from backforth_spark.core.config import DedupConfig
from backforth_spark.core.dedup_local import signature_similarity, spanning_tree_edges, text_similarity
from backforth_spark.core.text import NormHashing, norm_hash


def norm_hash_udf():
    """A pandas UDF: the normalised-text hash of each text."""

    @pandas_udf(StringType())
    def run(text: pd.Series) -> pd.Series:
        return text.map(norm_hash)

    return run


def hashes_and_signatures(cfg: DedupConfig) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """mapInPandas: (doc_key, url, text) -> (doc_key, url, norm_hash, signature, bands). The text is
    normalised once, a piece at a time, for both the exact hash and the shingles (bounded memory for a
    page of any size)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        a, b = minhash.permutations(cfg.bands * cfg.rows, cfg.seed)
        for batch in batches:
            hashes, sigs = [], []
            for text in batch["text"]:
                hashing = NormHashing()
                sigs.append(minhash.text_signature(hashing.pieces(text), cfg.ngram, a, b))
                hashes.append(hashing.hexdigest())
            yield pd.DataFrame(
                {
                    "doc_key": batch["doc_key"],
                    "url": batch["url"],
                    "norm_hash": hashes,
                    "signature": [s.astype("<u4").tobytes() for s in sigs],
                    "bands": [minhash.band_hashes(s, cfg.bands, cfg.rows) for s in sigs],
                }
            )

    return run


def estimated_jaccard_udf():
    """A pandas UDF: the Jaccard similarity two MinHash signatures estimate."""

    @pandas_udf(DoubleType())
    def run(sig_a: pd.Series, sig_b: pd.Series) -> pd.Series:
        return pd.Series([signature_similarity(x, y) for x, y in zip(sig_a, sig_b, strict=True)])

    return run


def exact_jaccard(ngram: int):
    """A pandas UDF: exact Jaccard of two texts' shingle sets."""

    @pandas_udf(DoubleType())
    def run(text_a: pd.Series, text_b: pd.Series) -> pd.Series:
        return pd.Series([text_similarity(x, y, ngram) for x, y in zip(text_a, text_b, strict=True)])

    return run


# the pairs a bucket's spanning tree gives (`bucket_tree_edges`): the columns of the stage's candidate pairs
TREE_EDGES_SCHEMA = "src string, src_prio int, dst string, dst_prio int"


def bucket_tree_edges(members: pd.DataFrame) -> pd.DataFrame:
    """applyInPandas per LSH bucket: (doc_key, prio, signature) of its members -> the candidate pairs of
    their spanning tree (backforth_spark/core/dedup_local.py). The stage sends only buckets of at most
    dedup.max_bucket_size members here: a group is held whole in the worker."""
    rows = zip(members["doc_key"], members["prio"].astype(int), members["signature"], strict=True)
    edges = spanning_tree_edges([(k, p, bytes(sig)) for k, p, sig in rows])
    return pd.DataFrame(edges, columns=["src", "src_prio", "dst", "dst_prio"])
