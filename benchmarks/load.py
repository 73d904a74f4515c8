"""Any corpus size on a fixed machine: N documents through ingest, dedup and chunk with conf/local.yaml.

    make bench-load N=400000          # or: .venv/bin/python benchmarks/load.py --docs 400000

Builds (once, kept under --corpus-dir) N Dolma documents of 2-6 KB made of the sample's sentences, 5%
exact copies and 5% near-copies (2% of words edited) of earlier documents, in several gzip files and one
big file holding 40% of them (tests/load_corpus.py; the suite's load test runs a smaller one). Then
runs `backforth run --config conf/local.yaml --stages ingest,dedup,chunk` (a CLI process of its own,
tracking off, every passage kept) and samples, every half second, the resident memory of its JVM (in
local mode the driver and the executor) and of every Python worker the JVM started. Checks that every
document is counted: ingest's documents = N, dedup's input = N with the planted exact copies found,
chunk's input = dedup's representatives.

Prints the wall time, documents per second, each stage's wall time and phases, and the peak resident
memory of the JVM, of the largest Python worker and of all Python workers together. Last line:
RESULT n_docs=... wall_s=... docs_per_s=... jvm_peak_mb=... worker_peak_mb=... workers_peak_mb=...
counted=yes|no exit=...
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.load_corpus import build_corpus  # noqa: E402

STAGES = ("ingest", "dedup", "chunk")


def corpus(n_docs: int, root: Path) -> tuple[Path, dict[str, int]]:
    """The corpus of n_docs documents under root, built on first use."""
    folder = root / f"docs-{n_docs}"
    if not (folder / "_planted.json").exists():
        started = time.perf_counter()
        build_corpus(n_docs, folder)
        print(f"corpus: built in {time.perf_counter() - started:.0f} s")
    return folder, json.loads((folder / "_planted.json").read_text())


class Peaks:
    """Peak resident memory of a CLI process's JVM and of the Python workers that JVM started."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.jvm = self.worker = self.workers = 0

    def sample(self) -> None:
        try:
            kids = self.root.children(recursive=True)
        except psutil.Error:
            return
        jvm = workers = worker = 0
        for proc in kids:
            try:
                rss = proc.memory_info().rss
                if proc.name() == "java":
                    jvm += rss
                elif any(p.name() == "java" for p in proc.parents()):  # started by the JVM
                    workers += rss
                    worker = max(worker, rss)
            except psutil.Error:
                continue
        self.jvm, self.worker = max(self.jvm, jvm), max(self.worker, worker)
        self.workers = max(self.workers, workers)


def run(input_dir: Path, workdir: Path, settings: list[str]) -> tuple[int, float, Peaks, dict]:
    """`backforth run` of the three stages, sampled; (exit code, wall s, peaks, summary)."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    summary = workdir / "summary.json"
    cmd = [
        sys.executable, "-m", "backforth_spark.app.cli", "run", "--config", str(REPO / "conf" / "local.yaml"),
        "--stages", ",".join(STAGES), "--input", str(input_dir), "--workdir", str(workdir),
        "--set", "tracking.enabled=false", "--set", "chunk.max_passages_per_doc=null",
        *[x for s in settings for x in ("--set", s)],
        "--summary-json", str(summary),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = Peaks(proc.pid)
    while proc.poll() is None:
        peaks.sample()
        time.sleep(0.5)
    wall = time.perf_counter() - started
    output = proc.stdout.read() if proc.stdout else ""
    print(output.rstrip())
    data = json.loads(summary.read_text()) if summary.exists() else {}
    return proc.returncode, wall, peaks, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--corpus-dir", default="/tmp/backforth-bench-load/corpus")
    parser.add_argument("--workdir", default="/tmp/backforth-bench-load/work")
    parser.add_argument("--set", action="append", default=[], dest="settings", help="config override")
    args = parser.parse_args()
    input_dir, planted = corpus(args.docs, Path(args.corpus_dir))
    size = sum(f.stat().st_size for f in input_dir.glob("*.gz"))
    print(f"corpus: {args.docs} documents in {input_dir} ({size / 2**20:.0f} MiB gzip), planted {planted}")
    code, wall, peaks, summary = run(input_dir, Path(args.workdir), args.settings)
    stages = summary.get("stages", {})
    for name in STAGES:
        if name in stages:
            phases = summary.get("phases", {}).get(name, {})
            print(f"{name:<8} {stages[name]['wall_s']:8.1f} s  phases {json.dumps(phases)}")
    problems = []
    if code == 0:
        ingest, dedup, chunk = (stages[name] for name in STAGES)
        if ingest["documents"] != args.docs:
            problems.append(f"ingest counted {ingest['documents']} documents of {args.docs}")
        if dedup["rows_in"] != args.docs:
            problems.append(f"dedup decided {dedup['rows_in']} documents of {args.docs}")
        if dedup["exact_duplicates"] < planted["exact"]:
            problems.append(f"dedup found {dedup['exact_duplicates']} exact copies of {planted['exact']}")
        if chunk["rows_in"] != dedup["rows_out"]:
            problems.append(f"chunk read {chunk['rows_in']} documents of {dedup['rows_out']} representatives")
    for p in problems:
        print(f"COUNT MISMATCH: {p}")
    mb = 2**20
    print(
        f"wall {wall:.1f} s, {args.docs / wall:.0f} documents/s; peak RSS: JVM {peaks.jvm / mb:.0f} MiB, "
        f"largest Python worker {peaks.worker / mb:.0f} MiB, "
        f"all Python workers {peaks.workers / mb:.0f} MiB"
    )
    print(
        f"RESULT n_docs={args.docs} wall_s={wall:.1f} docs_per_s={args.docs / wall:.0f} "
        f"jvm_peak_mb={peaks.jvm / mb:.0f} "
        f"worker_peak_mb={peaks.worker / mb:.0f} workers_peak_mb={peaks.workers / mb:.0f} "
        f"counted={'yes' if code == 0 and not problems else 'no'} exit={code}"
    )
    sys.exit(code or (1 if problems else 0))


if __name__ == "__main__":
    main()
