"""The host-wide GPU claim between Python workers (udfs/device_claim.py), with real processes and locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from udfs.device_claim import DeviceClaim

REPO = Path(__file__).resolve().parents[2]

# A worker holding an engine on GPU 7: inside a task for `busy` seconds, then idle; closing its engine
# (let_go) is recorded with the time it happened.
HOLDER = """
import pathlib, sys, threading, time
from udfs.device_claim import DeviceClaim

folder, out, busy = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), float(sys.argv[3])
claim = DeviceClaim(["7"], folder)
claim.acquire(10)
in_task = threading.Lock()


def let_go():
    (out / "let_go").write_text(repr(time.time()))
    claim.release()


in_task.acquire()
claim.start_watching(in_task, let_go)
(out / "holding").write_text("")
time.sleep(busy)
(out / "task_done").write_text(repr(time.time()))
in_task.release()
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a holder inside a task of `busy` seconds; returns (process, its output folder)."""
    procs = []

    def start(busy: float) -> tuple[subprocess.Popen, Path]:
        out = tmp_path / f"holder{len(procs)}"
        out.mkdir()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(out), str(busy)], env=env)
        procs.append(proc)
        deadline = time.monotonic() + 30
        while not (out / "holding").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the holder never claimed GPU 7"
            time.sleep(0.05)
        return proc, out

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_claimant_gets_the_gpu_once_the_idle_holder_has_closed_its_engine(holder, tmp_path):
    _, out = holder(busy=0)
    claim = DeviceClaim(["7"], tmp_path)
    claim.acquire(timeout_s=30)
    assert (out / "let_go").exists()
    claim.release()


def test_a_holder_inside_a_task_closes_its_engine_only_after_the_task(holder, tmp_path):
    _, out = holder(busy=1.5)
    claim = DeviceClaim(["7"], tmp_path)
    claim.acquire(timeout_s=30)
    assert float((out / "let_go").read_text()) >= float((out / "task_done").read_text())
    claim.release()


def test_a_claimant_that_waits_too_long_fails_and_holds_none_of_its_gpus(holder, tmp_path):
    holder(busy=60)
    claim = DeviceClaim(["6", "7"], tmp_path)
    with pytest.raises(TimeoutError, match=r"GPU 7 .*llm\.device_wait_s"):
        claim.acquire(timeout_s=0.5)
    # GPU 6 was claimed first (sorted order); a claim of it now succeeds at once, so it was let go
    other = DeviceClaim(["6"], tmp_path)
    other.acquire(timeout_s=0.1)
    other.release()


def test_a_killed_holder_frees_its_gpu(holder, tmp_path):
    proc, out = holder(busy=60)  # inside a task: it would never let go by itself
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    claim = DeviceClaim(["7"], tmp_path)
    claim.acquire(timeout_s=5)
    assert not (out / "let_go").exists()
    claim.release()


def test_a_request_left_by_a_claimant_that_died_is_no_request(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "gpu-7.wanted").write_text(str(gone.pid))
    assert not DeviceClaim(["7"], tmp_path).wanted()
    assert not (tmp_path / "gpu-7.wanted").exists()
