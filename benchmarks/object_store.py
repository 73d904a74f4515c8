"""The same run on a local workdir and on an S3-compatible store: ingest, dedup and chunk of N documents
with conf/local.yaml, inputs and workdir on local disk, then both on moto's S3 server (s3a connector in
the JVM, Arrow's S3 filesystem in the driver and the Python workers; staging in Delta on both sides so
they differ only in the store).

    make bench-object-store N=20000     # or: .venv/bin/python benchmarks/object_store.py --docs 20000

The corpus is benchmarks/load.py's (tests/load_corpus.py). moto keeps objects in memory and answers
from one Python process: it stands for the store's API, not for S3's throughput or latency, so the
figure is what the object-store path costs in requests and copies, not what S3 would take.

Prints each run's wall time and stage times. Last line:
RESULT n_docs=... local_s=... s3_s=... ratio=... counted=yes|no
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from load import STAGES, corpus  # noqa: E402

from tests.object_store import BUCKET, ObjectStore  # noqa: E402


def run(
    inputs: str, workdir: str, summary: Path, settings: list[str], env: dict[str, str]
) -> tuple[float, dict]:
    cmd = [
        sys.executable, "-m", "backforth_spark.app.cli", "run", "--config", str(REPO / "conf" / "local.yaml"),
        "--stages", ",".join(STAGES), "--input", inputs, "--workdir", workdir,
        "--set", "tracking.enabled=false", "--set", "chunk.max_passages_per_doc=null",
        "--set", "tables.staging_format=delta", "--set", f"driver_dir={summary.parent / 'driver'}",
        *[x for s in settings for x in ("--set", s)], "--summary-json", str(summary),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    data = json.loads(summary.read_text()) if summary.exists() else {}
    for name in STAGES:
        if name in data.get("stages", {}):
            print(f"  {name:<8} {data['stages'][name]['wall_s']:8.1f} s")
    return wall, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--corpus-dir", default="/tmp/backforth-bench-load/corpus")
    args = parser.parse_args()
    jars = sorted((REPO / ".tools" / "s3a-jars").glob("*.jar"))
    if not jars:
        print("no s3a jars: run `make setup` (scripts/fetch_s3a_jars.py)", file=sys.stderr)
        return 2
    input_dir, _ = corpus(args.docs, Path(args.corpus_dir))
    root = Path(tempfile.mkdtemp(prefix="backforth-bench-store-"))
    print(f"{args.docs} documents from {input_dir}")

    print("local workdir:")
    local_s, local = run(str(input_dir), str(root / "work"), root / "local.json", [], dict(os.environ))

    store = ObjectStore(root / "moto.log")
    try:
        for f in sorted(input_dir.glob("*.gz")):
            store.upload(f, f"in/{f.name}")
        classpath = ":".join(str(j) for j in jars)
        settings = [
            f"spark.conf.spark.driver.extraClassPath={classpath}",
            "spark.conf.spark.hadoop.fs.s3a.path.style.access=true",
            "spark.class_archive=null",
        ]
        print("workdir and inputs on the store:")
        s3_s, remote = run(
            f"s3a://{BUCKET}/in/",
            f"s3a://{BUCKET}/work",
            root / "s3.json",
            settings,
            {**os.environ, **store.env},
        )
    finally:
        store.stop()
        shutil.rmtree(root, ignore_errors=True)
    counted = all(
        d.get("stages", {}).get("ingest", {}).get("documents") == args.docs for d in (local, remote)
    ) and (local["stages"]["chunk"]["rows_out"] == remote["stages"]["chunk"]["rows_out"])
    print(f"local {local_s:.1f} s, object store {s3_s:.1f} s ({s3_s / local_s:.2f}x)")
    print(
        f"RESULT n_docs={args.docs} local_s={local_s:.1f} s3_s={s3_s:.1f} ratio={s3_s / local_s:.2f} "
        f"counted={'yes' if counted else 'no'}"
    )
    return 0 if counted else 1


if __name__ == "__main__":
    sys.exit(main())
