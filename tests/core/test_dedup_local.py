from backforth_spark.core.components import NEW, OLD
from backforth_spark.core.dedup_local import (
    NewDoc,
    OldBucket,
    candidate_edges,
    decisions,
    first_by,
    near_duplicates,
    signature_similarity,
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
    edges, oversized = candidate_edges(new, old, pairwise_bucket_size=4, max_bucket_size=10)
    assert oversized == 0
    assert edges == {
        ("cc/a", OLD, "cc/b", NEW),
        ("cc/a", OLD, "cc/d", NEW),
        ("cc/b", NEW, "cc/c", OLD),
        ("cc/b", NEW, "cc/d", NEW),
        ("cc/c", OLD, "cc/d", NEW),
    }  # not (cc/a, cc/c): two old representatives


def test_a_large_bucket_gives_a_star_from_its_smallest_old_member_and_counts_as_oversized():
    new = {(2, 5): ["cc/b", "cc/d"], (3, 1): ["cc/x", "cc/y", "cc/z"]}
    old = {(2, 5): OldBucket(5, "cc/c", None)}
    edges, oversized = candidate_edges(new, old, pairwise_bucket_size=2, max_bucket_size=4)
    assert oversized == 1  # 7 members in (2, 5); 3 in (3, 1)
    assert edges == {
        ("cc/c", OLD, "cc/b", NEW),
        ("cc/c", OLD, "cc/d", NEW),
        ("cc/x", NEW, "cc/y", NEW),  # no old member: the smallest new key is the centre
        ("cc/x", NEW, "cc/z", NEW),
    }


def test_a_lone_document_gives_no_pair():
    assert candidate_edges({(0, 1): ["cc/a"]}, {}, 4, 10) == (set(), 0)


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
