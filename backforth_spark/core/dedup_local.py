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
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    and every key when the bucket is small enough to be checked member by member (at most
    dedup.max_bucket_size; else None)."""

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
    signature: Mapping[str, bytes],
) -> tuple[set[Edge], int]:
    """The candidate pairs of the buckets new documents fall in, and how many of those buckets are
    oversized. A bucket up to `pairwise_bucket_size` gives every pair with a new member (the smaller
    key first); a larger one up to `max_bucket_size` the pairs of its members' spanning tree
    (`spanning_tree_edges`, from the `signature` of each member); a larger one still a star from its
    centre, the smallest (prio, doc_key), to each new member."""
    edges: set[Edge] = set()
    oversized = 0
    for bucket, new_keys in new_buckets.items():
        old = old_buckets.get(bucket)
        size = len(new_keys) + (old.size if old else 0)
        if size < 2:
            continue
        oversized += size > max_bucket_size
        old_keys = old.keys if old is not None and old.keys is not None else ()
        members = [(k, NEW) for k in new_keys] + [(k, OLD) for k in old_keys]
        if size <= pairwise_bucket_size:
            for first, second in combinations(members, 2):
                if first[1] == OLD and second[1] == OLD:
                    continue  # two old representatives were compared when the second arrived
                (a, pa), (b, pb) = sorted((first, second))
                edges.add((a, pa, b, pb))
        elif size <= max_bucket_size:
            edges.update(spanning_tree_edges([(k, prio, signature[k]) for k, prio in members]))
        else:
            center = (OLD, old.smallest) if old else (NEW, new_keys[0])
            edges.update((center[1], center[0], k, NEW) for k in new_keys if k != center[1])
    return edges, oversized


def spanning_tree_edges(members: Sequence[tuple[str, int, bytes]]) -> list[Edge]:
    """The candidate pairs of a bucket too large for every pair: the edges of a maximum spanning tree
    over its members' estimated similarities (members as (doc_key, prio, signature)), the smaller key
    first, without pairs of two old representatives.

    Why a tree: between any two members it keeps a path whose weakest link is as similar as the weakest
    link of the best path among all pairs (the bottleneck property of maximum spanning trees), so every
    two members that checking all n(n-1)/2 pairs would connect stay connected through n-1 pairs. A star
    from one centre keeps only the members near that centre: a page three edits from it loses its link.
    Prim's algorithm, one signature comparison per member and step: n^2 x num_perm byte compares (a
    bucket of 1,000 members: about 0.1 s). Ties go to the smallest (prio, doc_key), so the tree, and the
    decisions, do not depend on the order the members came in."""
    ordered = sorted(members, key=lambda m: (m[1], m[0]))
    n = len(ordered)
    if n < 2:
        return []
    sigs = np.stack([np.frombuffer(m[2], dtype="<u4") for m in ordered])
    best = np.full(n, -1, dtype=np.int64)  # equal values with the tree, for members outside it
    parent = np.zeros(n, dtype=np.int64)
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0], current, edges = True, 0, []
    for _ in range(n - 1):
        agree = (sigs == sigs[current]).sum(axis=1)
        closer = ~in_tree & (agree > best)  # strictly: a tie keeps the earlier (smaller) parent
        best[closer], parent[closer] = agree[closer], current
        current = int(np.argmax(np.where(in_tree, -2, best)))
        in_tree[current] = True
        a, b = ordered[parent[current]], ordered[current]
        if a[1] == NEW or b[1] == NEW:
            (ka, pa), (kb, pb) = sorted(((a[0], a[1]), (b[0], b[1])))
            edges.append((ka, pa, kb, pb))
    return edges


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
