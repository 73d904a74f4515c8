"""A throwaway Spark standalone cluster on this machine: one master and one worker.

Local mode runs the driver and the executor in one JVM. Tests and benchmarks that must see them apart
(the driver's own memory, `spark-submit --master spark://...`, executors with their own resources)
start this instead. It uses the `spark-class` launcher that ships with pyspark; nothing else to install.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cluster:
    master_url: str  # spark://127.0.0.1:<port>
    master_ui: str  # http://127.0.0.1:<port>, its /json/ lists workers and applications
    worker_pid: int  # the worker JVM; executors are its children
    gpu_discovery_script: str | None = None  # executors need it too: spark.executor.resource.gpu.*

    def state(self) -> dict:
        with urllib.request.urlopen(f"{self.master_ui}/json/", timeout=5) as resp:
            return json.load(resp)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def standalone_cluster(
    workdir: Path,
    cores: int = 2,
    memory: str = "6g",
    gpus: int = 0,
    start_timeout_s: float = 90.0,
    env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """Start a master and one worker with `cores` and `memory`; stop both on exit. With `gpus`, the
    worker offers that many `gpu` addresses ("0", "1", ...) through a discovery script: Spark's
    scheduling of GPUs can then be exercised on a machine without any. `env` joins the environment of
    both, so of every executor (as a node's own settings do: an object store's endpoint and keys)."""
    from pyspark.find_spark_home import _find_spark_home

    spark_class = str(Path(_find_spark_home()) / "bin" / "spark-class")
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **(env or {}),
        "SPARK_LOG_DIR": str(workdir / "logs"),
        # executors start Python workers with this interpreter unless the application says otherwise
        "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
    }
    if gpus:
        script = workdir / "discover_gpus.sh"
        addresses = json.dumps({"name": "gpu", "addresses": [str(i) for i in range(gpus)]})
        script.write_text(f"#!/bin/sh\necho '{addresses}'\n")
        script.chmod(0o755)
        env["SPARK_WORKER_OPTS"] = (
            f"-Dspark.worker.resource.gpu.amount={gpus} -Dspark.worker.resource.gpu.discoveryScript={script}"
        )
    port, ui_port = _free_port(), _free_port()
    master_url, master_ui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}"
    with ExitStack() as stack:
        master_log = stack.enter_context(open(workdir / "master.log", "wb"))  # noqa: SIM115
        worker_log = stack.enter_context(open(workdir / "worker.log", "wb"))  # noqa: SIM115
        master = subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(ui_port)],
            stdout=master_log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        stack.callback(_stop, master)
        worker = subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
             "--cores", str(cores), "--memory", memory, "--work-dir", str(workdir / "work"),
             "--webui-port", str(_free_port()), master_url],
            stdout=worker_log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        stack.callback(_stop, worker)
        script = str(workdir / "discover_gpus.sh") if gpus else None
        cluster = Cluster(master_url, master_ui, worker.pid, script)
        _wait_for_worker(cluster, [master, worker], workdir, start_timeout_s)
        yield cluster


def _wait_for_worker(
    cluster: Cluster, procs: list[subprocess.Popen], workdir: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            if any(w.get("state") == "ALIVE" for w in cluster.state().get("workers", [])):
                return
        except OSError:
            pass  # the master's web UI is not up yet
        time.sleep(0.5)
    logs = "\n".join((workdir / f).read_text(errors="replace")[-2000:] for f in ("master.log", "worker.log"))
    raise RuntimeError(f"the standalone cluster did not come up within {timeout_s:.0f} s:\n{logs}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
