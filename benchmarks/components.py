"""Connected components at any diameter: chains of drifting near-copies through the real dedup stage.

    .venv/bin/python benchmarks/components.py [--chains 100 1000 10000]

Each chain is N documents of 200 words, each the one before with two words replaced, so neighbours are
near duplicates (Jaccard about 0.9 on 5-gram shingles) while the ends share nothing: a component whose
diameter grows with N (about N/2 here, since documents two steps apart are still near copies). Min-label
propagation alone needs about that many rounds; with pointer jumping the rounds grow with log N.
Runs the dedup stage (local Spark, Delta tables in a temporary folder) and prints, per chain, the rounds,
the clusters found (1 is right) and the wall time; last line: RESULT chains=... rounds=... wall_s=...
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

from backforth_spark import schemas as s
from backforth_spark.config import load_config
from backforth_spark.pipeline import context_for
from backforth_spark.stages import dedup

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


def run_chain(n: int, root: Path) -> dict:
    cfg = load_config(REPO / "conf" / "local.yaml", [f"workdir={root / str(n)}", "tracking.enabled=false"])
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
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.chains:
            result = run_chain(n, Path(tmp))
            print(f"chain of {n:>6} documents: {result['rounds']} rounds, {result['clusters']} cluster(s), "
                  f"dedup stage {result['wall_s']} s", flush=True)  # fmt: skip
            results.append(result)
    join = lambda key: "/".join(str(r[key]) for r in results)  # noqa: E731
    figures = " ".join(f"{k}={join(k)}" for k in ("rounds", "clusters", "wall_s"))
    print(f"RESULT chains={join('docs')} {figures}")


if __name__ == "__main__":
    main()
