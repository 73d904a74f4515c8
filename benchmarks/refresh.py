"""Refresh cost: N documents through ingest, dedup and chunk, then 1% new documents and a refresh.

    make bench-refresh N=100000      # or: .venv/bin/python benchmarks/refresh.py --docs 100000

The corpus is the dedup benchmark's (N documents of 3-8 KB from the sample's sentences, 10% near-copies,
16 gzip files). The full run is `backforth run --stages ingest,dedup,chunk` in local[2]
(`conf/local.yaml`, MLflow off, every passage kept); then one new file of N/100 documents lands beside
the old ones (half new text, a quarter near-copies of old documents, a quarter exact copies of old
documents) and `backforth refresh --stages ingest,dedup,chunk` runs over the same input folder and
workdir. The LLM stages are left out: this measures planning, dedup and Delta work, not generation.

Prints both wall times (the CLI process, JVM start included) and their ratio, each stage's wall time,
and the rows each stage read: input records of every Spark scan of the stage's jobs (Spark's event log;
the pipeline names each stage's jobs by their job group). Then the refresh once more with nothing new:
the cost of a fresh refresh process before any new data.

Then the same again in one long-lived process, as in a notebook or any driver that stays up: a fresh
workdir, the full run and, once the same new file has landed, the refresh, both through
`pipeline.run_pipeline` in one Spark session (the full run's clock includes starting it), with the
long-lived settings `refresh --every` uses (`spark.long_lived_conf`: the JVM's full JIT). A refresh in
a fresh process pays the JVM's and the Python workers' warm-up again (class loading, code generation,
imports); this second pair shows what the refresh costs without it. Last line:
RESULT n_docs=... new_docs=... full_s=... refresh_s=... ratio=... idle_refresh_s=...
rows_read_full=i/d/c rows_read_refresh=i/d/c session_full_s=... session_refresh_s=... session_ratio=...
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
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.dedup import build_corpus  # noqa: E402
from tests.near_dup_corpus import edit_words  # noqa: E402

STAGES = ("ingest", "dedup", "chunk")


def add_new_documents(input_dir: Path, n_new: int, seed: int = 29) -> dict[str, int]:
    """One more gzip file: half new text, a quarter near-copies and a quarter exact copies of old texts."""
    rng = random.Random(seed)
    old: list[str] = []
    for f in sorted(input_dir.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as lines:
            old += [json.loads(line)["text"] for line in lines]
    kinds = {"new": 0, "near_copy": 0, "exact_copy": 0}
    with gzip.open(input_dir / "part-new.jsonl.gz", "wt", encoding="utf-8") as out:
        for i in range(n_new):
            base = rng.choice(old)
            if i % 4 == 0:
                text, kind = edit_words(base, 0.02, rng), "near_copy"
            elif i % 4 == 1:
                text, kind = base, "exact_copy"
            else:
                # new text: the words of two old documents interleaved (no 5-gram runs survive)
                words = [w for pair in zip(base.split(), rng.choice(old).split(), strict=False) for w in pair]
                text, kind = " ".join(words), "new"
            kinds[kind] += 1
            doc = {
                "id": f"new-{i:07d}",
                "text": text,
                "source": "bench",
                "added": "2024-02-01",
                "metadata": {},
            }
            out.write(json.dumps(doc) + "\n")
    return kinds


def run_cli(command: str, input_dir: Path, workdir: Path, events: Path) -> tuple[float, dict]:
    summary = workdir / f"summary-{command}.json"
    cmd = [
        sys.executable, "-m", "backforth_spark.app.cli", command,
        "--config", str(REPO / "conf" / "local.yaml"),
        "--stages", ",".join(STAGES), "--input", str(input_dir),
        *[x for setting in cli_settings(workdir) for x in ("--set", setting)],
        "--set", "spark.conf.spark.eventLog.enabled=true", "--set", f"spark.conf.spark.eventLog.dir={events}",
        "--set", "spark.conf.spark.eventLog.compress=false",
        "--summary-json", str(summary),
    ]  # fmt: skip
    events.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started, json.loads(summary.read_text())


def cli_settings(workdir: Path) -> list[str]:
    """The config overrides of both measurements: MLflow off, every passage kept."""
    return [f"workdir={workdir}", "tracking.enabled=false", "chunk.max_passages_per_doc=null"]


def in_one_session(input_dir: Path, workdir: Path, n_new: int) -> dict:
    """Full run, then (after the new file lands) the refresh, in this process's one Spark session."""
    from backforth_spark.app.pipeline import run_pipeline
    from backforth_spark.core.config import load_config
    from backforth_spark.spark.stages import select

    cfg = load_config(REPO / "conf" / "local.yaml", cli_settings(workdir))
    # the process `refresh --every` runs: it stays up, with the long-lived Spark settings
    cfg = cfg.model_copy(update={"spark": cfg.spark.long_lived()})
    stages = select(",".join(STAGES), cfg)
    out = {}
    for name in ("full", "refresh"):
        if name == "refresh":
            add_new_documents(input_dir, n_new)
        started = time.perf_counter()
        summary = run_pipeline(cfg, [str(input_dir)], stages, echo=lambda _: None)
        assert summary["error"] is None, summary["error"]
        out[name] = {"seconds": time.perf_counter() - started, "stages": summary["stages"]}
    return out


def rows_read(event_dir: Path) -> dict[str, int]:
    """Input records of the Spark scans of each job group (= pipeline stage) in the run's event log."""
    # Spark 4 writes a folder per application (rolling event files); older versions one file
    logs = sorted(f for f in event_dir.rglob("*") if f.is_file() and f.name.startswith(("events_", "local-")))
    group_of_stage: dict[int, str] = {}
    read: dict[str, int] = defaultdict(int)
    for line in (line for log in logs for line in log.open() if line.startswith("{")):
        event = json.loads(line)
        kind = event["Event"]
        if kind == "SparkListenerJobStart":
            group = (event.get("Properties") or {}).get("spark.jobGroup.id")
            for stage_id in event["Stage IDs"]:
                group_of_stage[stage_id] = group
        elif kind == "SparkListenerStageCompleted":
            info = event["Stage Info"]
            group = group_of_stage.get(info["Stage ID"])
            for acc in info.get("Accumulables", []):
                if acc.get("Name") == "internal.metrics.input.recordsRead":
                    read[group or "(none)"] += int(acc["Value"])
    return dict(read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--new-share", type=float, default=0.01)
    parser.add_argument("--workdir", default="/tmp/backforth-bench-refresh")
    parser.add_argument("--only-session", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_new = max(1, round(args.docs * args.new_share))
    if args.only_session:  # the long-lived process: the corpus is the parent's
        root = Path(args.workdir)
        print(json.dumps(in_one_session(root / "input", root / "work-session", n_new)))
        return

    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    input_dir, workdir = root / "input", root / "work"
    build_corpus(args.docs, input_dir)
    full_s, full = run_cli("run", input_dir, workdir, root / "events-full")
    kinds = add_new_documents(input_dir, n_new)
    refresh_s, refresh = run_cli("refresh", input_dir, workdir, root / "events-refresh")
    read_full, read_refresh = rows_read(root / "events-full"), rows_read(root / "events-refresh")
    # the same command once more, with nothing new: what a fresh process pays before any new data
    # (JVM and Spark start, each table's Delta log, the stages' checks for pending rows)
    idle_s, idle = run_cli("refresh", input_dir, workdir, root / "events-idle")
    assert all(idle["stages"][st]["rows_out"] == 0 for st in STAGES), idle["stages"]
    (input_dir / "part-new.jsonl.gz").unlink()  # the long-lived process adds the same file again
    cmd = [sys.executable, __file__, "--only-session", "--docs", str(args.docs), "--workdir", str(root)]
    cmd += ["--new-share", str(args.new_share)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    session = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"corpus: {args.docs} documents; then {n_new} new ({kinds})")
    print(f"{'stage':<8} {'full s':>8} {'refresh s':>10} {'rows read full':>15} {'rows read refresh':>18}")
    for stage in STAGES:
        print(
            f"{stage:<8} {full['stages'][stage]['wall_s']:8.1f} {refresh['stages'][stage]['wall_s']:10.1f} "
            f"{read_full.get(stage, 0):15d} {read_refresh.get(stage, 0):18d}"
        )
    print(
        f"{'(other)':<8} {'':8} {'':10} {read_full.get('(none)', 0):15d} {read_refresh.get('(none)', 0):18d}"
    )
    d = refresh["stages"]["dedup"]
    print(
        f"refresh: ingest documents={refresh['stages']['ingest']['documents']} "
        f"exact={d['exact_duplicates']} near={d['near_duplicates']} kept={d['rows_out']} "
        f"passages={refresh['stages']['chunk']['rows_out']}"
    )
    ratio = refresh_s / full_s
    print(f"full run {full_s:.1f} s, refresh {refresh_s:.1f} s: ratio {ratio:.3f} (a CLI process each)")
    print(
        f"a refresh with nothing new: {idle_s:.1f} s ({idle_s / full_s:.3f} of the full run): the floor "
        "of a refresh in a fresh process"
    )
    s_full, s_refresh = session["full"]["seconds"], session["refresh"]["seconds"]
    s_ratio = s_refresh / s_full
    walls = " ".join(f"{st}={session['refresh']['stages'][st]['wall_s']:.1f}" for st in STAGES)
    print(
        f"one long-lived process: full run {s_full:.1f} s, refresh {s_refresh:.1f} s ({walls}): "
        f"ratio {s_ratio:.3f}"
    )

    def per_stage(read: dict[str, int]) -> str:
        return "/".join(str(read.get(stage, 0)) for stage in STAGES)

    print(
        f"RESULT n_docs={args.docs} new_docs={n_new} full_s={full_s:.1f} refresh_s={refresh_s:.1f} "
        f"ratio={ratio:.3f} idle_refresh_s={idle_s:.1f} rows_read_full={per_stage(read_full)} "
        f"rows_read_refresh={per_stage(read_refresh)} "
        f"session_full_s={s_full:.1f} session_refresh_s={s_refresh:.1f} session_ratio={s_ratio:.3f}"
    )


if __name__ == "__main__":
    main()
