"""The pipeline on a standalone cluster whose executors run the packed environment (`make pack-env`),
shipped with `--archives` as on any cluster: `make cluster-packed`.

    .venv/bin/python scripts/run_packed.py [--stages ingest,dedup,chunk,backtranslate,score,rewrite,export]

The worker's own default Python is a path that does not exist, so a Python worker that did not come
from the archive could not start: the run finishing is the proof that the executors imported nothing
from this machine's venv. Prints the wall time and the summary's counts; last line:
RESULT packed_env=yes wall_s=... pairs=... exit=...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from build_pyfiles import build  # noqa: E402

from backforth_spark.app.standalone import standalone_cluster  # noqa: E402

ARCHIVE = REPO / "dist" / "backforth-env.zip"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default=None, help="default: every stage")
    args = p.parse_args()
    if not ARCHIVE.exists():
        print(f"no {ARCHIVE.relative_to(REPO)}: run `make pack-env` first", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="backforth-packed-"))
    pyfiles = build(root / "backforth_spark.zip")
    summary = root / "summary.json"
    os.environ["PYSPARK_PYTHON"] = "/nonexistent/python"  # the worker's default: never used
    with standalone_cluster(root / "cluster", cores=2, memory="8g") as cluster:
        cmd = [
            str(REPO / ".venv" / "bin" / "spark-submit"), "--master", cluster.master_url,
            "--py-files", str(pyfiles), "--archives", f"{ARCHIVE}#env",
            "--conf", "spark.pyspark.python=./env/bin/python",
            "--conf", f"spark.pyspark.driver.python={REPO / '.venv' / 'bin' / 'python'}",
            "--packages", "io.delta:delta-spark_4.2_2.13:4.4.0",
            "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
            "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
            "--driver-memory", "1g", "--executor-memory", "6g",
            str(REPO / "jobs" / "pipeline.py"), "--config", str(REPO / "conf" / "local.yaml"),
            "--input", str(REPO.parent / "shared" / "data" / "dolma-sample"),
            "--workdir", str(root / "work"), "--summary-json", str(summary),
            "--set", "llm.gpus_per_task=0", "--set", "llm.cpus_per_task=2",
            "--set", "chunk.max_passages_per_doc=1", "--set", "tracking.enabled=false",
            *(["--stages", args.stages] if args.stages else []),
        ]  # fmt: skip
        # spark-submit's wrapper asks $PYSPARK_PYTHON where pyspark lives unless SPARK_HOME says it
        import pyspark

        env = {**os.environ, "SPARK_HOME": str(Path(pyspark.__file__).parent)}
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
    log = root / "spark-submit.log"
    log.write_text(proc.stderr)
    if proc.returncode != 0:
        causes = [line for line in proc.stderr.splitlines() if "Exception" in line or "Error" in line]
        print("\n".join(causes[:10]), f"\n(the whole output: {log})", file=sys.stderr)
    counts = json.loads(summary.read_text()) if summary.exists() else {}
    for name, stage in counts.get("stages", {}).items():
        print(f"{name:<14} rows_in={stage.get('rows_in')} rows_out={stage.get('rows_out')}")
    pairs = (counts.get("export") or {}).get("pairs")
    print(f"RESULT packed_env=yes wall_s={wall:.1f} pairs={pairs} exit={proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
