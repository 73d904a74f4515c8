"""Dedup decisions for a few new documents on one machine (no Spark): the rules of the dedup stage's
Spark path (backforth_spark/spark/stages/dedup.py), for a refresh whose new documents fit on the driver.

A scheduled refresh brings a few hundred or thousand documents to a corpus of millions. In Spark their
decisions cost about a hundred small jobs whatever their number; here the stage collects them with the
few old rows they can touch (old representatives with the same hash or URL, and the old members of the
LSH buckets they fall in), decides them in plain Python, and writes the decisions back in one MERGE.
Both paths give the same decisions and counts (tests/spark/test_dedup.py checks them against each other).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from backforth_spark.core import minhash
from backforth_spark.core.components import NEW, OLD, near_labels
from backforth_spark.core.text import normalise

REPRESENTATIVE, EXACT, URL, NEAR = "representative", "exact", "url", "near"

# (doc_key, norm_hash, cluster_id, is_representative, reason, similarity): a dedup_decisions row
Decision = tuple[str, str, str, bool, str, float | None]
# (src, src_prio, dst, dst_prio): a candidate pair, each end with its priority (OLD or NEW)
Edge = tuple[str, int, str, int]


@dataclass(frozen=True)
class NewDoc:
    doc_key: str
    url: str | None
    norm_hash: str
    signature: bytes  # little-endian uint32 values
    bands: tuple[int, ...]


@dataclass(frozen=True)
class OldBucket:
    """The old representatives in one LSH bucket a new document falls in: how many, the smallest key,
    and every key when the bucket is small enough to give all its pairs (else None)."""

    size: int
    smallest: str
    keys: tuple[str, ...] | None


def signature_similarity(a: bytes, b: bytes) -> float:
    """Estimated Jaccard: the share of equal MinHash values of two stored signatures."""
    return float(np.mean(np.frombuffer(a, dtype="<u4") == np.frombuffer(b, dtype="<u4")))


def text_similarity(a: str, b: str, ngram: int) -> float:
    """Exact Jaccard of two texts' word n-gram shingle sets (after normalisation)."""
    return minhash.jaccard_of_arrays(
        minhash.shingle_hashes(normalise(a), ngram), minhash.shingle_hashes(normalise(b), ngram)
    )


def first_by(docs: Iterable[NewDoc], key: Callable[[NewDoc], str | None], known: Mapping[str, str]):
    """Group `docs` by `key` (None: a group of its own); each document's cluster is the old
    representative known for its group, else the group's smallest doc_key. Returns (duplicates as
    (doc, cluster_id), survivors)."""
    groups: dict[str, list[NewDoc]] = defaultdict(list)
    survivors: list[NewDoc] = []
    for doc in docs:
        value = key(doc)
        if value is None:
            survivors.append(doc)
        else:
            groups[value].append(doc)
    duplicates = []
    for value, members in groups.items():
        cluster = known.get(value) or min(d.doc_key for d in members)
        for doc in members:
            if doc.doc_key == cluster:
                survivors.append(doc)
            else:
                duplicates.append((doc, cluster))
    return duplicates, sorted(survivors, key=lambda d: d.doc_key)


def touched_buckets(survivors: Iterable[NewDoc]) -> dict[tuple[int, int], list[str]]:
    """(band, hash) -> the new documents in that bucket, sorted."""
    buckets: dict[tuple[int, int], list[str]] = defaultdict(list)
    for doc in survivors:
        for band, h in enumerate(doc.bands):
            buckets[(band, h)].append(doc.doc_key)
    return {b: sorted(keys) for b, keys in buckets.items()}


def candidate_edges(
    new_buckets: Mapping[tuple[int, int], list[str]],
    old_buckets: Mapping[tuple[int, int], OldBucket],
    pairwise_bucket_size: int,
    max_bucket_size: int,
) -> tuple[set[Edge], int]:
    """The candidate pairs of the buckets new documents fall in, and how many of those buckets are
    oversized. A bucket up to `pairwise_bucket_size` gives every pair with a new member (the smaller
    key first); a larger one a star from its centre, the smallest (prio, doc_key), to each new member."""
    edges: set[Edge] = set()
    oversized = 0
    for bucket, new_keys in new_buckets.items():
        old = old_buckets.get(bucket)
        size = len(new_keys) + (old.size if old else 0)
        if size < 2:
            continue
        oversized += size > max_bucket_size
        if size <= pairwise_bucket_size:
            old_keys = old.keys if old is not None and old.keys is not None else ()
            members = [(NEW, k) for k in new_keys] + [(OLD, k) for k in old_keys]
            for first, second in combinations(members, 2):
                if first[0] == OLD and second[0] == OLD:
                    continue  # two old representatives were compared when the second arrived
                (pa, a), (pb, b) = sorted((first, second), key=lambda m: m[1])
                edges.add((a, pa, b, pb))
        else:
            center = (OLD, old.smallest) if old else (NEW, new_keys[0])
            edges.update((center[1], center[0], k, NEW) for k in new_keys if k != center[1])
    return edges, oversized


def near_duplicates(
    edges: Iterable[Edge], similarity: Callable[[str, str], float], passes: Callable[[str, str], bool]
) -> tuple[dict[str, tuple[str, float]], int]:
    """New documents that are near duplicates: doc_key -> (cluster_id, similarity to it), and how many
    candidate pairs passed `passes`. The clusters are the components of the passing pairs, each led by
    the old representative it touches, else by its smallest key (components.near_labels)."""
    verified = [e for e in edges if passes(e[0], e[2])]
    labels = near_labels(verified)
    near = {key: (label[1], similarity(key, label[1])) for key, label in labels.items() if label[1] != key}
    return near, len(verified)


def decisions(
    exact: Iterable[tuple[NewDoc, str]],
    url: Iterable[tuple[NewDoc, str]],
    near: Mapping[str, tuple[str, float]],
    survivors: Iterable[NewDoc],
) -> list[Decision]:
    """One row per new document: each survivor that is no near duplicate is a representative; a
    duplicate of a document that turned out a duplicate itself points at that one's cluster."""
    dups: list[Decision] = [(d.doc_key, d.norm_hash, c, False, EXACT, 1.0) for d, c in exact]
    dups += [(d.doc_key, d.norm_hash, c, False, URL, None) for d, c in url]
    reps: list[Decision] = []
    for doc in survivors:
        if doc.doc_key in near:
            cluster, sim = near[doc.doc_key]
            dups.append((doc.doc_key, doc.norm_hash, cluster, False, NEAR, sim))
        else:
            reps.append((doc.doc_key, doc.norm_hash, doc.doc_key, True, REPRESENTATIVE, None))
    final = {row[0]: row[2] for row in dups}
    return reps + [(k, h, final.get(c, c), rep, why, sim) for k, h, c, rep, why, sim in dups]
