import random
import shutil
from itertools import combinations

import pytest
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from backforth_spark.core import schemas as t
from backforth_spark.core.components import NEW, OLD, near_labels
from backforth_spark.core.config import load_config
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.stages import dedup
from backforth_spark.spark.tables import Tables
from tests import near_dup_corpus
from tests.conftest import DOLMA_SAMPLE, LOCAL_CONF, add_documents


def _decisions(ctx):
    return ctx.tables.read(t.DEDUP).select("doc_key", "cluster_id", "is_representative", "reason")


def _pick(counts, *keys):
    return {k: counts[k] for k in keys}


def test_exact_duplicates_keep_the_smallest_key(make_ctx, spark):
    ctx = make_ctx("dedup.near=false")
    add_documents(ctx, [("cc/2", "Hello, World!"), ("cc/1", "hello world"), ("cc/3", "Something else.")])
    counts = dedup.run(ctx)
    assert _pick(counts, "rows_in", "rows_out", "exact_duplicates") == {
        "rows_in": 3,
        "rows_out": 2,
        "exact_duplicates": 1,
    }
    expected = spark.createDataFrame(
        [
            ("cc/1", "cc/1", True, "representative"),
            ("cc/2", "cc/1", False, "exact"),
            ("cc/3", "cc/3", True, "representative"),
        ],
        "doc_key string, cluster_id string, is_representative boolean, reason string",
    )
    assertDataFrameEqual(_decisions(ctx), expected)


def test_incremental_run_keeps_old_representative_and_decides_only_new_docs(make_ctx):
    ctx = make_ctx("dedup.near=false")
    add_documents(ctx, [("cc/5", "The same page.")])
    dedup.run(ctx)
    # a new copy with a smaller key must not displace the representative already chosen
    add_documents(ctx, [("cc/0", "the same page"), ("cc/7", "A new page.")])
    counts = dedup.run(ctx)
    assert _pick(counts, "rows_in", "rows_out", "exact_duplicates") == {
        "rows_in": 2,
        "rows_out": 1,
        "exact_duplicates": 1,
    }
    rows = {r["doc_key"]: r for r in _decisions(ctx).collect()}
    assert rows["cc/5"]["is_representative"] and not rows["cc/0"]["is_representative"]
    assert rows["cc/0"]["cluster_id"] == "cc/5"
    assert dedup.run(ctx)["rows_in"] == 0


def _words(n, start=0):
    return " ".join(f"word{i}" for i in range(start, start + n))


def drifting_chain(n: int, words: int = 200, step: int = 2, seed: int = 3) -> list[tuple[str, str]]:
    """`n` documents, each the one before with `step` words replaced by new ones: neighbours are near
    duplicates, far ends share nothing (a page edited version after version)."""
    rng = random.Random(seed)
    text = [f"w{i}" for i in range(words)]
    docs, fresh = [], words
    for i in range(n):
        docs.append((f"cc/chain{i:05d}", " ".join(text)))
        for _ in range(step):
            text[rng.randrange(words)] = f"w{fresh}"
            fresh += 1
    return docs


def test_a_long_chain_of_drifting_near_copies_ends_in_one_cluster(make_ctx):
    # the whole stage in Spark, label propagation included; every bucket of three or more members over
    # the pairwise cap, so links come from spanning trees. FineWeb's 14 bands, not the default's 25: with
    # fewer buckets to stand in for a link a star from each bucket's centre loses, stars cut this chain
    # in 4 (`benchmarks/components.py --chains --forced 250`)
    ctx = make_ctx(
        "dedup.driver_max_new_docs=0",
        "dedup.driver_components_max_edges=0",
        "dedup.pairwise_bucket_size=2",
        "dedup.bands=14",
    )
    docs = drifting_chain(250)
    first, last = set(docs[0][1].split()), set(docs[-1][1].split())
    assert len(first & last) < 40  # the ends are not near duplicates of each other
    add_documents(ctx, [*docs, ("cc/zz-other", _words(200, 90_000))])
    counts = dedup.run(ctx)
    # min-label propagation alone needs about as many rounds as the chain is long (over a hundred here)
    assert counts["cc_rounds"] <= 30, counts["cc_rounds"]
    assert (counts["near_duplicates"], counts["rows_out"]) == (249, 2)
    clusters = {r["doc_key"]: r["cluster_id"] for r in ctx.tables.read(t.DEDUP).collect()}
    assert {clusters[k] for k, _ in docs} == {"cc/chain00000"}  # the smallest key represents the chain
    assert clusters["cc/zz-other"] == "cc/zz-other"


def test_a_chain_of_a_thousand_drifting_copies_with_every_bucket_over_the_pairwise_cap_ends_in_one_cluster(
    make_ctx,
):
    # decided on the driver (a thousand new documents); with 14 bands of 8 rows this chain broke in two
    # by LSH chance, and with stars from each bucket's centre in many more pieces
    ctx = make_ctx("dedup.pairwise_bucket_size=2")
    docs = drifting_chain(1000)
    add_documents(ctx, docs)
    counts = dedup.run(ctx)
    assert (counts["near_duplicates"], counts["rows_out"]) == (999, 1)
    clusters = {r["cluster_id"] for r in ctx.tables.read(t.DEDUP).collect()}
    assert clusters == {"cc/chain00000"}


def test_signatures_of_another_layout_are_refused_before_any_work(make_ctx):
    ctx = make_ctx()
    add_documents(ctx, [("cc/m", _words(300))])
    dedup.run(ctx)
    assert ctx.tables.properties(t.MINHASH)[dedup.LAYOUT_PROPERTY] == "ngram=5 bands=25 rows=8 seed=1"
    changed = make_ctx("dedup.bands=20")
    add_documents(changed, [("cc/n", _words(300).replace("word7 ", "seven "))])
    with pytest.raises(ValueError, match=r"another layout \(ngram=5 bands=25 rows=8 seed=1\).*bands=20"):
        dedup.run(changed)
    assert changed.tables.read(t.DEDUP).count() == 1  # the new document waits, undecided


def test_signatures_written_before_layouts_were_recorded_are_judged_by_their_length(make_ctx, spark):
    ctx = make_ctx()
    # a table of FineWeb's 14 x 8 (112 values a signature), as written before the layout was recorded
    old = spark.createDataFrame(
        [("cc/m", bytes(4 * 112), [0] * 14)], "doc_key string, signature binary, bands array<bigint>"
    )
    ctx.tables.merge_insert_new(
        t.MINHASH,
        old.select("*", F.lit("r0").alias("run_id"), F.current_timestamp().alias("written_at")),
        ["doc_key"],
    )
    add_documents(ctx, [("cc/n", _words(300))])
    with pytest.raises(ValueError, match=r"another layout \(112 values per signature\)"):
        dedup.run(ctx)
    # the same table with the layout that made it: recorded, and the new document decided
    again = make_ctx("dedup.bands=14")
    assert dedup.run(again)["rows_in"] == 1
    assert again.tables.properties(t.MINHASH)[dedup.LAYOUT_PROPERTY] == "ngram=5 bands=14 rows=8 seed=1"


def _planted_rounds() -> tuple[list, list, dict[str, str]]:
    """The planted corpus in two halves, the second also bringing an exact copy and a URL copy of two
    documents of the first; and the URLs."""
    docs = near_dup_corpus.build(DOLMA_SAMPLE, seed=7)
    random.Random(5).shuffle(docs)
    half = len(docs) // 2
    first = [*docs[:half], ("cc/unique", _words(200, 50_000)), ("cc/url-first", _words(200, 60_000))]
    second = [
        *docs[half:],
        ("cc/unique-copy", _words(200, 50_000).upper()),
        ("cc/url-copy", _words(200, 70_000)),
    ]
    urls = {"cc/url-first": "https://example.com/a", "cc/url-copy": "https://example.com/a"}
    return first, second, urls


def _decide(spark, root, run_id, docs, urls, *overrides) -> dict:
    cfg = load_config(LOCAL_CONF, [f"workdir={root}", "dedup.url=true", *overrides])
    ctx = StageContext(spark, cfg, Tables(spark, root / "tables", run_id), run_id)
    add_documents(ctx, docs, urls=urls)
    return dedup.run(ctx)


def test_a_refresh_decided_on_the_driver_matches_the_spark_path(spark, tmp_path):
    # buckets of 2 give pairs, of 3 spanning trees, larger ones stars and count as oversized: every
    # rule on both paths
    buckets = ("dedup.pairwise_bucket_size=2", "dedup.max_bucket_size=3")
    first, second, urls = _planted_rounds()
    _decide(spark, tmp_path / "first", "r0", first, urls, *buckets)
    # the same refresh over copies of the first run's tables, on each path
    results = {}
    for path, extra in (("driver", ()), ("spark", ("dedup.driver_max_new_docs=0",))):
        shutil.copytree(tmp_path / "first", tmp_path / path)
        counts = _decide(spark, tmp_path / path, "r1", second, urls, *buckets, *extra)
        rows = Tables(spark, tmp_path / path / "tables").read(t.DEDUP).drop("run_id", "written_at").collect()
        results[path] = (counts, sorted(tuple(r) for r in rows))
    assert results["driver"] == results["spark"]
    refresh, decisions = results["driver"]
    assert refresh["url_duplicates"] == 1 and refresh["exact_duplicates"] >= 1
    assert refresh["near_duplicates"] > 0 and refresh["oversized_buckets"] > 0
    assert refresh["candidate_pairs"] > refresh["verified_pairs"] > 0
    reps = {r[0] for r in decisions if r[3]}
    assert any(r[2] in reps and r[4] == "near" for r in decisions)


def test_components_in_spark_and_on_the_driver_agree(make_ctx, spark):
    rng = random.Random(11)
    keys = [f"d{i:03d}" for i in range(80)]
    prio = {k: OLD if rng.random() < 0.15 else NEW for k in keys}
    edges = set()
    while len(edges) < 90:
        a, b = sorted(rng.sample(keys, 2))
        if NEW in (prio[a], prio[b]):  # the stage never pairs two old representatives
            edges.add((a, b))
    expected = near_labels((a, prio[a], b, prio[b]) for a, b in edges)
    edges_df = spark.createDataFrame(sorted(edges), "src string, dst string")
    nodes = spark.createDataFrame(sorted(prio.items()), "doc_key string, prio int")
    labels, _ = dedup._components(make_ctx(), edges_df, nodes, None)
    got = {
        r["doc_key"]: (r["label"]["prio"], r["label"]["doc_key"]) for r in labels.where("prio = 1").collect()
    }
    assert got == expected and len({v for v in expected.values()}) > 3


def test_new_near_copy_of_an_old_representative_is_dropped_and_signed_once(make_ctx):
    ctx = make_ctx()
    add_documents(ctx, [("cc/m", _words(300)), ("cc/n", _words(300, 1000))])
    first = dedup.run(ctx)
    assert first["signatures_computed"] == 2
    # a smaller key, nearly the same text: the old representative must stay
    add_documents(ctx, [("cc/a", _words(300).replace("word7 ", "seven ")), ("cc/q", _words(300, 9000))])
    second = dedup.run(ctx)
    assert second["signatures_computed"] == 2  # only the new documents were signed
    assert ctx.tables.read(t.MINHASH).count() == 4
    rows = {r["doc_key"]: r for r in ctx.tables.read(t.DEDUP).collect()}
    assert rows["cc/m"]["is_representative"]
    assert (rows["cc/a"]["reason"], rows["cc/a"]["cluster_id"]) == ("near", "cc/m")
    assert rows["cc/q"]["is_representative"]


def test_a_run_with_every_document_decided_commits_nothing_and_counts_zero(make_ctx):
    ctx = make_ctx()
    add_documents(ctx, [("cc/m", _words(300)), ("cc/n", _words(300, 1000))])
    dedup.run(ctx)
    versions = [ctx.tables.version(name) for name in (t.DEDUP, t.MINHASH)]
    again = dedup.run(ctx)
    assert (again["rows_in"], again["near_duplicates"], again["signatures_computed"]) == (0, 0, 0)
    assert [ctx.tables.version(name) for name in (t.DEDUP, t.MINHASH)] == versions


def test_near_dedup_quality_on_planted_duplicates(make_ctx):
    """Recall >= 0.95 on pairs with true Jaccard >= 0.85 (both in one cluster), precision >= 0.95 among
    the reported (duplicate, representative) pairs, and agreement with datasketch's MinHashLSH."""
    ctx = make_ctx()
    docs = near_dup_corpus.build(DOLMA_SAMPLE, seed=7)
    add_documents(ctx, docs)
    dedup.run(ctx)
    cluster_of = {r["doc_key"]: r["cluster_id"] for r in ctx.tables.read(t.DEDUP).collect()}
    assert len(cluster_of) == len(docs)
    clustered = near_dup_corpus.same_cluster_pairs(cluster_of)
    reported = {tuple(sorted((k, c))) for k, c in cluster_of.items() if k != c}
    truth = near_dup_corpus.true_jaccard(docs, ctx.cfg.dedup.ngram)

    should = {p for p, j in truth.items() if j >= 0.85}
    assert len(should) >= 20  # the corpus does plant such pairs
    recall = len(should & clustered) / len(should)
    precision = sum(truth[p] >= ctx.cfg.dedup.threshold for p in reported) / len(reported)
    assert recall >= 0.95, recall
    assert precision >= 0.95, precision

    reference = _datasketch_pairs(docs, ctx.cfg.dedup, truth)
    agreement = len(reference & clustered) / len(reference | clustered)
    print(f"recall={recall:.3f} precision={precision:.3f} agreement={agreement:.3f} pairs={len(clustered)}")
    # pairs right at the 0.8 threshold may fall either side under the two normalisations
    assert agreement >= 0.85, agreement


def _datasketch_pairs(docs, cfg, truth):
    """Pairs datasketch's LSH proposes and the exact Jaccard confirms, closed transitively."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=cfg.bands * cfg.rows, params=(cfg.bands, cfg.rows))
    hashes = {}
    for key, text in docs:
        m = MinHash(num_perm=cfg.bands * cfg.rows, seed=cfg.seed)
        m.update_batch([" ".join(s).encode() for s in near_dup_corpus.shingles(text, cfg.ngram)])
        lsh.insert(key, m)
        hashes[key] = m
    parent = {k: k for k, _ in docs}

    def find(k):
        while parent[k] != k:
            k = parent[k]
        return k

    for key, m in hashes.items():
        for other in lsh.query(m):
            pair = tuple(sorted((key, other)))
            if other != key and truth[pair] >= cfg.threshold:
                ra, rb = sorted((find(key), find(other)))
                parent[rb] = ra
    groups = {}
    for k in parent:
        groups.setdefault(find(k), []).append(k)
    return {tuple(sorted(p)) for g in groups.values() for p in combinations(g, 2)}


def test_a_failed_look_up_on_the_driver_fails_the_stage_after_the_signatures_commit(make_ctx, monkeypatch):
    ctx = make_ctx()
    add_documents(ctx, [("cc/m", _words(300)), ("cc/n", _words(300, 1000))])
    dedup.run(ctx)
    add_documents(ctx, [("cc/p", _words(300, 5000))])

    def lost_worker(*_):
        raise RuntimeError("executor lost")

    monkeypatch.setattr(dedup, "_near_pairs_on_driver", lost_worker)
    with pytest.raises(RuntimeError, match="executor lost"):
        dedup.run(ctx)
    # the signatures' MERGE beside the look-up finished before the error left the stage; no decision
    assert ctx.tables.read(t.MINHASH).where("doc_key = 'cc/p'").count() == 1
    assert ctx.tables.read(t.DEDUP).where("doc_key = 'cc/p'").count() == 0
    monkeypatch.undo()
    rerun = dedup.run(ctx)  # the rerun decides it, and does not sign it again
    assert (rerun["rows_in"], rerun["signatures_computed"]) == (1, 0)
