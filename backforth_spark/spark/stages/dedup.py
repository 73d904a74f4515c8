"""Stage `dedup`: exact, URL and near duplicates -> the `dedup_decisions` table.

Order: exact duplicates of the normalised text, then (optionally) repeated `metadata.url`, then near
duplicates by MinHash LSH over what is left. All of it runs in Spark; the driver only collects counts.

Incremental: only documents without a decision are processed, and only they get MinHash signatures
(kept in `minhash_signatures`). A document that is already a representative stays one: a new copy of
it is marked a duplicate of it. Among new documents the representative is the smallest doc_key, so the
result does not depend on partitioning.

Up to `dedup.driver_max_new_docs` new documents (a scheduled refresh) are decided on the driver
(backforth_spark/core/dedup_local.py) from the few old rows they touch, by the same rules: a handful of Spark
jobs and two MERGEs instead of about a hundred jobs.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from backforth_spark.core import dedup_local as local
from backforth_spark.core import schemas as s
from backforth_spark.core.components import near_labels
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.session import is_local_master
from backforth_spark.spark.tables import Background, require_columns, struct
from udfs.text import (
    TREE_EDGES_SCHEMA,
    bucket_tree_edges,
    estimated_jaccard_udf,
    exact_jaccard,
    hashes_and_signatures,
    norm_hash_udf,
)

# the new documents with their exact hash and MinHash signature (computed together, before any dedup)
NEW_SCHEMA = struct(
    [c for c in s.DOCUMENTS_COLUMNS if c[0] in ("doc_key", "url")]
    + [c for c in s.DEDUP_COLUMNS if c[0] == "norm_hash"]
    + [c for c in s.MINHASH_COLUMNS if c[0] in ("signature", "bands")]
)

# new documents' band rows broadcast to pick the old buckets they touch (2M rows: about 32 MB)
BROADCAST_BAND_ROWS = 2_000_000

REPRESENTATIVE, EXACT, URL, NEAR = local.REPRESENTATIVE, local.EXACT, local.URL, local.NEAR


# the table property of `minhash_signatures` that records the layout its signatures were made with
LAYOUT_PROPERTY = "backforth.minhash.layout"


def run(ctx: StageContext) -> dict[str, Any]:
    """Decide every document that has no decision yet: representative, or a duplicate of which."""
    cfg = ctx.cfg.dedup
    if cfg.near:
        check_signature_layout(ctx)
    docs = ctx.tables.read(s.DOCUMENTS)
    require_columns(docs, ["doc_key", "text", "url"], s.DOCUMENTS)
    decided = ctx.tables.read(s.DEDUP)
    old_reps = decided.where("is_representative").select("doc_key", "norm_hash")
    # the undecided keys with the runs that wrote them, from one scan of each table's key columns;
    # up to driver_max_new_docs of them come back to the driver (their keys)
    undecided_keys = docs.select("doc_key", "run_id").join(decided.select("doc_key"), "doc_key", "left_anti")
    pending = ctx.tables.collect_pending(undecided_keys, cfg.driver_max_new_docs, f"find {s.DOCUMENTS} rows")
    if not pending.runs:
        # nothing new (a scheduled refresh after a quiet day): no jobs, no empty commits
        for name in (s.DEDUP, s.MINHASH) if cfg.near else (s.DEDUP,):
            ctx.tables.ensure(name)
        return nothing_new(cfg.near)
    # those runs' files only (Delta skips the rest by run_id), less what was decided since they wrote
    undecided = docs.where(F.col("run_id").isin(pending.runs))
    if pending.keys is not None:
        undecided = undecided.join(F.broadcast(pending.keys), "doc_key", "left_semi")
    else:
        undecided = undecided.join(decided.select("doc_key"), "doc_key", "left_anti")
    if cfg.near:
        # one pass over the text: the exact hash and the MinHash signature from one normalisation
        new = undecided.select("doc_key", "url", "text").mapInPandas(hashes_and_signatures(cfg), NEW_SCHEMA)
    else:
        new = undecided.select("doc_key", "url", norm_hash_udf()("text").alias("norm_hash"))
    if pending.keys is not None:
        with ctx.tables.timed("collect new documents"):
            few = new.collect()
        return _on_driver(ctx, few, decided.where("is_representative"), docs)
    # hashes and signatures of every new document (about 1.1 KB each), computed once and read by
    # each step below: written to a staging table, not cached, so memory follows a partition
    new = ctx.tables.stage("dedup_new", new)
    counts: dict[str, Any] = {}

    # 1. exact: an old representative with the same hash wins, else the smallest new key
    known = old_reps.groupBy("norm_hash").agg(F.min("doc_key").alias("known"))
    exact = new.join(known, "norm_hash", "left").withColumn(
        "cluster_id", F.coalesce("known", F.min("doc_key").over(Window.partitionBy("norm_hash")))
    )
    dups = [_decisions(exact.where("cluster_id <> doc_key"), EXACT, 1.0)]
    survivors = exact.where("cluster_id = doc_key").select("doc_key", "url", "norm_hash")

    # 2. url: the same rule on metadata.url, among documents that have one
    if cfg.url:
        old_urls = old_reps.join(docs.select("doc_key", "url"), "doc_key").where("url IS NOT NULL")
        known_url = old_urls.groupBy("url").agg(F.min("doc_key").alias("known"))
        by_url = survivors.join(known_url, "url", "left").withColumn(
            "cluster_id",
            F.when(F.col("url").isNull(), F.col("doc_key")).otherwise(
                F.coalesce("known", F.min("doc_key").over(Window.partitionBy("url")))
            ),
        )
        dups.append(_decisions(by_url.where("cluster_id <> doc_key"), URL, None))
        survivors = by_url.where("cluster_id = doc_key").select("doc_key", "url", "norm_hash")

    # 3. near: MinHash LSH among the survivors and the old representatives
    if cfg.near:
        # read by most steps below (signatures, the pool, the components, the decisions): the exact
        # and URL joins above run once instead of once for each
        survivors = ctx.tables.stage("dedup_survivors", survivors)
        near, near_counts = _near_duplicates(ctx, survivors, new, decided)
        counts.update(near_counts)
        dups.append(_decisions(near, NEAR, None))
        survivors = survivors.join(near.select("doc_key"), "doc_key", "left_anti")

    duplicates = dups[0]
    for d in dups[1:]:
        duplicates = duplicates.unionByName(d)
    # a duplicate of a document that turned out a duplicate itself points at the final representative
    final = duplicates.select(F.col("doc_key").alias("cluster_id"), F.col("cluster_id").alias("final"))
    duplicates = (
        duplicates.join(final, "cluster_id", "left")
        .withColumn("cluster_id", F.coalesce("final", "cluster_id"))
        .drop("final")
    )
    reps = survivors.select(
        "doc_key",
        "norm_hash",
        F.col("doc_key").alias("cluster_id"),
        F.lit(True).alias("is_representative"),
        F.lit(REPRESENTATIVE).alias("reason"),
        F.lit(None).cast("double").alias("similarity"),
    )
    decisions = reps.unionByName(duplicates).select(
        *s.names(s.DEDUP_COLUMNS),
        F.lit(ctx.run_id).alias("run_id"),
        F.current_timestamp().alias("written_at"),
    )
    staged = ctx.tables.stage(s.DEDUP, decisions)
    ctx.tables.merge_insert_new(s.DEDUP, staged, ["doc_key"])
    with ctx.tables.timed("count decisions"):
        by_reason = {r["reason"]: r["count"] for r in staged.groupBy("reason").count().collect()}
    return counts | decision_counts(by_reason)


def signature_layout(cfg) -> str:
    """What fixes a MinHash signature and its band hashes: documents share a bucket only when both were
    signed alike."""
    return f"ngram={cfg.ngram} bands={cfg.bands} rows={cfg.rows} seed={cfg.seed}"


def check_signature_layout(ctx: StageContext) -> None:
    """Refuse to sign new documents in a layout other than the stored signatures': a new document would
    never share a bucket with an old one, and every near copy of an old page would pass unnoticed.
    Records the layout on a new table (and on one written before layouts were recorded, when its
    signatures have the configured length)."""
    cfg = ctx.cfg.dedup
    wanted = signature_layout(cfg)
    if not ctx.tables.exists(s.MINHASH):
        ctx.tables.ensure(s.MINHASH)
        ctx.tables.set_properties(s.MINHASH, {LAYOUT_PROPERTY: wanted})
        return
    held = ctx.tables.properties(s.MINHASH).get(LAYOUT_PROPERTY)
    if held is None:
        first = ctx.tables.read(s.MINHASH).select(F.length("signature").alias("n")).first()
        if first is None or first["n"] == 4 * cfg.bands * cfg.rows:
            ctx.tables.set_properties(s.MINHASH, {LAYOUT_PROPERTY: wanted})
            return
        held = f"{first['n'] // 4} values per signature"
    if held != wanted:
        raise ValueError(
            f"{s.MINHASH} holds MinHash signatures of another layout ({held}) than this config's "
            f"({wanted}): new documents would never share an LSH bucket with the old ones. Set "
            "dedup.ngram, dedup.bands, dedup.rows and dedup.seed to the stored layout, or use a new workdir."
        )


def decision_counts(by_reason: dict[str, int]) -> dict[str, Any]:
    """rows_in, rows_out, the duplicates of each kind and the rate, from the decisions by reason."""
    # every new document gets exactly one decision, so the decisions count the input too
    n_in = sum(by_reason.values())
    counts: dict[str, Any] = {"rows_in": n_in, "rows_out": by_reason.get(REPRESENTATIVE, 0)}
    for reason in (EXACT, URL, NEAR):
        counts[f"{reason}_duplicates"] = by_reason.get(reason, 0)
    counts["dedup_rate"] = round(1 - counts["rows_out"] / n_in, 4) if n_in else 0.0
    return counts


def nothing_new(near: bool) -> dict[str, Any]:
    """The counts of a run that found every document decided already."""
    counts: dict[str, Any] = {"rows_in": 0, "rows_out": 0}
    counts |= {f"{reason}_duplicates": 0 for reason in (EXACT, URL, NEAR)} | {"dedup_rate": 0.0}
    if near:
        near_counts = ("signatures_computed", "oversized_buckets", "candidate_pairs", "verified_pairs")
        counts |= dict.fromkeys((*near_counts, "cc_rounds"), 0)
    return counts


def _lineage(ctx: StageContext):
    return [F.lit(ctx.run_id).alias("run_id"), F.current_timestamp().alias("written_at")]


def _keys(ctx: StageContext, column: str, values) -> DataFrame:
    """A small one-column DataFrame of `values`, broadcast to whatever it is joined with."""
    return F.broadcast(ctx.spark.createDataFrame([(v,) for v in sorted(values)], f"{column} string"))


def _on_driver(ctx: StageContext, rows, old_reps: DataFrame, docs: DataFrame) -> dict[str, Any]:
    """Decide the new documents (`rows` of NEW_SCHEMA, collected) on the driver: the old rows they can
    touch are looked up in Spark, the rules run in backforth_spark/core/dedup_local.py, the decisions are
    written in one MERGE (after the signatures, as the Spark path writes them)."""
    cfg = ctx.cfg.dedup
    new = [
        local.NewDoc(
            r["doc_key"],
            r["url"],
            r["norm_hash"],
            *((r["signature"], tuple(r["bands"])) if cfg.near else (b"", ())),
        )
        for r in rows
    ]
    with ctx.tables.timed("find old hashes"):
        hashes = old_reps.join(_keys(ctx, "norm_hash", {d.norm_hash for d in new}), "norm_hash", "left_semi")
        known = dict(hashes.groupBy("norm_hash").agg(F.min("doc_key")).collect())
    exact, survivors = local.first_by(new, lambda d: d.norm_hash, known)
    by_url: list = []
    if cfg.url:
        with ctx.tables.timed("find old urls"):
            urls = _keys(ctx, "url", {d.url for d in survivors if d.url is not None})
            old_urls = docs.select("doc_key", "url").join(urls, "url", "left_semi")
            old_urls = old_urls.join(old_reps.select("doc_key"), "doc_key", "left_semi")
            known_url = dict(old_urls.groupBy("url").agg(F.min("doc_key")).collect())
        by_url, survivors = local.first_by(survivors, lambda d: d.url, known_url)
    counts: dict[str, Any] = {}
    near: dict[str, tuple[str, float]] = {}
    if cfg.near:
        near, counts = _near_on_driver(ctx, survivors, old_reps)
    decided = local.decisions(exact, by_url, near, survivors)
    df = ctx.spark.createDataFrame(decided, struct(s.DEDUP_COLUMNS)).select("*", *_lineage(ctx))
    ctx.tables.merge_insert_new(s.DEDUP, df, ["doc_key"])
    by_reason: dict[str, int] = {}
    for row in decided:
        by_reason[row[4]] = by_reason.get(row[4], 0) + 1
    return counts | decision_counts(by_reason)


def _near_on_driver(ctx: StageContext, survivors: list[local.NewDoc], old_reps: DataFrame):
    """The near duplicates among `survivors` (new documents left after exact and URL dedup) and the
    near-dedup counts, deciding on the driver; the survivors' signatures are stored beside it."""
    sigs = ctx.spark.createDataFrame(
        [(d.doc_key, d.signature, list(d.bands)) for d in survivors], struct(s.MINHASH_COLUMNS)
    ).select("*", *_lineage(ctx))
    # The signatures' MERGE runs beside the look-ups below (they read old representatives only, which
    # the new signatures are not), and is waited for before anything else: the decisions go in after it.
    stored_sigs = Background(
        lambda: ctx.tables.merge_insert_new(s.MINHASH, sigs, ["doc_key"]), "minhash", ctx.spark
    )
    try:
        near, counts = _near_pairs_on_driver(ctx, survivors, old_reps)
    finally:  # also when a look-up failed: no MERGE of this stage runs on after it
        with ctx.tables.timed(f"wait for {s.MINHASH}"):
            signatures = stored_sigs.result()
    return near, {"signatures_computed": signatures, **counts}


def _near_pairs_on_driver(ctx: StageContext, survivors: list[local.NewDoc], old_reps: DataFrame):
    """The near duplicates among `survivors` and the counts of `_near_on_driver`, from the old
    representatives' buckets, signatures and texts that the survivors' buckets touch."""
    cfg = ctx.cfg.dedup
    counts: dict[str, Any] = {}
    new_buckets = local.touched_buckets(survivors)
    stored = ctx.tables.read(s.MINHASH)
    with ctx.tables.timed("find old buckets"):
        touched = F.broadcast(ctx.spark.createDataFrame(list(new_buckets), "band int, h long"))
        old = (
            stored.join(old_reps.select("doc_key"), "doc_key", "left_semi")
            .select("doc_key", F.posexplode("bands").alias("band", "h"))
            .join(touched, ["band", "h"], "left_semi")
            .groupBy("band", "h")
            .agg(
                F.count("*").alias("size"),
                F.min("doc_key").alias("smallest"),
                # every key only where the bucket is checked member by member (a hot bucket can hold
                # millions)
                F.when(F.count("*") <= cfg.max_bucket_size, F.sort_array(F.collect_list("doc_key"))).alias(
                    "keys"
                ),
            )
        )
        old_buckets = {
            (r["band"], r["h"]): local.OldBucket(
                r["size"], r["smallest"], None if r["keys"] is None else tuple(r["keys"])
            )
            for r in old.collect()
        }
    # the signatures of every old member a pair can name, in one look-up: each member of a bucket checked
    # member by member (every pair, or a spanning tree built from all members' signatures), and the
    # centre of a larger one
    signature = {d.doc_key: d.signature for d in survivors}
    old_ends = {k for bucket in old_buckets.values() for k in (bucket.keys or (bucket.smallest,))}
    if old_ends:
        with ctx.tables.timed("find old signatures"):
            old_sigs = stored.select("doc_key", "signature").join(
                _keys(ctx, "doc_key", old_ends), "doc_key", "left_semi"
            )
            signature |= {r["doc_key"]: bytes(r["signature"]) for r in old_sigs.collect()}
    edges, counts["oversized_buckets"] = local.candidate_edges(
        new_buckets, old_buckets, cfg.pairwise_bucket_size, cfg.max_bucket_size, signature
    )
    ends = {e[0] for e in edges} | {e[2] for e in edges}

    def similarity(a: str, b: str) -> float:
        return local.signature_similarity(signature[a], signature[b])

    if cfg.verify == "exact" and edges:
        # Verified in Spark, where the texts are: only the verdicts come back, so the driver never
        # holds candidate texts (a few documents of megabytes each would fill it)
        with ctx.tables.timed("verify candidate texts"):
            passed = _exact_verdicts(ctx, edges, ends)

        def passes(a: str, b: str) -> bool:
            return (a, b) in passed
    else:

        def passes(a: str, b: str) -> bool:
            return similarity(a, b) >= cfg.threshold

    with ctx.tables.timed("verify and components"):
        near, counts["verified_pairs"] = local.near_duplicates(edges, similarity, passes)
    counts["candidate_pairs"] = len(edges)
    counts["cc_rounds"] = 0
    return near, counts


def _exact_verdicts(ctx: StageContext, edges, ends: set[str]) -> set[tuple[str, str]]:
    """The candidate pairs (src, dst) whose texts pass the exact shingle-set Jaccard check."""
    cfg = ctx.cfg.dedup
    pairs = ctx.spark.createDataFrame(sorted({(e[0], e[2]) for e in edges}), "src string, dst string")
    text = ctx.tables.rows_for_keys(s.DOCUMENTS, _keys(ctx, "doc_key", ends)).select("doc_key", "text")
    scored = (
        pairs.join(text.withColumnRenamed("doc_key", "src").withColumnRenamed("text", "t_src"), "src")
        .join(text.withColumnRenamed("doc_key", "dst").withColumnRenamed("text", "t_dst"), "dst")
        .where(exact_jaccard(cfg.ngram)("t_src", "t_dst") >= cfg.threshold)
        .select("src", "dst")
    )
    return {(r["src"], r["dst"]) for r in scored.collect()}


def _decisions(df, reason: str, similarity: float | None):
    sim = F.col("similarity") if "similarity" in df.columns else F.lit(similarity).cast("double")
    return df.select(
        "doc_key",
        "norm_hash",
        "cluster_id",
        F.lit(False).alias("is_representative"),
        F.lit(reason).alias("reason"),
        sim.alias("similarity"),
    )


def _near_duplicates(ctx: StageContext, survivors, new, decided):
    """New documents that are near duplicates: (doc_key, norm_hash, cluster_id, similarity), and counts.
    `survivors` are the new documents left after exact and URL dedup (doc_key, norm_hash); `new` carries
    every new document's signature and bands."""
    cfg = ctx.cfg.dedup
    # the survivors' signatures, kept for those that have none stored yet (a rerun after a crash finds
    # some stored): the insert-only MERGE skips stored keys itself and counts what it inserted. Straight
    # from the persisted signatures: an insert-only MERGE reads its source once.
    sigs = survivors.select("doc_key").join(new.select("doc_key", "signature", "bands"), "doc_key")
    sigs = sigs.select("*", F.lit(ctx.run_id).alias("run_id"), F.current_timestamp().alias("written_at"))
    counts: dict[str, Any] = {}
    counts["signatures_computed"] = ctx.tables.merge_insert_new(s.MINHASH, sigs, ["doc_key"])
    with ctx.tables.timed("count survivors"):
        n_new = survivors.count()

    # the pool: old representatives (priority 0) and the new survivors (priority 1)
    nodes = (
        decided.where("is_representative")
        .select("doc_key", F.lit(0).alias("prio"))
        .unionByName(survivors.select("doc_key", F.lit(1).alias("prio")))
    )
    pool = nodes.join(ctx.tables.read(s.MINHASH).select("doc_key", "bands"), "doc_key")
    bands = pool.select("doc_key", "prio", F.posexplode("bands").alias("band", "h"))
    refresh = bool(decided.where("is_representative").limit(1).count())
    if refresh:
        # a refresh: old representatives' band rows only in buckets a new document falls in, so the
        # grouping below costs what is new, not the corpus (new rows are few: broadcast them when
        # they fit, about 16 bytes per band row)
        touched = bands.where("prio = 1").select("band", "h").distinct()
        if n_new * cfg.bands <= BROADCAST_BAND_ROWS:
            touched = F.broadcast(touched)
        old = bands.where("prio = 0").join(touched, ["band", "h"], "left_semi")
        bands = bands.where("prio = 1").unionByName(old)
    # each band row with its bucket's size, whether the bucket has a new member and its centre (the
    # smallest (prio, doc_key)): one shuffle, and the rows of buckets that can give a pair are few
    bucket = Window.partitionBy("band", "h")
    members = bands.select(
        "*",
        F.count("*").over(bucket).alias("size"),
        F.max("prio").over(bucket).alias("has_new"),
        F.min(F.struct("prio", "doc_key")).over(bucket).alias("center"),
    ).where("size > 1 AND has_new = 1")
    # the band rows of buckets that can give a pair (few: near duplicates share buckets, others not),
    # read twice below (pairs, stars)
    members = ctx.tables.stage("dedup_members", members)
    with ctx.tables.timed("count oversized buckets"):
        oversized = members.where(F.col("size") > cfg.max_bucket_size).select("band", "h").distinct()
        counts["oversized_buckets"] = oversized.count()
    # A bucket up to dedup.pairwise_bucket_size gives every pair with a new member: verification may
    # drop a pair, and the others must still connect what is similar (a chain of drifting copies shares
    # buckets with members that are not each other's near duplicates). A larger one, up to
    # dedup.max_bucket_size, gives the pairs of a spanning tree of its members' signatures (n-1 pairs
    # that keep every connection all pairs would: core/dedup_local.py); a larger one still (a hot
    # bucket of boilerplate) star edges from its centre to each new member, linear however large it is.
    small = members.where(F.col("size") <= cfg.pairwise_bucket_size)
    a, b = small.alias("a"), small.alias("b")
    pairs = (
        a.join(b, ["band", "h"])
        .where((F.col("a.doc_key") < F.col("b.doc_key")) & ((F.col("a.prio") == 1) | (F.col("b.prio") == 1)))
        .select(
            F.col("a.doc_key").alias("src"),
            F.col("a.prio").alias("src_prio"),
            F.col("b.doc_key").alias("dst"),
            F.col("b.prio").alias("dst_prio"),
        )
    )
    stars = members.where(
        (F.col("size") > cfg.max_bucket_size)
        & (F.col("prio") == 1)
        & (F.col("doc_key") != F.col("center.doc_key"))
    ).select(
        F.col("center.doc_key").alias("src"),
        F.col("center.prio").alias("src_prio"),
        F.col("doc_key").alias("dst"),
        F.col("prio").alias("dst_prio"),
    )
    # The signatures of every document a pair can name, read once from minhash_signatures (its largest
    # column): each member of a bucket checked member by member (every pair, or a spanning tree built
    # from all members' signatures) and both ends of each star. The trees, the scores and the final
    # similarities below read only these.
    named = members.where(F.col("size") <= cfg.max_bucket_size).select("doc_key")
    named = named.union(stars.select(F.col("src").alias("doc_key"))).union(stars.select(F.col("dst")))
    sig = ctx.tables.stage(
        "dedup_signatures",
        ctx.tables.read(s.MINHASH)
        .select("doc_key", "signature")
        .join(named.distinct(), "doc_key", "left_semi"),
    )
    large = members.where(
        (F.col("size") > cfg.pairwise_bucket_size) & (F.col("size") <= cfg.max_bucket_size)
    ).select("band", "h", "doc_key", "prio")
    trees = (
        large.join(sig, "doc_key").groupBy("band", "h").applyInPandas(bucket_tree_edges, TREE_EDGES_SCHEMA)
    )
    # staged: the verification below reads back only the documents these pairs name; each end carries
    # its priority, which the components need
    edges = ctx.tables.stage("dedup_candidates", pairs.unionByName(trees).unionByName(stars).distinct())
    ends = edges.select(F.col("src").alias("doc_key")).union(edges.select(F.col("dst").alias("doc_key")))
    ends = ends.distinct()
    scored = (
        edges.join(sig.withColumnRenamed("doc_key", "src").withColumnRenamed("signature", "sig_src"), "src")
        .join(sig.withColumnRenamed("doc_key", "dst").withColumnRenamed("signature", "sig_dst"), "dst")
        .withColumn("similarity", estimated_jaccard_udf()("sig_src", "sig_dst"))
        .drop("sig_src", "sig_dst")
    )
    if cfg.verify == "exact":
        text = ctx.tables.rows_for_keys(s.DOCUMENTS, ends).select("doc_key", "text")
        scored = (
            scored.join(text.withColumnRenamed("doc_key", "src").withColumnRenamed("text", "t_src"), "src")
            .join(text.withColumnRenamed("doc_key", "dst").withColumnRenamed("text", "t_dst"), "dst")
            .withColumn("passed", exact_jaccard(cfg.ngram)("t_src", "t_dst") >= cfg.threshold)
            .drop("t_src", "t_dst")
        )
    else:
        scored = scored.withColumn("passed", F.col("similarity") >= cfg.threshold)
    # every candidate staged with its verdict: the counts read the staged rows, not the pairs again
    verdicts = scored.select("src", "src_prio", "dst", "dst_prio", "similarity", "passed")
    candidates = ctx.tables.stage("dedup_edges", verdicts)
    with ctx.tables.timed("count pairs"):
        verdicts = {r["passed"]: r["count"] for r in candidates.groupBy("passed").count().collect()}
    counts["candidate_pairs"] = sum(verdicts.values())
    counts["verified_pairs"] = verdicts.get(True, 0)
    verified = candidates.where("passed").drop("passed")

    with ctx.tables.timed("components"):
        if counts["verified_pairs"] <= cfg.driver_components_max_edges:
            near, rounds = _components_on_driver(ctx, verified), 0
        else:
            labels, rounds = _components(ctx, verified, nodes, cfg.max_iterations)
            near = labels.where((F.col("prio") == 1) & (F.col("label.doc_key") != F.col("doc_key")))
            near = near.select("doc_key", F.col("label.doc_key").alias("cluster_id"))
    counts["cc_rounds"] = rounds  # 0: the components were found on the driver
    # similarity to the representative, estimated from the signatures
    near = (
        near.join(sig.withColumnRenamed("signature", "sig_doc"), "doc_key")
        .join(
            sig.withColumnRenamed("doc_key", "cluster_id").withColumnRenamed("signature", "sig_rep"),
            "cluster_id",
        )
        .withColumn("similarity", estimated_jaccard_udf()("sig_doc", "sig_rep"))
        .join(survivors.select("doc_key", "norm_hash"), "doc_key")
        .select("doc_key", "norm_hash", "cluster_id", "similarity")
    )
    return near, counts


def _components_on_driver(ctx: StageContext, edges):
    """(doc_key, cluster_id) of the new documents that are near duplicates, by union-find on the
    driver (backforth_spark/core/components.py) over the collected pairs (with their ends' priorities):
    one job instead of two per round of label propagation."""
    ends = edges.select("src", "src_prio", "dst", "dst_prio").collect()
    labels = near_labels((r[0], r[1], r[2], r[3]) for r in ends)
    near = [(key, label[1]) for key, label in sorted(labels.items()) if label[1] != key]
    return ctx.spark.createDataFrame(near, "doc_key string, cluster_id string")


def _checkpoint(ctx: StageContext, df, name: str):
    """Cut the lineage of a round's labels (it grows with every join). Local mode checkpoints on the
    executors, which live as long as the driver. On a cluster the labels go to the staging table `name`
    instead: written under the workdir (or the catalog), a lost executor does not lose a round, and it
    works where `SparkContext.setCheckpointDir` does not exist (Spark Connect)."""
    if is_local_master(ctx.spark):
        return df.localCheckpoint()
    return ctx.tables.stage(name, df)


def _components(ctx: StageContext, edges, nodes, max_rounds: int | None):
    """Connected components by min-label propagation with pointer jumping. Labels are (prio, doc_key)
    structs: old representatives (prio 0) keep their own label and win any component they are in.

    Each round a new document takes the smallest label among its own and its neighbours', then jumps to
    the label of the document its label names (pointer jumping). At a fixed point the labels agree across
    every edge, so a component shares its smallest label. Jumping roughly doubles the distance a label
    travels per round: rounds grow with the logarithm of a component's size, not with its diameter, so a
    chain of thousands of drifting near-copies converges in a few dozen rounds."""
    both = edges.select("src", "dst").unionByName(
        edges.select(F.col("dst").alias("src"), F.col("src").alias("dst"))
    )
    touched = both.select(F.col("src").alias("doc_key")).distinct()
    labels = nodes.join(touched, "doc_key").select(
        "doc_key", "prio", F.struct("prio", "doc_key").alias("label")
    )
    labels = _checkpoint(ctx, labels, "dedup_labels_0")
    rounds = 0
    while True:
        rounds += 1
        incoming = both.join(labels.select(F.col("doc_key").alias("src"), "label"), "src").select(
            F.col("dst").alias("doc_key"), F.col("label").alias("theirs")
        )
        nearest = incoming.groupBy("doc_key").agg(F.min("theirs").alias("nearest"))
        stepped = labels.join(nearest, "doc_key", "left").withColumn(
            "step",
            F.when((F.col("prio") == 1) & (F.col("nearest") < F.col("label")), F.col("nearest")).otherwise(
                F.col("label")
            ),
        )
        # pointer jumping: take the label of the document the new label names, when smaller
        named = labels.select(F.col("doc_key").alias("_named"), F.col("label").alias("jumped"))
        updated = (
            stepped.join(named, F.col("step.doc_key") == F.col("_named"), "left")
            .withColumn(
                "new_label",
                F.when(
                    (F.col("prio") == 1) & F.col("jumped").isNotNull() & (F.col("jumped") < F.col("step")),
                    F.col("jumped"),
                ).otherwise(F.col("step")),
            )
            .select("doc_key", "prio", "label", "new_label")
        )
        # two staging tables in turn: a round reads the one the round before wrote
        updated = _checkpoint(ctx, updated, f"dedup_labels_{rounds % 2}")
        changed = updated.where(F.col("new_label") != F.col("label")).count()
        labels = updated.select("doc_key", "prio", F.col("new_label").alias("label"))
        if changed == 0:
            return labels, rounds
        if max_rounds is not None and rounds >= max_rounds:
            raise RuntimeError(
                f"near-dedup components did not converge in {max_rounds} rounds (dedup.max_iterations); "
                "unset it to run until they do"
            )
