"""MLflow lineage against a real `mlflow server` on 127.0.0.1, and a tracking failure that loses no data."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from backforth_spark import tables as t
from backforth_spark.config import load_config
from backforth_spark.pipeline import run_pipeline
from backforth_spark.tracking import Tracker, metrics_of
from tests.conftest import DOLMA_SAMPLE, LOCAL_CONF


def test_metrics_are_the_numeric_counts_prefixed_with_the_stage():
    counts = {"rows_in": 3, "rate": 0.5, "path": "/x", "flag": True, "words_800+": 1}
    assert metrics_of("export", counts) == {
        "export.rows_in": 3.0,
        "export.rate": 0.5,
        "export.words_800_": 1.0,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
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


def test_pipeline_run_reaches_a_real_mlflow_server(spark, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path}", f"tracking.tracking_uri={mlflow_server}"])
    summary = run_pipeline(cfg, [str(DOLMA_SAMPLE)], ["ingest", "dedup", "chunk"], echo=lambda _: None)
    assert summary["error"] is None and summary["tracking_error"] is None

    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == summary["run_id"]
    assert parent.data.params["chunk.max_tokens"] == "512"
    assert parent.data.metrics["ingest.rows_out"] == 10
    assert parent.data.metrics["dedup.dedup_rate"] == 0.0  # the sample has no duplicates
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"ingest", "dedup", "chunk"}
    chunk = by_name["chunk"]
    assert chunk.data.metrics["rows_out"] == parent.data.metrics["chunk.rows_out"] > 0
    # each Delta table the stage read, with the version it read
    inputs = {d.dataset.name: d for d in chunk.inputs.dataset_inputs}
    assert set(inputs) == {t.DOCUMENTS, t.DEDUP}  # passages did not exist yet when chunk started
    source = inputs[t.DOCUMENTS].dataset.source
    version = t.Tables(spark, tmp_path / "tables").version(t.DOCUMENTS)  # nothing wrote it after ingest
    assert json.loads(source) == {
        "path": str(tmp_path / "tables" / t.DOCUMENTS),
        "delta_table_version": version,
    }
    assert inputs[t.DOCUMENTS].tags[0].value == "chunk"  # the context: which stage read it

    # the export's MLflow table, plots and dataset card go through the server's artifact proxy
    tracker = Tracker(cfg)
    tracker.start("export-only", {}, {})
    card_dir = tmp_path / "pairs"
    card_dir.mkdir()
    (card_dir / "README.md").write_text("# card\n")
    sample = pd.DataFrame({"instruction": ["q"], "response": ["a"], "score": [5], "passage_id": ["p"]})
    tracker.export({"score_5": 1, "response_words_0-24": 1}, sample, card_dir)
    tracker.end(True)
    assert tracker.error is None
    paths = {
        a.path for d in ("samples", "plots", "export/pairs") for a in client.list_artifacts(tracker.run_id, d)
    }
    assert paths == {
        "samples/pairs.json",
        "plots/scores.png",
        "plots/response_words.png",
        "export/pairs/README.md",
    }


def test_an_unreachable_tracking_server_loses_no_pipeline_data(spark, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path}", f"tracking.tracking_uri={dead}"])
    summary = run_pipeline(cfg, [str(DOLMA_SAMPLE)], ["ingest"], echo=lambda _: None)
    assert summary["error"] is None
    assert summary["tracking_error"].startswith("MLflow start failed")
    assert summary["stages"]["ingest"]["rows_out"] == 10
    assert t.Tables(spark, tmp_path / "tables").read(t.DOCUMENTS).count() == 10
