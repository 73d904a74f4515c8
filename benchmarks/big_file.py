"""Files of any size: one gzip'd Dolma file far larger than the memory given to Spark, through ingest.

    .venv/bin/python benchmarks/big_file.py [--gb 1.5]

Writes one `.jsonl.gz` file whose uncompressed size is `--gb` GiB (documents built from the Dolma
sample's text, each with its own id), then runs the ingest stage in local Spark with 512 MB for the JVM
(`spark.driver.memory`, which in local mode is the executors' too) and a cap on each Python worker
(`spark.executor.pyspark.memory`, 1 GB of address space, its libraries included: 512 MB does not hold
pyarrow and pandas themselves). Before ingest streamed files, each file was one binaryFile value: this
file would have had to fit in the JVM whole, and past 2 GB not even that. Prints the file's
sizes, the lines, documents and quarantined rows, the wall time and the peak resident memory of the
Python workers; last line: RESULT file_gib=... spark_memory_mb=512 documents=... wall_s=...
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

from big_documents import PeakSampler  # noqa: I001 (a sibling script)

from backforth_spark.app.pipeline import context_for
from backforth_spark.core.config import load_config
from backforth_spark.spark.stages import ingest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "dolma-sample"


def write_big_file(path: Path, gib: float) -> tuple[int, int]:
    """(lines, uncompressed bytes) of a gzip'd Dolma file of about `gib` GiB uncompressed."""
    texts = [json.loads(line)["text"] for f in sorted(SAMPLE.glob("*.jsonl")) for line in f.open()]
    target, size, n = int(gib * 2**30), 0, 0
    with gzip.open(path, "wb", compresslevel=1) as out:
        while size < target:
            line = (
                json.dumps({"id": f"d{n}", "source": "bench", "text": texts[n % len(texts)]}) + "\n"
            ).encode()
            out.write(line)
            size += len(line)
            n += 1
    return n, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-bigfile-"))
    (root / "in").mkdir()
    path = root / "in" / "big.jsonl.gz"
    lines, raw = write_big_file(path, args.gb)
    print(
        f"file: {lines} lines, {raw / 2**30:.2f} GiB uncompressed, {path.stat().st_size / 2**20:.0f} MiB gzip"
    )
    cfg = load_config(
        REPO / "conf" / "local.yaml",
        [
            f"workdir={root / 'work'}",
            "tracking.enabled=false",
            "spark.conf.spark.driver.memory=512m",
            "spark.conf.spark.executor.pyspark.memory=1g",
        ],
    )
    ctx = context_for(cfg, "bench-bigfile", inputs=(str(root / "in"),))
    ctx.spark.sparkContext.setLogLevel("ERROR")
    started = time.perf_counter()
    with PeakSampler() as sampler:
        counts = ingest.run(ctx)
    wall = time.perf_counter() - started
    docs, peak = counts["documents"], round(sampler.peak)
    print(f"ingest: lines={counts['lines']} documents={docs} quarantined={counts['quarantined']} "
          f"wall_s={wall:.1f} python_worker_peak_mb={peak}")  # fmt: skip
    print(f"RESULT file_gib={raw / 2**30:.2f} spark_memory_mb=512 lines={lines} documents={docs} "
          f"wall_s={wall:.1f} worker_peak_mb={peak}")  # fmt: skip


if __name__ == "__main__":
    main()
