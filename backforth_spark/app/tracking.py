"""MLflow tracking for a pipeline run, from the driver only.

One parent run per pipeline run (params: the resolved config, the model, the prompt templates' hashes;
artifacts: the resolved config and the templates), one nested run per stage (its counts as metrics, and
each Delta table it read, with the version, through `mlflow.log_input`), and after the export a sample
of pairs as an MLflow table and plots of the score and response-length distributions.

A tracking failure never fails the pipeline: stage results are already committed to Delta, so the
failure is recorded in the summary and logging stops.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

import yaml

from backforth_spark.core.config import Config

log = logging.getLogger(__name__)


def metrics_of(stage: str, counts: dict[str, Any]) -> dict[str, float]:
    """The numeric counts of a stage as MLflow metrics named `<stage>.<count>` (characters MLflow
    refuses in a metric name become `_`)."""
    return {
        re.sub(r"[^\w\-. /]", "_", f"{stage}.{k}"): float(v)
        for k, v in counts.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Tracker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self.error: str | None = None
        self._mlflow = None

    @property
    def active(self) -> bool:
        """Whether this run logs to MLflow (tracking enabled, and no MLflow failure so far)."""
        return self._mlflow is not None

    @property
    def tracking_uri(self) -> str:
        return self.cfg.tracking.tracking_uri or f"sqlite:///{self.cfg.driver_path / 'mlflow.db'}"

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        if self._mlflow is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.error = f"MLflow {what} failed: {type(exc).__name__}: {exc}"
            log.warning("%s; pipeline data is committed, tracking stops here", self.error)
            # Forget the runs left open: MLflow ends the active run at interpreter exit, and against a
            # lost server its retries held the process for minutes after the work was done.
            with contextlib.suppress(Exception):
                self._mlflow.tracking.fluent._active_run_stack.get().clear()
            self._mlflow = None
            return None

    def start(self, run_name: str, params: dict[str, Any], templates: dict[str, tuple[str, str]]) -> None:
        """Open the parent run; log params, the resolved config and the prompt templates
        (stage -> (template name, YAML text))."""
        if not self.cfg.tracking.enabled:
            return
        import mlflow

        self._mlflow = mlflow

        def _start() -> None:
            mlflow.set_tracking_uri(self.tracking_uri)
            name = self.cfg.tracking.experiment
            if mlflow.get_experiment_by_name(name) is None:
                artifacts = self.cfg.driver_path / "mlartifacts"
                uri = artifacts.as_uri() if self.cfg.tracking.tracking_uri is None else None
                mlflow.create_experiment(name, artifact_location=uri)
            mlflow.set_experiment(name)
            run = mlflow.start_run(run_name=run_name)
            self.run_id = run.info.run_id
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
            mlflow.log_text(yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=True), "config.yaml")
            for stage, (name, text) in templates.items():
                mlflow.log_text(text, f"prompts/{stage}/{name}.yaml")

        self._guard("start", _start)

    def stage(
        self, stage: str, counts: dict[str, Any], inputs: dict[str, tuple[dict[str, str], int]]
    ) -> None:
        """A nested run for the stage: its counts, and `inputs` (table -> (its path or catalog name as
        `Tables.dataset_source` gives it, version)) as MLflow dataset inputs. The counts also go on the
        parent run, prefixed with the stage."""

        def _log() -> None:
            from mlflow.data.delta_dataset_source import DeltaDatasetSource
            from mlflow.data.meta_dataset import MetaDataset

            mlflow = self._mlflow
            metrics = metrics_of(stage, counts)
            mlflow.log_metrics(metrics)
            with mlflow.start_run(run_name=stage, nested=True):
                mlflow.log_metrics({k.split(".", 1)[1]: v for k, v in metrics.items()})
                for table, (where, version) in inputs.items():
                    source = DeltaDatasetSource(**where, delta_table_version=version)
                    mlflow.log_input(MetaDataset(source, name=table), context=stage)

        self._guard(f"logging stage {stage}", _log)

    def export(self, stage_counts: dict[str, Any], sample, card: str | None, name: str) -> None:
        """After the export: a sample of pairs as an MLflow table, the score and response-length plots
        (from the export's `score_*` and `response_words_*` counts), and the dataset card (`card`, the
        text of export `name`'s README.md)."""

        def _log() -> None:
            import matplotlib

            matplotlib.use("Agg")  # no display on a driver
            import matplotlib.pyplot as plt

            mlflow = self._mlflow
            mlflow.log_table(sample, "samples/pairs.json")
            plots = [
                ("score_", "judge score of exported pairs", "plots/scores.png"),
                ("response_words_", "response length (words) of exported pairs", "plots/response_words.png"),
                ("removed_", "pairs removed, by reason", "plots/removed.png"),
            ]
            # one plot per analysis group (lengths, diversity, source copy), and the baseline's
            groups = {
                k.rsplit("_", 1)[0] for k in stage_counts if k.startswith(("analysis_", "baseline_analysis_"))
            }
            for group in sorted(groups):
                plots.append((f"{group}_", group.replace("_", " "), f"plots/{group}.png"))
            for prefix, title, file in plots:
                hist = {
                    k[len(prefix) :]: v
                    for k, v in stage_counts.items()
                    if k.startswith(prefix)
                    and isinstance(v, (int, float))
                    and "_" not in k[len(prefix) :]
                    or (k.startswith(prefix) and prefix in ("score_", "response_words_", "removed_"))
                }
                if not hist:
                    continue
                fig, ax = plt.subplots(figsize=(6, 3.5))
                ax.bar(list(hist), list(hist.values()))
                ax.set_title(title)
                ax.set_ylabel("pairs")
                fig.tight_layout()
                mlflow.log_figure(fig, file)
                plt.close(fig)
            if card is not None:
                mlflow.log_text(card, f"export/{name}/README.md")

        self._guard("logging the export", _log)

    def end(self, ok: bool) -> None:
        self._guard("end_run", lambda: self._mlflow.end_run("FINISHED" if ok else "FAILED"))
