"""Spark Connect, the client side of Databricks' standard access mode and serverless. The pipeline's
run through a Connect server is the refresh follow-up of the real run (tests/spark/test_refresh.py);
here, what a server that cannot serve it gets."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import DOLMA_SAMPLE, LOCAL_CONF, REPO
from tests.connect_server import ConnectServer


def test_a_connect_server_without_delta_is_one_line_and_exit_2_before_any_work(tmp_path):
    no_delta = ("spark.configure_delta=false",)
    server = ConnectServer(REPO, LOCAL_CONF, tmp_path / "server.log", overrides=no_delta)
    try:
        server.wait_ready()
        proc = subprocess.run(
            [sys.executable, "-m", "backforth_spark.app.cli", "run", "--config", str(LOCAL_CONF),
             "--input", str(DOLMA_SAMPLE), "--workdir", str(tmp_path / "work"),
             "--set", "tracking.enabled=false"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "SPARK_REMOTE": server.url},
        )  # fmt: skip
    finally:
        server.stop()
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: this Spark session has no Delta Lake"), lines
    assert not (tmp_path / "work" / "tables").exists()  # nothing was written
