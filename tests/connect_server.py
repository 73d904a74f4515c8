"""A local Spark Connect server for the suite, as Databricks' standard access mode and serverless
present one: the client has no SparkContext, no JVM gateway and no accumulators.

The server is a classic local session of a config (Delta configured as in every local run) with
Spark's Connect plugin (pyspark ships its jar), in a process of its own; clients reach it at
sc://127.0.0.1:<port>. Delta's own Connect plugin is not on the server: the pipeline reaches Delta
through SQL alone, which is what a server without it offers.

    python tests/connect_server.py --config conf/local.yaml --port 15002 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

PLUGIN = "org.apache.spark.sql.connect.SparkConnectPlugin"


def serve(config: str, port: int, overrides: list[str]) -> None:
    from backforth_spark.core.config import load_config
    from backforth_spark.spark.session import get_spark

    server_conf = [f"spark.conf.spark.plugins={PLUGIN}", f"spark.conf.spark.connect.grpc.binding.port={port}"]
    cfg = load_config(config, [*overrides, *server_conf])
    get_spark(cfg.spark)
    print(f"serving sc://127.0.0.1:{port}", flush=True)
    while True:
        time.sleep(3600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ConnectServer:
    """The server in a subprocess (its own process group, its output in `log`); `url` for SPARK_REMOTE."""

    def __init__(self, repo: Path, config: Path, log: Path, overrides: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"sc://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "SPARK_REMOTE"}
        args = [x for setting in overrides for x in ("--set", setting)]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--config", str(config), "--port", str(self.port), *args],
                cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the Connect server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}"
                )
            if "serving sc://" in self.log.read_text():
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"no Connect server on port {self.port} after {timeout_s} s")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    serve(args.config, args.port, args.overrides)
