"""Runs on copies of the shared real run that start the moment it finishes (tests/conftest.py), each in
its own thread: a refresh after a new file lands, through Spark Connect (tests/spark/test_refresh.py). A
CLI process whose LLM stages go to the suite's `vllm serve`, for a minute or two; started early, it runs
beside the tests that read the real run instead of after them. The tests assert on what it returns. (A
generation stage killed between its commits and rerun: the cluster run, tests/app/test_cluster.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
        sys.executable, "-m", "backforth_spark.app.cli", command, "--config", str(conf),
        "--workdir", str(workdir), "--set", "tracking.enabled=false", *args,
    ]  # fmt: skip


def refresh_after_a_new_file(
    workdir: Path,
    corpus: Path,
    repo: Path,
    conf: Path,
    settings: tuple[str, ...],
    procs: list,
    remote: str | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """`backforth refresh` on `workdir` (a copy of the real run) after NEW_DOC lands in a new file beside
    `corpus` (a copy of the real run's input), with `settings`, then `backforth status --json` with
    neither the config nor the settings; through the Spark Connect server at `remote` when given
    (SPARK_REMOTE, as Databricks' standard access mode and serverless run it), with `env` added to the
    environment. Returns their return codes, the refresh's stderr and summary, the status."""
    (corpus / "new.jsonl").write_text(json.dumps(NEW_DOC) + "\n")
    summary = workdir.parent / "refresh.json"
    env = {**os.environ, **(env or {}), **({"SPARK_REMOTE": remote} if remote else {})}
    args = [x for setting in settings for x in ("--set", setting)]
    cmd = _backforth(conf, "refresh", workdir, "--input", str(corpus), "--summary-json", str(summary), *args)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    procs.append(proc)
    _, stderr = proc.communicate(timeout=1500)
    wall_s = time.perf_counter() - started
    # no config and none of the refresh's settings: judged by what the refresh recorded in the workdir
    status = subprocess.run(
        [sys.executable, "-m", "backforth_spark.app.cli", "status", "--workdir", str(workdir), "--json"],
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
