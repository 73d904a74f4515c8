from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from backforth_spark.config import Config, load_config
from backforth_spark.context import StageContext
from backforth_spark.tables import Tables

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONF = REPO / "conf" / "local.yaml"
DOLMA_SAMPLE = REPO.parent / "shared" / "data" / "dolma-sample"


@pytest.fixture(scope="session")
def base_cfg(tmp_path_factory) -> Config:
    return load_config(LOCAL_CONF, [f"workdir={tmp_path_factory.mktemp('work')}"])


@pytest.fixture(scope="session")
def spark(base_cfg):
    from backforth_spark.session import get_spark

    session = get_spark(base_cfg.spark)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture
def make_ctx(spark, base_cfg, tmp_path):
    """A stage context with its own empty tables; `overrides` are dotted config overrides."""

    def make(*overrides: str, inputs: tuple[str, ...] = (), engine_factory=None) -> StageContext:
        cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path}", *overrides])
        run_id = f"test-{uuid.uuid4().hex[:6]}"
        tables = Tables(spark, tmp_path / "tables", run_id)
        return StageContext(spark, cfg, tables, run_id, inputs=inputs, engine_factory=engine_factory)

    return make


DOC_COLUMNS = (
    "doc_key string, source string, id string, text string, added string, created string, "
    "metadata string, url string, input_file string, line_number long"
)


def add_documents(ctx: StageContext, docs: list[tuple[str, str]], representatives: set[str] | None = None):
    """Write (doc_key, text) rows into `documents`; with `representatives`, also their dedup decisions."""
    from pyspark.sql import functions as F

    from backforth_spark import schemas as s

    lineage = [F.lit(ctx.run_id).alias("run_id"), F.current_timestamp().alias("written_at")]
    rows = [
        (k, "cc", k.split("/")[1], text, None, None, None, None, "f", i + 1)
        for i, (k, text) in enumerate(docs)
    ]
    df = ctx.spark.createDataFrame(rows, DOC_COLUMNS).select("*", *lineage)
    ctx.tables.merge_insert_new(s.DOCUMENTS, df, ["doc_key"])
    if representatives is not None:
        decisions = ctx.spark.createDataFrame(
            [
                (k, k, k, k in representatives, "representative" if k in representatives else "exact", None)
                for k, _ in docs
            ],
            "doc_key string, norm_hash string, cluster_id string, is_representative boolean, reason string, "
            "similarity double",
        )
        ctx.tables.merge_insert_new(s.DEDUP, decisions.select("*", *lineage), ["doc_key"])


# ---- one real pipeline run that many tests read ------------------------------------------------------

import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import zstandard  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, artifacts proxied), for the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += [
        "--backend-store-uri",
        f"sqlite:///{root / 'db.sqlite'}",
        "--artifacts-destination",
        str(root / "art"),
    ]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([*cmd, "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}"
                ) from exc
            time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def write_corpus(folder: Path) -> int:
    """The 10 real Dolma documents, plus an upper-cased copy of one under a new id (zstd), bad lines and
    a repeated id (gzip); returns the number of lines."""
    folder.mkdir(parents=True)
    sample = sorted(DOLMA_SAMPLE.glob("*.jsonl"))
    assert sample, f"no Dolma sample at {DOLMA_SAMPLE}"
    for f in sample:
        shutil.copy(f, folder / f.name)
    first = json.loads(sample[0].read_text().splitlines()[0])
    copy = dict(first, id="copy-of-first", text=first["text"].upper() + "  ")
    (folder / "extra.json.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps(copy) + "\n").encode())
    )
    bad = [
        b"{broken json",
        b'{"text": "no id"}',
        b'{"id": "n1", "text": 3}',
        b'{"id": "n2", "text": "\xff"}',
        b'{"id": "n3", "text": ""}',
        json.dumps(first).encode(),
    ]
    (folder / "bad.jsonl.gz").write_bytes(gzip.compress(b"\n".join(bad) + b"\n"))
    return 10 + 1 + len(bad)


def cli(*args: str, timeout: int = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    """`backforth ...` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "backforth_spark.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@dataclass(frozen=True)
class RealRun:
    workdir: Path
    corpus: Path
    n_lines: int
    summary: dict
    stdout: str
    stderr: str
    tracking_uri: str

    def table(self, spark, name: str):
        return spark.read.format("delta").load(str(self.workdir / "tables" / name))


# every stage, ground and distill included, on the real engine and model
REAL_RUN_SETTINGS = (
    "curate.grounding=true",
    "curate.min_grounding=1",
    "curate.distillation_baseline=true",
)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, mlflow_server) -> RealRun:
    """`backforth run` of every stage on the sample (plus bad lines and a copy), real vLLM CPU engine and
    default model, tracked to a real MLflow server. Tests read it; tests that write copy it first."""
    root = tmp_path_factory.mktemp("real-run")
    n_lines = write_corpus(root / "in")
    summary_path = root / "summary.json"
    settings = [
        x for s in (*REAL_RUN_SETTINGS, f"tracking.tracking_uri={mlflow_server}") for x in ("--set", s)
    ]
    proc = cli(
        "run", "--config", str(LOCAL_CONF), "--workdir", str(root / "work"), "--input", str(root / "in"),
        "--summary-json", str(summary_path), *settings,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return RealRun(
        root / "work", root / "in", n_lines, json.loads(summary_path.read_text()), proc.stdout, proc.stderr,
        mlflow_server,
    )  # fmt: skip


def copy_run(run: RealRun, dest: Path) -> Path:
    """A private copy of the real run's workdir (tables, export, logs) for a test that writes."""
    shutil.copytree(run.workdir, dest, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return dest
