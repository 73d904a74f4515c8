"""Engine hosts (udfs/engine_host.py): real processes, sockets and locks, a recording double as the
engine (tests/udfs/recording_host.py). Tasks on a cluster with four GPUs: tests/udfs/test_four_gpus.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backforth_spark.core.config import load_config
from backforth_spark.core.engines.engine import FatalEngineError, GenerationParams
from backforth_spark.core.model import Hub
from tests.conftest import LOCAL_CONF
from tests.udfs.recording_host import records
from udfs.engine_host import hosted_engine
from udfs.generation import engine_on_gpus

FACTORY = "tests.udfs.recording_host:build"
REPO = Path(__file__).resolve().parents[2]
PARAMS = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=16)


@pytest.fixture
def hosts(tmp_path):
    """The hosts' folder; every host started there is stopped after the test."""
    folder = tmp_path / "hosts"
    yield folder
    for record in records(folder):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record["pid"], signal.SIGKILL)


def _llm(folder: Path, *overrides: str):
    return load_config(LOCAL_CONF, [f"llm.engine_host_dir={folder}", *overrides]).llm


def _connect(llm, gpus, model="m", loads=None, fresh=False, owner=None):
    on_load = (lambda: loads.append(model)) if loads is not None else None
    if owner is None:
        return engine_on_gpus(llm, model, gpus, Hub(), on_load or (lambda: None), fresh, FACTORY)
    request = {"cfg": llm, "model": model, "hub": Hub(), "factory": FACTORY}
    folder, idle_s = llm.engine_host_dir, llm.engine_idle_s
    return hosted_engine(gpus, model, request, folder, 30, idle_s, on_load, owner=owner)


def _ask(engine, text="a passage"):
    return engine.chat([[{"role": "user", "content": text}]], PARAMS)[0].text


def _gone(pid: int, within_s: float = 15) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our own child (a host this process started): reap it, or it stays a zombie
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


def test_tasks_on_one_gpu_set_share_one_host_that_outlives_their_connections(hosts):
    llm, loads = _llm(hosts), []
    first = _connect(llm, ["3"], loads=loads)
    answer = _ask(first)
    first.close()  # a task ends: its connection goes, the host stays
    second = _connect(llm, ["3"], loads=loads)
    assert _ask(second) == answer
    built = records(hosts)
    assert loads == ["m"] and len(built) == 1
    assert built[0]["devices"] == "3" and answer == f"What runs on GPU 3 in process {built[0]['pid']}?"
    assert second.model == "m" and second.max_model_len == llm.max_model_len


def test_each_gpu_set_gets_its_own_host_with_only_its_gpus_visible(hosts):
    llm = _llm(hosts)
    engines = [_connect(llm, gpus) for gpus in (["0"], ["1"], ["2", "3"])]
    for engine in engines:
        _ask(engine)
    devices = sorted(r["devices"] for r in records(hosts))
    assert devices == ["0", "1", "2,3"]
    assert len({r["pid"] for r in records(hosts)}) == 3


def test_other_engine_settings_stop_the_old_host_before_the_new_one_loads(hosts):
    llm = _llm(hosts)
    # a tensor-parallel host on two GPUs, whose engine takes a while to shut down
    _ask(_connect(llm, ["0", "1"], model="judge closes-slowly"))
    old = records(hosts)[0]["pid"]
    _ask(_connect(llm, ["1"], model="rewriter"))  # another model on one of them
    new = records(hosts)[-1]
    assert new["model"] == "rewriter" and new["devices"] == "1"
    assert old not in new["alive_at_load"]  # its process (and all it held) was gone before the load
    assert _gone(old, within_s=1)


def test_a_worker_killed_while_its_host_loads_leaves_the_model_to_the_next_task(hosts):
    """Spark kills or reaps a Python worker (a failed task, the idle timeout): the host it started keeps
    loading and serves the retried task, which loads nothing."""
    llm = _llm(hosts)
    worker = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys; from tests.udfs.test_engine_host import _connect, _llm;"
            "_connect(_llm(sys.argv[1]), ['5'], model='slow-3', owner=int(sys.argv[2]))"
        ), str(hosts), str(os.getpid())],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (hosts / "host-5.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.kill()
    worker.wait()
    loads = []
    engine = _connect(llm, ["5"], model="slow-3", loads=loads, owner=os.getpid())
    assert loads == [] and len(records(hosts)) == 1
    assert _ask(engine).startswith("What runs on GPU 5 in process ")


def test_a_host_stops_with_its_executor(hosts):
    llm = _llm(hosts)
    executor = subprocess.Popen(["sleep", "60"])
    _ask(_connect(llm, ["6"], owner=executor.pid))
    host = records(hosts)[0]["pid"]
    executor.kill()
    executor.wait()
    assert _gone(host)


def test_an_idle_host_stops_and_the_next_task_starts_another(hosts):
    llm, loads = _llm(hosts, "llm.engine_idle_s=1"), []
    _connect(llm, ["7"], loads=loads).close()
    assert _gone(records(hosts)[0]["pid"])
    _ask(_connect(llm, ["7"], loads=loads))
    assert loads == ["m", "m"]


def test_a_host_that_cannot_load_is_an_error_carrying_its_log(hosts):
    failed = r"(?s)engine host on GPU\(s\) 4 exited.*no weights at /models/broken"
    with pytest.raises(RuntimeError, match=failed):
        _connect(_llm(hosts), ["4"], model="broken")


def test_engine_errors_reach_the_task_and_the_host_keeps_serving(hosts):
    engine = _connect(_llm(hosts), ["2"])
    with pytest.raises(RuntimeError, match="engine fell over"):
        _ask(engine, "BOOM")
    with pytest.raises(FatalEngineError, match="refused the key"):
        _ask(engine, "FATAL")
    assert _ask(engine).startswith("What runs on GPU 2")


def test_a_fresh_engine_restarts_the_host(hosts):
    llm, loads = _llm(hosts), []
    _ask(_connect(llm, ["1"], loads=loads))
    old = records(hosts)[0]["pid"]
    _ask(_connect(llm, ["1"], loads=loads, fresh=True))  # its engine failed every prompt
    assert loads == ["m", "m"] and _gone(old, within_s=1)


def test_the_hub_token_reaches_the_host_in_no_argument_environment_or_file(hosts):
    llm = _llm(hosts)
    token = "hf_secret_token_4711"
    request = {"cfg": llm, "model": "m", "hub": Hub(token=token), "factory": FACTORY}
    _ask(hosted_engine(["0"], "m", request, hosts, 30, 60))
    pid = records(hosts)[0]["pid"]
    seen = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
    seen += b"".join(p.read_bytes() for p in hosts.iterdir() if p.is_file())
    assert token.encode() not in seen
