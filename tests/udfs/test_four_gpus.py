"""An executor with four GPUs runs four LLM tasks at once: one engine host per GPU address, each task on
the host of the GPU Spark assigned it, every host loaded once and kept for the next slice (a real
standalone cluster, tests/udfs/four_gpus_job.py; the engine is a double that records its devices)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backforth_spark.app.standalone import standalone_cluster
from tests.udfs.recording_host import records
from tests.udfs.test_engine_host import _gone

pytestmark = pytest.mark.e2e  # a cluster of its own

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def four_gpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("four-gpus")
    hosts = root / "hosts"
    with standalone_cluster(root / "cluster", cores=4, memory="2g", gpus=4) as cluster:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.udfs.four_gpus_job", cluster.master_url,
             cluster.gpu_discovery_script, str(hosts)],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYSPARK_PYTHON": sys.executable},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        # the application has ended: its executor and with it every host it started
        gone = {r["pid"]: _gone(r["pid"]) for r in records(hosts)}
    slices = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"slices": slices, "built": records(hosts), "gone": gone}


def _host_of(row: dict) -> tuple[str, int]:
    """(GPU, process) of the host that answered a row, as the double wrote them in its reply."""
    found = re.fullmatch(r"What runs on GPU (\S+) in process (\d+)\?", row["instruction"])
    assert found, row
    return found[1], int(found[2])


def test_four_concurrent_tasks_get_four_hosts_one_per_assigned_gpu(four_gpus):
    built = four_gpus["built"]
    assert sorted(r["devices"] for r in built) == ["0", "1", "2", "3"]
    first = four_gpus["slices"][0]
    assert len(first) == 16 and sum(r["_engine_loads"] or 0 for r in first) == 4
    for row in first:  # the row's GPU (its task's assignment) is the one its host was given
        assert _host_of(row)[0] == row["device"], row


def test_the_next_slice_reuses_the_four_hosts_whichever_worker_runs_each_task(four_gpus):
    pids = {r["devices"]: r["pid"] for r in four_gpus["built"]}
    second = four_gpus["slices"][1]
    assert len(second) == 16 and sum(r["_engine_loads"] or 0 for r in second) == 0
    for row in second:
        assert _host_of(row) == (row["device"], pids[row["device"]]), row


def test_the_hosts_end_with_their_executor(four_gpus):
    assert four_gpus["gone"] and all(four_gpus["gone"].values()), four_gpus["gone"]
