import random

from backforth_spark.core.components import NEW, OLD, near_labels


def test_new_documents_take_their_components_smallest_key():
    edges = [("c", NEW, "b", NEW), ("b", NEW, "d", NEW), ("x", NEW, "y", NEW)]
    assert near_labels(edges) == {
        "b": (NEW, "b"),
        "c": (NEW, "b"),
        "d": (NEW, "b"),
        "x": (NEW, "x"),
        "y": (NEW, "x"),
    }


def test_an_old_representative_wins_its_component_whatever_its_key():
    edges = [("a", NEW, "b", NEW), ("b", NEW, "z-old", OLD)]
    assert near_labels(edges) == {"a": (OLD, "z-old"), "b": (OLD, "z-old")}


def test_two_old_representatives_in_one_component_the_smaller_wins():
    edges = [("n1", NEW, "old-b", OLD), ("n1", NEW, "n2", NEW), ("old-a", OLD, "n2", NEW)]
    assert near_labels(edges) == {"n1": (OLD, "old-a"), "n2": (OLD, "old-a")}


def test_an_old_representative_is_no_way_through():
    # n1 and n2 meet only through old-b: n1 is a copy of old-b alone, while n2 also touches old-a, the
    # smaller key. A union-find through old-b would give n1 old-a, which n1 never came near.
    edges = [("n1", NEW, "old-b", OLD), ("old-b", OLD, "n2", NEW), ("n2", NEW, "old-a", OLD)]
    assert near_labels(edges) == {"n1": (OLD, "old-b"), "n2": (OLD, "old-a")}
    edges = [("n1", NEW, "old-b", OLD), ("n2", NEW, "old-a", OLD)]
    assert near_labels(edges) == {"n1": (OLD, "old-b"), "n2": (OLD, "old-a")}


def test_a_long_chain_in_any_order_is_one_component():
    keys = [f"k{i:05d}" for i in range(5000)]
    edges = [(keys[i], NEW, keys[i + 1], NEW) for i in range(len(keys) - 1)]
    random.Random(7).shuffle(edges)
    assert set(near_labels(edges).values()) == {(NEW, "k00000")}


def test_no_pairs_no_labels():
    assert near_labels([]) == {}
