from itertools import combinations

import numpy as np
import pytest

from backforth_spark.core.components import NEW, OLD
from backforth_spark.core.dedup_local import (
    NewDoc,
    OldBucket,
    candidate_edges,
    decisions,
    first_by,
    near_duplicates,
    signature_similarity,
    spanning_tree_edges,
    touched_buckets,
)


def _doc(key, norm_hash="h", url=None, bands=()):
    return NewDoc(key, url, norm_hash, b"", tuple(bands))


def test_first_by_prefers_the_old_representative_then_the_smallest_new_key():
    docs = [_doc("cc/3", "x"), _doc("cc/1", "x"), _doc("cc/2", "y"), _doc("cc/9", "z")]
    dups, survivors = first_by(docs, lambda d: d.norm_hash, {"y": "cc/0"})
    assert sorted((d.doc_key, c) for d, c in dups) == [("cc/2", "cc/0"), ("cc/3", "cc/1")]
    assert [d.doc_key for d in survivors] == ["cc/1", "cc/9"]


def test_first_by_keeps_every_document_without_a_value():
    docs = [_doc("cc/2"), _doc("cc/1")]
    dups, survivors = first_by(docs, lambda d: d.url, {})
    assert dups == [] and [d.doc_key for d in survivors] == ["cc/1", "cc/2"]


def test_touched_buckets_lists_the_new_documents_of_each_band_and_hash():
    buckets = touched_buckets([_doc("cc/b", bands=(7, 8)), _doc("cc/a", bands=(7, 9))])
    assert buckets == {(0, 7): ["cc/a", "cc/b"], (1, 8): ["cc/b"], (1, 9): ["cc/a"]}


def test_a_small_bucket_gives_every_pair_with_a_new_member_smaller_key_first():
    new = {(0, 5): ["cc/b", "cc/d"]}
    old = {(0, 5): OldBucket(2, "cc/a", ("cc/a", "cc/c"))}
    edges, oversized = candidate_edges(new, old, pairwise_bucket_size=4, max_bucket_size=10, signature={})
    assert oversized == 0
    assert edges == {
        ("cc/a", OLD, "cc/b", NEW),
        ("cc/a", OLD, "cc/d", NEW),
        ("cc/b", NEW, "cc/c", OLD),
        ("cc/b", NEW, "cc/d", NEW),
        ("cc/c", OLD, "cc/d", NEW),
    }  # not (cc/a, cc/c): two old representatives


def _sig(*values) -> bytes:
    return np.array(values, dtype="<u4").tobytes()


def test_a_bucket_over_the_largest_size_gives_a_star_from_its_smallest_old_member_and_counts_as_oversized():
    new = {(2, 5): ["cc/b", "cc/d"], (3, 1): ["cc/v", "cc/w", "cc/x", "cc/y", "cc/z"]}
    old = {(2, 5): OldBucket(5, "cc/c", None)}
    edges, oversized = candidate_edges(new, old, pairwise_bucket_size=2, max_bucket_size=4, signature={})
    assert oversized == 2  # 7 members in (2, 5); 5 in (3, 1)
    assert edges == {
        ("cc/c", OLD, "cc/b", NEW),
        ("cc/c", OLD, "cc/d", NEW),
        ("cc/v", NEW, "cc/w", NEW),  # no old member: the smallest new key is the centre
        ("cc/v", NEW, "cc/x", NEW),
        ("cc/v", NEW, "cc/y", NEW),
        ("cc/v", NEW, "cc/z", NEW),
    }


def test_a_bucket_between_the_sizes_gives_the_pairs_of_its_spanning_tree():
    # a drifting chain a - b - c - d: each one value from the one before, so a star from cc/a would pair
    # it with cc/d (two values of four apart); the tree pairs neighbours only
    signature = {
        "cc/a": _sig(1, 2, 3, 4),
        "cc/b": _sig(9, 2, 3, 4),
        "cc/c": _sig(9, 8, 3, 4),
        "cc/d": _sig(9, 8, 7, 4),
    }
    new = {(0, 4): ["cc/b", "cc/c", "cc/d"]}
    old = {(0, 4): OldBucket(1, "cc/a", ("cc/a",))}
    edges, oversized = candidate_edges(
        new, old, pairwise_bucket_size=2, max_bucket_size=4, signature=signature
    )
    assert oversized == 0
    assert edges == {("cc/a", OLD, "cc/b", NEW), ("cc/b", NEW, "cc/c", NEW), ("cc/c", NEW, "cc/d", NEW)}


def test_a_spanning_tree_skips_pairs_of_two_old_representatives():
    members = [("cc/a", OLD, _sig(1, 1, 1)), ("cc/b", OLD, _sig(1, 1, 2)), ("cc/c", NEW, _sig(1, 2, 2))]
    assert spanning_tree_edges(members) == [("cc/b", OLD, "cc/c", NEW)]


def test_a_spanning_tree_does_not_depend_on_the_order_of_its_members():
    rng = np.random.default_rng(4)
    members = [(f"cc/{i:02d}", int(rng.integers(2)), _sig(*rng.integers(0, 3, size=6))) for i in range(30)]
    expected = sorted(spanning_tree_edges(members))
    for _ in range(5):
        shuffled = [members[i] for i in rng.permutation(len(members))]
        assert sorted(spanning_tree_edges(shuffled)) == expected


def _components(nodes, pairs) -> set[frozenset]:
    """Connected components by depth-first search (written here, independent of the code under test)."""
    neighbours = {n: set() for n in nodes}
    for a, b in pairs:
        neighbours[a].add(b)
        neighbours[b].add(a)
    seen, out = set(), set()
    for start in nodes:
        if start in seen:
            continue
        stack, component = [start], set()
        while stack:
            node = stack.pop()
            if node not in component:
                component.add(node)
                stack.extend(neighbours[node] - component)
        seen |= component
        out.add(frozenset(component))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_a_spanning_tree_connects_what_checking_every_pair_connects(seed):
    # new members only (old ones never merge with each other); signatures of 16 values drawn from few,
    # so many pairs pass and many fail a threshold of 10 equal values
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 1000, size=16)
    members = []
    for i in range(60):
        values = base.copy()
        changed = rng.choice(16, size=int(rng.integers(0, 10)), replace=False)
        values[changed] = rng.integers(0, 1000, size=changed.size)
        members.append((f"cc/{i:02d}", NEW, _sig(*values)))
    sig = {k: np.frombuffer(v, dtype="<u4") for k, _, v in members}

    def passes(a, b):
        return int((sig[a] == sig[b]).sum()) >= 10

    keys = [k for k, _, _ in members]
    every_pair = _components(keys, [(a, b) for a, b in combinations(keys, 2) if passes(a, b)])
    tree = _components(keys, [(a, b) for a, _, b, _ in spanning_tree_edges(members) if passes(a, b)])
    assert tree == every_pair
    assert 1 < len(every_pair) < len(keys)  # the case is not trivial: some merge, some stay apart


def test_a_lone_document_gives_no_pair():
    assert candidate_edges({(0, 1): ["cc/a"]}, {}, 4, 10, {}) == (set(), 0)


def test_near_duplicates_follow_verified_pairs_to_the_old_representative():
    edges = {("cc/a", OLD, "cc/b", NEW), ("cc/b", NEW, "cc/c", NEW), ("cc/c", NEW, "cc/d", NEW)}
    near, verified = near_duplicates(edges, lambda a, b: 0.9, lambda a, b: {a, b} != {"cc/c", "cc/d"})
    assert verified == 2
    assert near == {"cc/b": ("cc/a", 0.9), "cc/c": ("cc/a", 0.9)}  # cc/d's only pair failed


def test_a_duplicate_of_a_duplicate_points_at_the_final_cluster():
    a, b, c = _doc("cc/a", "h1"), _doc("cc/b", "h1"), _doc("cc/c", "h2")
    rows = decisions(exact=[(b, "cc/a")], url=[], near={"cc/a": ("cc/0", 0.85)}, survivors=[a, c])
    assert sorted(rows) == [
        ("cc/a", "h1", "cc/0", False, "near", 0.85),
        ("cc/b", "h1", "cc/0", False, "exact", 1.0),
        ("cc/c", "h2", "cc/c", True, "representative", None),
    ]


def test_signature_similarity_is_the_share_of_equal_values():
    a = bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0])
    b = bytes([1, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0, 4, 0, 0, 0])
    assert signature_similarity(a, b) == 0.75
