"""Connected components of verified near-duplicate pairs on one machine (union-find, no Spark).

The dedup stage hands a graph here when it is small enough to collect (a refresh's few hundred pairs;
most corpora's tens of thousands): a handful of Spark jobs per propagation round would cost more than
the whole graph. The labels are the fixed point the stage's label propagation in Spark reaches
(backforth_spark/spark/stages/dedup.py), so either path gives the same decisions.
"""

from __future__ import annotations

from collections.abc import Iterable

OLD, NEW = 0, 1  # priorities: an old representative, a new document


def near_labels(edges: Iterable[tuple[str, int, str, int]]) -> dict[str, tuple[int, str]]:
    """The label (prio, doc_key) of every new document named by the pairs (src, src_prio, dst,
    dst_prio): the smallest label it reaches through new documents. Old representatives keep their
    own label and pass nothing on: a path never runs through one, and a new document next to one
    takes the smallest old representative its component touches (else its smallest new key)."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        root = key
        while parent[root] != root:
            root = parent[root]
        while parent[key] != root:  # path compression
            parent[key], key = root, parent[key]
        return root

    touching_old: list[tuple[str, str]] = []  # (new document, old representative next to it)
    for src, src_prio, dst, dst_prio in edges:
        if src_prio == NEW:
            parent.setdefault(src, src)
        if dst_prio == NEW:
            parent.setdefault(dst, dst)
        if src_prio == NEW and dst_prio == NEW:
            a, b = find(src), find(dst)
            if a != b:  # the smaller key stays the root: a root is its component's smallest key
                parent[max(a, b)] = min(a, b)
        elif src_prio == NEW:
            touching_old.append((src, dst))
        elif dst_prio == NEW:
            touching_old.append((dst, src))
    best = {key: (NEW, key) for key in parent if parent[key] == key}
    for new, old in touching_old:
        root = find(new)
        best[root] = min(best[root], (OLD, old))
    return {key: best[find(key)] for key in parent}
