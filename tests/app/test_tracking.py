"""MLflow lineage against a real `mlflow server` on 127.0.0.1, and a tracking failure that loses no data."""

import signal

import pandas as pd

from backforth_spark.app.pipeline import run_pipeline
from backforth_spark.app.tracking import Tracker, metrics_of
from backforth_spark.core import schemas as s
from backforth_spark.core.config import load_config
from backforth_spark.spark.stages import select
from backforth_spark.spark.tables import Tables
from tests.conftest import DOLMA_SAMPLE, LOCAL_CONF, free_port, start_mlflow_server, stop_process_group


def test_metrics_are_the_numeric_counts_prefixed_with_the_stage():
    counts = {"rows_in": 3, "rate": 0.5, "path": "/x", "flag": True, "words_800+": 1}
    assert metrics_of("export", counts) == {
        "export.rows_in": 3.0,
        "export.rate": 0.5,
        "export.words_800_": 1.0,
    }


def test_the_export_artifacts_go_through_the_servers_proxy(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path}", f"tracking.tracking_uri={mlflow_server}"])
    client = MlflowClient(tracking_uri=mlflow_server)
    # the export's MLflow table, plots and dataset card go through the server's artifact proxy
    tracker = Tracker(cfg)
    tracker.start("export-only", {}, {})
    sample = pd.DataFrame({"instruction": ["q"], "response": ["a"], "score": [5], "passage_id": ["p"]})
    tracker.export({"score_5": 1, "response_words_0-24": 1}, sample, "# card\n", "pairs")
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
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path}", f"tracking.tracking_uri={dead}"])
    summary = run_pipeline(cfg, [str(DOLMA_SAMPLE)], select("ingest", cfg), echo=lambda _: None)
    assert summary["error"] is None
    assert summary["tracking_error"].startswith("MLflow start failed")
    assert summary["stages"]["ingest"]["rows_out"] == 10
    assert Tables(spark, tmp_path / "tables").read(s.DOCUMENTS).count() == 10


def test_a_tracking_server_lost_mid_run_loses_no_data_and_says_so(spark, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    url, server = start_mlflow_server(tmp_path / "mlflow")
    cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path / 'work'}", f"tracking.tracking_uri={url}"])
    opened = Tracker.start

    def start_then_lose_the_server(self, *args):
        opened(self, *args)  # the run is open on the server; then the server goes away
        stop_process_group(server, signal.SIGKILL)

    monkeypatch.setattr(Tracker, "start", start_then_lose_the_server)
    try:
        summary = run_pipeline(cfg, [str(DOLMA_SAMPLE)], select("ingest", cfg), echo=lambda _: None)
    finally:
        if server.poll() is None:
            stop_process_group(server, signal.SIGKILL)
    # the stage ran and committed; tracking stopped at the first call after the loss and said so
    assert summary["run_id"] and summary["mlflow_run_id"]
    assert summary["error"] is None and summary["failed_stage"] is None
    assert summary["tracking_error"].startswith("MLflow logging stage ingest failed")
    # no run left open for MLflow's exit handler to end against the lost server (with minutes of retries)
    import mlflow

    assert mlflow.active_run() is None
    assert summary["stages"]["ingest"]["rows_out"] == 10
    assert Tables(spark, tmp_path / "work" / "tables").read(s.DOCUMENTS).count() == 10
