"""Connected components at any diameter: chains of drifting near-copies through the real dedup stage.

    .venv/bin/python benchmarks/components.py [--chains 100 1000 10000] [--forced 1000]

Each chain is N documents of 200 words, each the one before with two words replaced, so neighbours are
near duplicates (Jaccard about 0.9 on 5-gram shingles) while the ends share nothing: a component whose
diameter grows with N (about N/2 here, since documents two steps apart are still near copies). Min-label
propagation alone needs about that many rounds; with pointer jumping the rounds grow with log N.
Runs the dedup stage (local Spark, Delta tables in a temporary folder) twice per chain: components by
label propagation in Spark (`dedup.driver_components_max_edges=0`), then by union-find on the driver
(the default for graphs up to that many verified pairs). Beside each chain's clusters it prints the
breaks LSH chance alone would make: the sum over its links of the probability that the two documents
share no band, (1 - J^rows)^bands at the link's exact Jaccard J.

Then the `--forced` chain with every bucket of three or more members over the pairwise cap
(`dedup.pairwise_bucket_size=2`), checked along each bucket's spanning tree (the default up to
`dedup.max_bucket_size`) and, as the peer, against the bucket's centre only (`dedup.max_bucket_size=2`:
every such bucket a star), with the default band layout and with 14 x 8 (fewer bands, so fewer
buckets that can stand in for a link a star loses; the forced figures are default/14x8). Last line:
RESULT chains=... rounds=... clusters=... expected_breaks=... wall_s=... driver_clusters=...
driver_wall_s=... forced=... forced_tree_clusters=... forced_star_clusters=...
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
from pathlib import Path

from pyspark.sql import functions as F

from backforth_spark.app.pipeline import context_for
from backforth_spark.core import minhash
from backforth_spark.core import schemas as s
from backforth_spark.core.config import load_config
from backforth_spark.core.text import normalise
from backforth_spark.spark.stages import dedup

REPO = Path(__file__).resolve().parents[1]


def drifting_chain(n: int, words: int = 200, step: int = 2, seed: int = 3) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    text = [f"w{i}" for i in range(words)]
    docs, fresh = [], words
    for i in range(n):
        docs.append((f"cc/chain{i:06d}", " ".join(text)))
        for _ in range(step):
            text[rng.randrange(words)] = f"w{fresh}"
            fresh += 1
    return docs


def expected_breaks(docs: list[tuple[str, str]], cfg) -> float:
    """Sum over the chain's links of the probability that LSH alone misses the link."""
    shingles = [minhash.shingle_set(normalise(text), cfg.ngram) for _, text in docs]
    return sum(
        1 - minhash.candidate_probability(minhash.jaccard(a, b), cfg.bands, cfg.rows)
        for a, b in zip(shingles, shingles[1:], strict=False)
    )


def run_chain(n: int, root: Path, max_edges: int, *extra: str) -> dict:
    overrides = [f"workdir={root / uuid.uuid4().hex}", "tracking.enabled=false"]
    # the stage in Spark up to the components (a chain of new documents would otherwise be decided on
    # the driver whole): what differs between the two runs is where the components are found
    overrides += [f"dedup.driver_components_max_edges={max_edges}", "dedup.driver_max_new_docs=0", *extra]
    cfg = load_config(REPO / "conf" / "local.yaml", overrides)
    ctx = context_for(cfg, f"bench-{n}")
    ctx.spark.sparkContext.setLogLevel("ERROR")
    rows = [(k, "cc", k.split("/")[1], text, None, None, None, None, "bench", i + 1) for i, (k, text) in
            enumerate(drifting_chain(n))]  # fmt: skip
    schema = ", ".join(f"{name} {typ}" for name, typ, _ in s.DOCUMENTS_COLUMNS)
    docs = ctx.spark.createDataFrame(rows, schema)
    lineage = [F.lit("bench").alias("run_id"), F.current_timestamp().alias("written_at")]
    ctx.tables.merge_insert_new(s.DOCUMENTS, docs.select("*", *lineage), ["doc_key"])
    started = time.perf_counter()
    counts = dedup.run(ctx)
    wall = time.perf_counter() - started
    clusters = ctx.tables.read(s.DEDUP).select("cluster_id").distinct().count()
    ctx.tables.drop_staging()
    result = {"docs": n, "rounds": counts["cc_rounds"], "clusters": clusters, "wall_s": round(wall, 1)}
    return result | {"expected_breaks": f"{expected_breaks(drifting_chain(n), cfg.dedup):.1e}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument(
        "--forced", type=int, default=1000, help="chain length with buckets forced over the cap"
    )
    args = parser.parse_args()
    spark_path, driver_path = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.chains:
            for label, max_edges, results in (("spark", 0, spark_path), ("driver", 10**9, driver_path)):
                result = run_chain(n, Path(tmp), max_edges)
                print(
                    f"chain of {n:>6} documents, components on the {label:<6}: {result['rounds']} rounds, "
                    f"{result['clusters']} cluster(s) (LSH chance alone: {result['expected_breaks']} "
                    f"expected breaks), dedup stage {result['wall_s']} s",
                    flush=True,
                )
                results.append(result)
        forced = {}
        for layout in ("default", "14x8"):
            bands = () if layout == "default" else ("dedup.bands=14", "dedup.rows=8")
            for label, max_size in (("spanning tree", 1000), ("star", 2)):
                caps = ("dedup.pairwise_bucket_size=2", f"dedup.max_bucket_size={max_size}")
                result = run_chain(args.forced, Path(tmp), 10**9, *bands, *caps)
                forced[(layout, label)] = result["clusters"]
                print(
                    f"chain of {args.forced:>6} documents, {layout} layout, every bucket of 3 or more "
                    f"checked by {label}: {result['clusters']} cluster(s) (LSH chance alone: "
                    f"{result['expected_breaks']} expected breaks), dedup stage {result['wall_s']} s",
                    flush=True,
                )
    join = lambda results, key: "/".join(str(r[key]) for r in results)  # noqa: E731
    figures = " ".join(
        f"{k}={join(spark_path, k)}" for k in ("rounds", "clusters", "expected_breaks", "wall_s")
    )
    figures += " " + " ".join(f"driver_{k}={join(driver_path, k)}" for k in ("clusters", "wall_s"))
    figures += f" forced={args.forced} forced_tree_clusters={forced[('default', 'spanning tree')]}"
    figures += f"/{forced[('14x8', 'spanning tree')]} forced_star_clusters={forced[('default', 'star')]}"
    figures += f"/{forced[('14x8', 'star')]}"
    print(f"RESULT chains={join(spark_path, 'docs')} {figures}")


if __name__ == "__main__":
    main()
