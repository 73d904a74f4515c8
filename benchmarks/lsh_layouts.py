"""The dedup stage's time and recall with the default LSH band layout against FineWeb's 14 x 8.

    make bench-lsh-layouts N=30000   # or: .venv/bin/python benchmarks/lsh_layouts.py --docs 30000

Builds the dedup benchmark's corpus (benchmarks/dedup.py: N documents of several KB, 10% of them copies
with 2% of their words edited), ingests it once with `conf/local.yaml`, then runs `backforth run --stages
dedup` on a fresh copy of the ingested tables for each layout, alternating, `--reps` times (each run a
process of its own, as a scheduled job). More than `dedup.driver_max_new_docs` (20,000) documents take
the Spark path. Prints per layout the median wall time of the dedup stage, the near duplicates found,
the candidate pairs, and the probability that a pair at Jaccard 0.9 shares no band, (1 - 0.9^rows)^bands.
Last line:
RESULT n_docs=... layout=... wall_s=... peer_layout=14x8 peer_wall_s=... ratio=... near=.../...
miss_at_0.9=.../...
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backforth_spark.core.config import DedupConfig  # noqa: E402
from backforth_spark.core.minhash import candidate_probability  # noqa: E402
from benchmarks.dedup import build_corpus  # noqa: E402

CLI = [sys.executable, "-m", "backforth_spark.app.cli", "run", "--config", str(REPO / "conf" / "local.yaml")]
PEER = (14, 8)


def run_dedup(workdir: Path, bands: int, rows: int) -> dict:
    summary = workdir / "summary.json"
    layout = ["--set", f"dedup.bands={bands}", "--set", f"dedup.rows={rows}"]
    cmd = [*CLI, "--workdir", str(workdir), "--stages", "dedup", "--set", "tracking.enabled=false", *layout]
    subprocess.run([*cmd, "--summary-json", str(summary)], cwd=REPO, check=True, capture_output=True)
    return json.loads(summary.read_text())["stages"]["dedup"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=30000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    default = DedupConfig()
    layouts = {f"{b}x{r}": (b, r) for b, r in ((default.bands, default.rows), PEER)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        planted = build_corpus(args.docs, root / "corpus")
        ingest = [
            *CLI,
            "--input",
            str(root / "corpus"),
            "--workdir",
            str(root / "ingested"),
            "--stages",
            "ingest",
        ]
        subprocess.run(
            [*ingest, "--set", "tracking.enabled=false"], cwd=REPO, check=True, capture_output=True
        )
        results: dict[str, list[dict]] = {name: [] for name in layouts}
        for rep in range(args.reps):
            for name, (bands, rows) in layouts.items():
                work = root / f"{name}-{rep}"
                shutil.copytree(root / "ingested", work)
                counts = run_dedup(work, bands, rows)
                shutil.rmtree(work)
                results[name].append(counts)
                print(
                    f"{name:>5} run {rep + 1}: dedup stage {counts['wall_s']} s, "
                    f"{counts['near_duplicates']} near duplicates ({planted} planted copies), "
                    f"{counts['candidate_pairs']} candidate pairs",
                    flush=True,
                )
    wall = {name: statistics.median(c["wall_s"] for c in runs) for name, runs in results.items()}
    near = {name: runs[0]["near_duplicates"] for name, runs in results.items()}
    miss = {name: (1 - candidate_probability(0.9, b, r)) for name, (b, r) in layouts.items()}
    ours, peer = list(layouts)
    for name in layouts:
        print(
            f"{name:>5}: median dedup stage {wall[name]} s, miss probability at Jaccard 0.9 {miss[name]:.2e}"
        )
    print(
        f"RESULT n_docs={args.docs} layout={ours} wall_s={wall[ours]} "
        f"peer_layout={peer} peer_wall_s={wall[peer]} "
        f"ratio={wall[ours] / wall[peer]:.2f} near={near[ours]}/{near[peer]} "
        f"miss_at_0.9={miss[ours]:.1e}/{miss[peer]:.1e}"
    )


if __name__ == "__main__":
    main()
