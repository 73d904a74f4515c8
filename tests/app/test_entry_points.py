"""Every entry point a scheduler starts ends a failed run with a non-zero exit status: the console
script, the spark-submit wrappers in jobs/, and the wheel task, which calls the console script's
function itself (as Databricks' python_wheel_task does) and would count a returned 1 as success."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

MISSING = "no-such-config.yaml"  # a failure every entry point reports before Spark starts


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_console_script_exits_non_zero():
    proc = _run([str(REPO / ".venv" / "bin" / "backforth"), "run", "--config", MISSING])
    assert proc.returncode == 2 and MISSING in proc.stderr


@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.py")))
def test_each_spark_submit_wrapper_exits_non_zero(job):
    proc = _run([sys.executable, str(REPO / "jobs" / job), "--config", MISSING])
    assert proc.returncode == 2 and MISSING in proc.stderr


def test_the_wheel_task_calling_the_entry_point_function_exits_non_zero():
    # what a wheel task runs: the entry point named in the wheel's metadata, called in-process
    call = (
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "[ep] = [e for e in entry_points(group='console_scripts') if e.name == 'backforth']\n"
        f"sys.argv = ['backforth', 'run', '--config', {MISSING!r}]\n"
        "ep.load()()\n"
        "print('returned normally')\n"
    )
    proc = _run([sys.executable, "-c", call])
    assert proc.returncode == 2 and "returned normally" not in proc.stdout
