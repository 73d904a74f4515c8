"""Ingest + dedup + chunk through Spark, against datatrove's MinHash deduplication on the same documents.

    make bench-dedup N=25000         # or: .venv/bin/python benchmarks/dedup.py --docs 25000

Builds N Dolma documents of several KB from the sentences of the real sample (a share of them
near-duplicates: copies with 2% of their words edited), then times
  ours:      `backforth run --stages ingest,dedup,chunk` (local[2], exact + MinHash LSH 14x8, n-gram 5,
             exact-Jaccard verification, chunking with the model tokenizer), tracking off;
  datatrove: MinhashDedupSignature -> Buckets -> Cluster -> Filter, 14 buckets x 8 hashes, 5-grams,
             2 local workers.
Ours runs on a Spark standalone cluster started on this machine (one worker, 2 cores), so the driver is
a process of its own, as on a real cluster; `--local` runs it in local[2] instead, where one JVM is both
driver and executor. Prints both wall times, the ratio ours/datatrove, documents per second, the peak
resident memory of our driver (the CLI's Python process plus its JVM) and, for reference, of the
executor side (the worker, its executor JVM and Python workers). Last line:
RESULT n_docs=... ours_s=... datatrove_s=... ratio=... peak_driver_mib=...
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "dolma-sample"
sys.path.insert(0, str(REPO))

from backforth_spark.standalone import standalone_cluster  # noqa: E402

DUP_SHARE = 0.1
FILES = 16


def build_corpus(n_docs: int, out: Path, seed: int = 13) -> int:
    """Write n_docs Dolma documents into FILES gzip files; returns how many are planted near-copies."""
    from tests.near_dup_corpus import edit_words

    rng = random.Random(seed)
    sentences = [
        s.strip()
        for f in sorted(SAMPLE.glob("*.jsonl"))
        for line in f.read_text().splitlines()
        for s in json.loads(line)["text"].replace("\n", " ").split(". ")
        if len(s.split()) >= 4
    ]
    out.mkdir(parents=True)
    # one open gzip stream per output file, closed below
    handles = [gzip.open(out / f"part-{i:03d}.jsonl.gz", "wt", encoding="utf-8") for i in range(FILES)]  # noqa: SIM115
    texts: list[str] = []
    planted = 0
    for i in range(n_docs):
        if texts and rng.random() < DUP_SHARE:
            text = edit_words(rng.choice(texts[-1000:]), 0.02, rng)
            planted += 1
        else:
            size = rng.randint(3000, 8000)
            parts: list[str] = []
            while sum(len(p) for p in parts) < size:
                para = ". ".join(rng.choice(sentences) for _ in range(rng.randint(3, 7))) + "."
                parts.append(para)
            text = "\n\n".join(parts)
        texts.append(text)
        doc = {"id": f"doc-{i:07d}", "text": text, "source": "bench", "added": "2024-01-01", "metadata": {}}
        handles[i % FILES].write(json.dumps(doc) + "\n")
    for h in handles:
        h.close()
    return planted


def _rss(pid: int, java_children_only: bool) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        kids = root.children(recursive=True)
        procs = [root, *(c for c in kids if "java" in c.name() or not java_children_only)]
        return sum(p.memory_info().rss for p in procs)
    except psutil.Error:
        return 0


def _watch(
    proc: subprocess.Popen, executor_pid: int | None, poll_s: float = 0.25
) -> tuple[int, float, float]:
    """Wait for proc; return its exit code, the peak RSS of the driver (proc plus its JVM child; in
    local mode that JVM is the executor too) and of the executor side (executor_pid's tree), in MiB."""
    driver = executors = 0
    while proc.poll() is None:
        driver = max(driver, _rss(proc.pid, java_children_only=True))
        if executor_pid is not None:
            executors = max(executors, _rss(executor_pid, java_children_only=False))
        time.sleep(poll_s)
    return proc.returncode, driver / 2**20, executors / 2**20


def run_ours(input_dir: Path, workdir: Path, local: bool) -> tuple[float, float, float, dict]:
    summary = workdir / "summary.json"
    cmd = [
        sys.executable, "-m", "backforth_spark.cli", "run", "--config", str(REPO / "conf" / "local.yaml"),
        "--stages", "ingest,dedup,chunk", "--input", str(input_dir), "--workdir", str(workdir),
        "--set", "tracking.enabled=false", "--set", "chunk.max_passages_per_doc=null",
        "--summary-json", str(summary),
    ]  # fmt: skip
    with ExitStack() as stack:
        executor_pid = None
        if not local:
            cluster = stack.enter_context(standalone_cluster(workdir / "cluster", cores=2, memory="6g"))
            executor_pid = cluster.worker_pid
            cmd += [
                "--set", f"spark.master={cluster.master_url}",
                "--set", "spark.conf.spark.driver.memory=1g",
                "--set", "spark.conf.spark.executor.memory=5g",
            ]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        code, driver, executors = _watch(proc, executor_pid)
        seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"our pipeline failed with exit code {code}")
    return seconds, driver, executors, json.loads(summary.read_text())


def run_datatrove(input_dir: Path, workdir: Path) -> tuple[float, int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    sigs, buckets, clusters = (str(workdir / p) for p in ("sigs", "buckets", "clusters"))

    def reader() -> JsonlReader:
        return JsonlReader(str(input_dir), glob_pattern="*.jsonl.gz")

    logs = str(workdir / "logs")
    started = time.perf_counter()
    LocalPipelineExecutor(
        [reader(), MinhashDedupSignature(sigs, config=cfg)], tasks=FILES, workers=2, logging_dir=f"{logs}/1"
    ).run()
    LocalPipelineExecutor(
        [MinhashDedupBuckets(sigs, buckets, config=cfg)],
        tasks=cfg.num_buckets,
        workers=2,
        logging_dir=f"{logs}/2",
    ).run()
    LocalPipelineExecutor(
        [MinhashDedupCluster(buckets, clusters, config=cfg)], tasks=1, logging_dir=f"{logs}/3"
    ).run()
    LocalPipelineExecutor(
        [reader(), MinhashDedupFilter(clusters), JsonlWriter(str(workdir / "out"))],
        tasks=FILES,
        workers=2,
        logging_dir=f"{logs}/4",
    ).run()
    seconds = time.perf_counter() - started
    kept = 0
    for f in (workdir / "out").glob("*.jsonl.gz"):
        with gzip.open(f, "rt") as lines:
            kept += sum(1 for _ in lines)
    return seconds, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=25_000)
    parser.add_argument("--workdir", default="/tmp/backforth-bench-dedup")
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument(
        "--local", action="store_true", help="run ours in local[2], not on a standalone cluster"
    )
    args = parser.parse_args()

    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    planted = build_corpus(args.docs, root / "input")
    print(f"corpus: {args.docs} documents, {planted} planted near-copies, in {root / 'input'}")

    ours_s, peak, executors, summary = run_ours(root / "input", root / "ours", args.local)
    stages = summary["stages"]
    d = stages["dedup"]
    print(
        f"ours:      {ours_s:8.1f} s  {args.docs / ours_s:7.1f} docs/s  peak driver {peak:.0f} MiB  "
        f"peak executor side {executors:.0f} MiB  ({'local[2]' if args.local else 'standalone, 2 cores'})"
    )
    print(
        f"           ingest {stages['ingest']['wall_s']} s, dedup {d['wall_s']} s, chunk "
        f"{stages['chunk']['wall_s']} s; exact={d['exact_duplicates']} near={d['near_duplicates']} "
        f"kept={d['rows_out']} passages={stages['chunk']['rows_out']}"
    )
    dt_s = float("nan")
    if not args.skip_datatrove:
        dt_s, kept = run_datatrove(root / "input", root / "datatrove")
        print(f"datatrove: {dt_s:8.1f} s  {args.docs / dt_s:7.1f} docs/s  kept={kept}")
    ratio = ours_s / dt_s
    print(f"ratio ours/datatrove: {ratio:.2f}")
    print(
        f"RESULT n_docs={args.docs} ours_s={ours_s:.1f} datatrove_s={dt_s:.1f} ratio={ratio:.2f} "
        f"peak_driver_mib={peak:.0f}"
    )


if __name__ == "__main__":
    main()
