"""Connected components at any diameter: chains of drifting near-copies through the real dedup stage.

    .venv/bin/python benchmarks/components.py [--chains 100 1000 10000]

Each chain is N documents of 200 words, each the one before with two words replaced, so neighbours are
near duplicates (Jaccard about 0.9 on 5-gram shingles) while the ends share nothing: a component whose
diameter grows with N (about N/2 here, since documents two steps apart are still near copies). Min-label
propagation alone needs about that many rounds; with pointer jumping the rounds grow with log N.
Runs the dedup stage (local Spark, Delta tables in a temporary folder) twice per chain: components by
label propagation in Spark (`dedup.driver_components_max_edges=0`), then by union-find on the driver
(the default for graphs up to that many verified pairs). Prints, per chain and path, the rounds, the
clusters found (1 is right) and the stage's wall time; last line:
RESULT chains=... rounds=... clusters=... wall_s=... driver_clusters=... driver_wall_s=...
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

from backforth_spark.app.pipeline import context_for
from backforth_spark.core import schemas as s
from backforth_spark.core.config import load_config
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


def run_chain(n: int, root: Path, max_edges: int) -> dict:
    overrides = [f"workdir={root / f'{n}-{max_edges}'}", "tracking.enabled=false"]
    # the stage in Spark up to the components (a chain of new documents would otherwise be decided on
    # the driver whole): what differs between the two runs is where the components are found
    overrides += [f"dedup.driver_components_max_edges={max_edges}", "dedup.driver_max_new_docs=0"]
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
    return {"docs": n, "rounds": counts["cc_rounds"], "clusters": clusters, "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args()
    spark_path, driver_path = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.chains:
            for label, max_edges, results in (("spark", 0, spark_path), ("driver", 10**9, driver_path)):
                result = run_chain(n, Path(tmp), max_edges)
                print(
                    f"chain of {n:>6} documents, components on the {label:<6}: {result['rounds']} rounds, "
                    f"{result['clusters']} cluster(s), dedup stage {result['wall_s']} s",
                    flush=True,
                )
                results.append(result)
    join = lambda results, key: "/".join(str(r[key]) for r in results)  # noqa: E731
    figures = " ".join(f"{k}={join(spark_path, k)}" for k in ("rounds", "clusters", "wall_s"))
    figures += " " + " ".join(f"driver_{k}={join(driver_path, k)}" for k in ("clusters", "wall_s"))
    print(f"RESULT chains={join(spark_path, 'docs')} {figures}")


if __name__ == "__main__":
    main()
