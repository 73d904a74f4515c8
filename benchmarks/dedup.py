"""Ingest + dedup + chunk through Spark, against datatrove's MinHash deduplication on the same documents.

    make bench-dedup N=25000         # or: .venv/bin/python benchmarks/dedup.py --docs 25000

Builds N Dolma documents of several KB from the sentences of the real sample (a share of them
near-duplicates: copies with 2% of their words edited), then times
  ours:      `backforth run --stages ingest,dedup,chunk` (local[2], exact + MinHash LSH 25x8, n-gram 5,
             exact-Jaccard verification, chunking with the model tokenizer), tracking off;
  datatrove: MinhashDedupSignature -> Buckets -> Cluster -> Filter, 25 buckets x 8 hashes, 5-grams,
             2 local workers.
Ours runs on a Spark standalone cluster started on this machine (one worker, 2 cores), so the driver is
a process of its own, as on a real cluster, and in local[2], where one JVM is both driver and executor
(`--modes` picks). Prints the wall times, the ratios ours/datatrove, documents per second, the peak
resident memory of our driver (the CLI's Python process plus its JVM) and of the executor side (the
worker, its executor JVM and Python workers), and where our time went: each stage's timed Spark actions
(the summary's `phases`) beside the floor of the same work done without Spark in this process (per-document
time on a sample x N / 2 cores). Last line:
RESULT n_docs=... ours_standalone_s=... ours_local_s=... datatrove_s=... ratio_standalone=...
ratio_local=... floor_s=...
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backforth_spark.app.standalone import standalone_cluster  # noqa: E402
from backforth_spark.core.config import DedupConfig  # noqa: E402

DUP_SHARE = 0.1
FILES = 16


def build_corpus(n_docs: int, out: Path, seed: int = 13) -> int:
    """Write n_docs Dolma documents into FILES gzip files; returns how many are planted near-copies."""
    from tests.load_corpus import sample_sentences
    from tests.near_dup_corpus import edit_words

    rng = random.Random(seed)
    sentences = sample_sentences()
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
        sys.executable, "-m", "backforth_spark.app.cli", "run", "--config", str(REPO / "conf" / "local.yaml"),
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

    ours = DedupConfig()  # the same layout as ours
    cfg = MinhashConfig(n_grams=ours.ngram, num_buckets=ours.bands, hashes_per_bucket=ours.rows)
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


# Floors: the same work without Spark, in this process, on a sample of the corpus; a floor for N
# documents is the sample's per-document time x N / CORES (the cluster has this many cores).
CORES = 2
FLOOR_SAMPLE = 3000


def measure_floors(input_dir: Path, n_docs: int) -> dict[str, float]:
    """Seconds each phase would take for n_docs on CORES cores with nothing but the library doing it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from backforth_spark.core import minhash
    from backforth_spark.core.chunking import chunk_texts
    from backforth_spark.core.config import load_config
    from backforth_spark.core.model import resolve_model
    from backforth_spark.core.text import NormHashing
    from udfs.chunking import HFTokenizer

    # a floor is per core: the tokenizer's batch call must not spread over both cores here
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    cfg = load_config(REPO / "conf" / "local.yaml", ["chunk.max_passages_per_doc=null"])
    files = sorted(input_dir.glob("*.jsonl.gz"))
    floors: dict[str, float] = {}

    def timed(phase: str, work, count: int) -> None:
        started = time.perf_counter()
        work()
        floors[phase] = (time.perf_counter() - started) / count * n_docs / CORES

    docs: list[dict] = []

    def parse() -> None:  # gzip + json: stdlib only
        for f in files:
            with gzip.open(f, "rt", encoding="utf-8") as lines:
                for line in lines:
                    docs.append(json.loads(line))
                    if len(docs) >= FLOOR_SAMPLE:
                        return

    started = time.perf_counter()
    parse()
    floors["read and parse (gzip + json)"] = (time.perf_counter() - started) / len(docs) * n_docs / CORES
    texts = [d["text"] for d in docs]
    a, b = minhash.permutations(cfg.dedup.bands * cfg.dedup.rows, cfg.dedup.seed)

    def sign() -> None:
        for t in texts:
            hashing = NormHashing()
            signature = minhash.text_signature(hashing.pieces(t), cfg.dedup.ngram, a, b)
            minhash.band_hashes(signature, cfg.dedup.bands, cfg.dedup.rows)
            hashing.hexdigest()

    timed("normalise, hash, MinHash (our core, no Spark)", sign, len(texts))
    backend = HFTokenizer(resolve_model(cfg.llm)).backend
    timed(
        "tokenise (tokenizer batch API, ids only)",
        lambda: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)],
        len(texts),
    )
    tokenizer = HFTokenizer(resolve_model(cfg.llm))
    if tokenizer.ranked is not None:
        timed(
            "tokenise (tiktoken on its vocabulary, ids only)",
            lambda: [tokenizer.ranked.ids(t) for t in texts],
            len(texts),
        )
    timed(
        "tokenise + split (our core, no Spark)",
        lambda: list(chunk_texts(texts, tokenizer, cfg.chunk)),
        len(texts),
    )
    table = pa.Table.from_pylist([{k: d[k] for k in ("id", "text", "source", "added")} for d in docs])
    out = input_dir.parent / "floor.parquet"
    timed("write documents (pyarrow Parquet)", lambda: pq.write_table(table, out), len(docs))
    return floors


# our phases (Tables.timed, per stage) matched with the floor of the same work; a table's write is
# "create <table>" on a fresh workdir, "merge <table>" (or "stage <table>") when it exists
FLOOR_OF = {
    ("ingest", "read and parse"): "read and parse (gzip + json)",
    ("ingest", "documents"): "write documents (pyarrow Parquet)",
    ("dedup", "minhash_signatures"): "normalise, hash, MinHash (our core, no Spark)",
    ("chunk", "passages"): "tokenise + split (our core, no Spark)",
}


def floor_of(stage: str, phase: str) -> str | None:
    verb, _, table = phase.partition(" ")
    return FLOOR_OF.get((stage, table if verb in ("create", "merge", "stage") else phase))


def print_breakdown(summary: dict, floors: dict[str, float]) -> None:
    print(f"  {'stage':<7} {'phase':<28} {'ours s':>8} {'floor s':>8}  floor")
    for stage, phases in summary["phases"].items():
        for phase, seconds in phases.items():
            floor_name = floor_of(stage, phase)
            floor = f"{floors[floor_name]:8.1f}  {floor_name}" if floor_name else f"{'':8}"
            print(f"  {stage:<7} {phase:<28} {seconds:8.1f} {floor}")
        other = summary["stages"][stage]["wall_s"] - sum(phases.values())
        print(f"  {stage:<7} {'(planning, listing, other)':<28} {other:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=25_000)
    parser.add_argument("--workdir", default="/tmp/backforth-bench-dedup")
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["standalone", "local"],
        default=["standalone", "local"],
        help="run ours on a standalone cluster, in local[2], or both (one after the other)",
    )
    args = parser.parse_args()

    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    planted = build_corpus(args.docs, root / "input")
    print(f"corpus: {args.docs} documents, {planted} planted near-copies, in {root / 'input'}")
    floors = measure_floors(root / "input", args.docs)
    print(f"floors for {args.docs} documents on {CORES} cores (no Spark; per-document time x N / cores):")
    for name, seconds in floors.items():
        print(f"  {name:<48} {seconds:8.1f} s")

    ours: dict[str, float] = {}
    for mode in args.modes:
        seconds, peak, executors, summary = run_ours(root / "input", root / f"ours-{mode}", mode == "local")
        ours[mode] = seconds
        stages = summary["stages"]
        d = stages["dedup"]
        print(
            f"ours ({mode}): {seconds:8.1f} s  {args.docs / seconds:7.1f} docs/s  "
            f"peak driver {peak:.0f} MiB  peak executor side {executors:.0f} MiB"
        )
        print(
            f"           ingest {stages['ingest']['wall_s']} s, dedup {d['wall_s']} s, chunk "
            f"{stages['chunk']['wall_s']} s; exact={d['exact_duplicates']} near={d['near_duplicates']} "
            f"kept={d['rows_out']} passages={stages['chunk']['rows_out']}"
        )
        print_breakdown(summary, floors)
    dt_s = float("nan")
    if not args.skip_datatrove:
        dt_s, kept = run_datatrove(root / "input", root / "datatrove")
        print(f"datatrove: {dt_s:8.1f} s  {args.docs / dt_s:7.1f} docs/s  kept={kept}")
    ratios = " ".join(f"ratio_{mode}={seconds / dt_s:.2f}" for mode, seconds in ours.items())
    times = " ".join(f"ours_{mode}_s={seconds:.1f}" for mode, seconds in ours.items())
    floor_s = sum(floors[name] for name in FLOOR_OF.values())  # the phases that have a floor
    print(f"RESULT n_docs={args.docs} {times} datatrove_s={dt_s:.1f} {ratios} floor_s={floor_s:.1f}")


if __name__ == "__main__":
    main()
