"""Start a Spark standalone cluster on 127.0.0.1 (a master and one worker, from pyspark's spark-class)
and keep it up until Ctrl-C or SIGTERM.

    .venv/bin/python scripts/standalone_cluster.py --workdir /tmp/spark-cluster [--cores 2] [--memory 8g]

Prints the master URL to pass to `spark-submit --master`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backforth_spark.app.standalone import standalone_cluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="logs and the worker's scratch space")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--memory", default="8g")
    parser.add_argument("--gpus", type=int, default=0, help="fake GPU addresses the worker offers")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop master and worker on the way out
    with standalone_cluster(Path(args.workdir), args.cores, args.memory, args.gpus) as cluster:
        print(f"master {cluster.master_url}  web UI {cluster.master_ui}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
