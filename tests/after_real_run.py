"""Runs on copies of the shared real run that start the moment it finishes (tests/conftest.py), each in
its own thread: a backtranslate stage killed between its commits and then rerun (tests/test_kill_rerun.py)
and a refresh after a new file lands (tests/test_refresh.py). Each is a CLI process with the real engine
for a minute or two; started early, they run beside the tests that read the real run instead of after
them. The tests assert on what these return."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from backforth_spark.generation import BACKTRANSLATE

# another backtranslation fingerprint than the shared run's: every passage is owed again
NEW_FINGERPRINT = "llm.backtranslate.sampling.max_tokens=64"

NEW_DOC = {
    "id": "new-1",
    "source": "web",
    "added": "2024-06-01",
    "text": (
        "Sourdough starter needs regular feeding to stay active. Keep it in a glass jar at room "
        "temperature and feed it once a day with equal weights of flour and water. Discard about half "
        "of the starter before each feeding so the jar does not overflow and the acidity stays in "
        "balance. A healthy starter doubles in size within six to eight hours of a feeding and smells "
        "pleasantly sour. If you bake only once a week, store the starter in the refrigerator and feed "
        "it the day before you plan to mix your dough."
    ),
}


def _backforth(conf: Path, command: str, workdir: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "backforth_spark.cli", command, "--config", str(conf),
        "--workdir", str(workdir), "--set", "tracking.enabled=false", *args,
    ]  # fmt: skip


def _versions(table: Path) -> list[int]:
    """The table's committed Delta versions (a commit file is renamed into place whole)."""
    return sorted(int(f.stem) for f in (table / "_delta_log").glob("*.json") if f.stem.isdigit())


def kill_then_rerun_backtranslate(
    workdir: Path, repo: Path, conf: Path, settings: tuple[str, ...], procs: list
) -> dict:
    """On `workdir` (a copy of the real run): backtranslate with a new fingerprint, committing every 3
    prompts on one partition, SIGKILLed (driver, JVM, Python workers) once its first slice is committed;
    then the same stage rerun to the end, both with `settings` too. Returns the table's version at the
    kill, whether a slice was committed before it, and the rerun's return code, stderr and summary."""
    table = workdir / "tables" / BACKTRANSLATE.table
    first_new = _versions(table)[-1] + 1  # the first MERGE of the new run commits this version
    chosen = [x for s in settings for x in ("--set", s)]
    stage = ("--set", NEW_FINGERPRINT, "--stages", "backtranslate", *chosen)
    slices = ("--set", "llm.commit_rows=3", "--set", "llm.num_partitions=1")
    first = subprocess.Popen(
        _backforth(conf, "run", workdir, *stage, *slices), cwd=repo,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    procs.append(first)
    deadline = time.monotonic() + 900
    while _versions(table)[-1] < first_new and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):  # (gone already if it finished first)
        os.killpg(first.pid, signal.SIGKILL)  # no clean-up at all
    first.wait()
    killed_at = _versions(table)[-1]
    summary = workdir.parent / "summary.json"
    rerun = subprocess.run(
        _backforth(conf, "run", workdir, *stage, "--summary-json", str(summary)),
        cwd=repo, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return {
        "workdir": workdir,
        "sliced_before_kill": killed_at >= first_new,
        "killed_at_version": killed_at,
        "rerun_returncode": rerun.returncode,
        "rerun_stderr": rerun.stderr,
        "summary": json.loads(summary.read_text()) if summary.exists() else None,
    }


def refresh_after_a_new_file(
    workdir: Path,
    corpus: Path,
    repo: Path,
    conf: Path,
    settings: tuple[str, ...],
    procs: list,
    remote: str | None = None,
) -> dict:
    """`backforth refresh` on `workdir` (a copy of the real run) after NEW_DOC lands in a new file beside
    `corpus` (a copy of the real run's input), with `settings`, then `backforth status --json`; through
    the Spark Connect server at `remote` when given (SPARK_REMOTE, as Databricks' standard access mode
    and serverless run it). Returns their return codes, the refresh's stderr and summary, the status."""
    (corpus / "new.jsonl").write_text(json.dumps(NEW_DOC) + "\n")
    summary = workdir.parent / "refresh.json"
    env = {**os.environ, "SPARK_REMOTE": remote} if remote else None
    args = [x for setting in settings for x in ("--set", setting)]
    cmd = _backforth(conf, "refresh", workdir, "--input", str(corpus), "--summary-json", str(summary), *args)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    procs.append(proc)
    _, stderr = proc.communicate(timeout=1500)
    wall_s = time.perf_counter() - started
    status = subprocess.run(
        _backforth(conf, "status", workdir, "--json", *args),
        cwd=repo, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    return {
        "workdir": workdir,
        "returncode": proc.returncode,
        "stderr": stderr,
        "wall_s": wall_s,
        "summary": json.loads(summary.read_text()) if summary.exists() else None,
        "status_returncode": status.returncode,
        "status": json.loads(status.stdout) if status.returncode == 0 else status.stderr,
    }
