"""MLflow tracking for a pipeline run, from the driver only.

A tracking failure never fails the pipeline: stage results are already committed to Delta, so the
failure is recorded in the summary and logging stops.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from backforth_spark.config import Config

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self.error: str | None = None
        self._mlflow = None

    @property
    def tracking_uri(self) -> str:
        return self.cfg.tracking.tracking_uri or f"sqlite:///{self.cfg.workdir_path / 'mlflow.db'}"

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        if self._mlflow is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.error = f"MLflow {what} failed: {type(exc).__name__}: {exc}"
            log.warning("%s; pipeline data is committed, tracking stops here", self.error)
            self._mlflow = None
            return None

    def start(self, run_name: str, params: dict[str, Any]) -> None:
        if not self.cfg.tracking.enabled:
            return
        import mlflow

        self._mlflow = mlflow

        def _start() -> None:
            mlflow.set_tracking_uri(self.tracking_uri)
            name = self.cfg.tracking.experiment
            if mlflow.get_experiment_by_name(name) is None:
                artifacts = self.cfg.workdir_path / "mlartifacts"
                uri = artifacts.as_uri() if self.cfg.tracking.tracking_uri is None else None
                mlflow.create_experiment(name, artifact_location=uri)
            mlflow.set_experiment(name)
            run = mlflow.start_run(run_name=run_name)
            self.run_id = run.info.run_id
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

        self._guard("start", _start)

    def stage(self, stage: str, counts: dict[str, Any]) -> None:
        metrics = {f"{stage}.{k}": float(v) for k, v in counts.items() if isinstance(v, (int, float))}
        self._guard("log_metrics", lambda: self._mlflow.log_metrics(metrics))

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        self._guard("log_artifact", lambda: self._mlflow.log_artifact(str(path), subdir))

    def end(self, ok: bool) -> None:
        self._guard("end_run", lambda: self._mlflow.end_run("FINISHED" if ok else "FAILED"))
