"""Big documents in bounded memory: one multi-megabyte document of unique text through ingest, dedup and
chunk (local Spark, the default model's tokenizer), with the Python workers' peak memory per stage.

    .venv/bin/python benchmarks/big_documents.py [--sizes-mb 10 50]

The document is random words drawn from 2^40 values, so every word 5-gram (every shingle) is new and no
cache or set can shrink it. A sampler reads the resident memory of every PySpark Python worker
(/proc, every 50 ms) while each stage runs; the figure is the largest worker's peak. An idle worker that
has imported pyspark, pandas and numpy sits at about 100 MB, and the tokenizer adds its own. Before
MinHash worked on slices of shingles, a 50 MB document needed a shingles x permutations matrix of
about 7 GB in one worker. Last line: RESULT sizes_mb=... dedup_peak_mb=... chunk_peak_mb=...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import threading
import time
from pathlib import Path

from backforth_spark.app.pipeline import context_for
from backforth_spark.core import schemas as s
from backforth_spark.core.config import load_config
from backforth_spark.spark.stages import chunk, dedup, ingest

REPO = Path(__file__).resolve().parents[1]


def worker_rss_mb() -> dict[int, float]:
    """pid -> resident MB of each pyspark.daemon process (the daemon and the workers it forks) started
    under this process (its Spark), not other Spark applications on the machine."""
    parent, rss, daemon = {}, {}, set()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            pid = int(proc.name)
            status = (proc / "status").read_text()
            parent[pid] = int(re.search(r"PPid:\s+(\d+)", status).group(1))
            found = re.search(r"VmRSS:\s+(\d+)", status)
            rss[pid] = int(found.group(1)) / 1024 if found else 0.0
            if b"pyspark.daemon" in (proc / "cmdline").read_bytes():
                daemon.add(pid)
        except (OSError, AttributeError):
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return {pid: rss[pid] for pid in daemon if ours(pid)}


class PeakSampler:
    """The largest resident memory any Python worker reached while the block ran."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, *worker_rss_mb().values(), 0.0)
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def unique_text(mb: int, seed: int = 11) -> str:
    rng = random.Random(seed)
    words, size = [], 0
    while size < mb * 2**20:
        line = " ".join(f"u{rng.getrandbits(40):x}" for _ in range(12)) + ".\n"
        words.append(line)
        size += len(line)
    return "".join(words)


def run(mb: int, root: Path) -> dict:
    folder = root / f"in-{mb}"
    folder.mkdir(parents=True)
    (folder / "big.jsonl").write_text(
        json.dumps({"id": "big", "source": "bench", "text": unique_text(mb)}) + "\n"
    )
    cfg = load_config(
        REPO / "conf" / "local.yaml",
        # a new Python worker per task: each stage's peak is its own, not memory an earlier stage's
        # worker kept (a freed heap is seldom returned to the OS)
        [
            f"workdir={root / str(mb)}",
            "tracking.enabled=false",
            "chunk.max_passages_per_doc=null",
            "spark.conf.spark.python.worker.reuse=false",
        ],  # fmt: skip
    )
    ctx = context_for(cfg, f"bench-{mb}", inputs=(str(folder),))
    ctx.spark.sparkContext.setLogLevel("ERROR")
    result = {"mb": mb}
    for name, stage in (("ingest", ingest), ("dedup", dedup), ("chunk", chunk)):
        started = time.perf_counter()
        with PeakSampler() as sampler:
            stage.run(ctx)
        result[f"{name}_s"] = round(time.perf_counter() - started, 1)
        result[f"{name}_peak_mb"] = round(sampler.peak)
    result["passages"] = ctx.tables.read(s.PASSAGES).count()
    ctx.tables.drop_staging()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 50])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-big-"))
    results = [run(mb, root) for mb in args.sizes_mb]
    keys = ("ingest_s", "ingest_peak_mb", "dedup_s", "dedup_peak_mb", "chunk_s", "chunk_peak_mb", "passages")
    print(" ".join(f"{h:>14}" for h in ("size", *keys)))
    for r in results:
        print(" ".join([f"{str(r['mb']) + ' MB':>14}", *(f"{r[k]:>14}" for k in keys)]))
    sizes = "/".join(str(r["mb"]) for r in results)
    print(f"RESULT sizes_mb={sizes} ingest_peak_mb={'/'.join(str(r['ingest_peak_mb']) for r in results)} "
          f"dedup_peak_mb={'/'.join(str(r['dedup_peak_mb']) for r in results)} "
          f"chunk_peak_mb={'/'.join(str(r['chunk_peak_mb']) for r in results)}")  # fmt: skip


if __name__ == "__main__":
    main()
