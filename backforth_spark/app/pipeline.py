"""Run stages in order, track the run in MLflow, and build the run summary."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from pyspark.sql import functions as F

from backforth_spark.app.status import status
from backforth_spark.app.tracking import Tracker
from backforth_spark.core import storage
from backforth_spark.core.config import Config, recorded_settings
from backforth_spark.core.dataset import CARD, PAIRS_DIR, read_sample
from backforth_spark.core.engines.engine import Engine
from backforth_spark.core.failures import memory_shortage
from backforth_spark.core.generation import check_config, check_executors
from backforth_spark.core.model import resolve_model
from backforth_spark.core.prompts import template_source
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.session import (
    default_parallelism,
    error_text,
    executors,
    get_spark,
    is_connect,
    jvm_stopping,
    launched_jvm_exit,
    memory_settings,
    spark_thread,
    tagged,
)
from backforth_spark.spark.stages import STAGES, Stage, llm_tasks
from backforth_spark.spark.stages.generate import current_specs
from backforth_spark.spark.stages.ingest import input_files
from backforth_spark.spark.tables import Tables
from udfs.warmup import import_modules

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


# stages that need the generation model (its tokenizer or the engine) before they start
_NEEDS_MODEL = ("chunk", "export")


def preflight(
    cfg: Config, inputs: Sequence[str], stages: Sequence[Stage], pipeline: Sequence[Stage] = STAGES
) -> None:
    """What can be checked before Spark starts: the config against the stage records, the input, the
    model. Raises ValueError (ConfigError) or FileNotFoundError (ModelNotFoundError) saying what to fix."""
    if any(st.name == "ingest" for st in stages) and not inputs:
        raise ValueError("the ingest stage needs --input (Dolma files, folders or globs)")
    # the workdir's store, from the driver: a scheme without a filesystem or a store that refuses is one
    # line now, not a stage's traceback later
    storage.check_reachable(cfg.workdir_uri)
    tasks = llm_tasks(pipeline)
    check_config(cfg, tasks)
    # a model that was never pulled: one clear error, before Spark starts
    if any(st.name in _NEEDS_MODEL for st in stages):
        resolve_model(cfg.llm)
    if any(st.llm is not None or st.name == "export" for st in stages):
        for task in tasks:
            resolve_model(cfg.llm.for_stage(task.name))


def context_for(
    cfg: Config,
    run_id: str,
    inputs: Sequence[str] = (),
    stages: Sequence[Stage] = (),
    pipeline: Sequence[Stage] = STAGES,
    engine_factory: Callable[[], Engine] | None = None,
) -> StageContext:
    """A context for `stages` of `pipeline` (the whole ordered record list: the fingerprint chain), after
    `preflight`."""
    preflight(cfg, inputs, stages, pipeline)
    tasks = llm_tasks(pipeline)
    spark = get_spark(cfg.spark)
    cluster = executors(spark)
    if cluster is not None:  # before any work: an LLM task no executor can hold would wait for ever
        llm_stages = [st.llm.name for st in stages if st.llm is not None and st.enabled(cfg)]
        check_executors(cfg, llm_stages, cluster)
    tables = Tables.from_config(spark, cfg, run_id, tasks)
    tables.check_delta()  # a server without Delta: one line and exit 2, before any work
    return StageContext(spark, cfg, tables, run_id, None, tuple(inputs), tasks, engine_factory)


def run_pipeline(
    cfg: Config,
    inputs: Sequence[str],
    stages: Sequence[Stage],
    echo: Callable[[str], None] = print,
    pipeline: Sequence[Stage] = STAGES,
    engine_factory: Callable[[], Engine] | None = None,
) -> dict[str, Any]:
    """Run `stages` (records of `pipeline`, in order); returns the run summary. A failed stage stops the
    run and is named in `summary["failed_stage"]` and `summary["error"]` (stages before it have committed
    their tables). A bad config or missing input raises ValueError before anything runs."""
    run_id = new_run_id()
    ctx = context_for(cfg, run_id, inputs, stages, pipeline, engine_factory)
    tracker = Tracker(cfg)
    params = {**cfg.flat(), "stages": ",".join(st.name for st in stages), "inputs": ",".join(inputs)}
    templates = {}
    if any(st.llm is not None or st.name == "export" for st in stages):
        specs = current_specs(ctx)
        params["model"] = resolve_model(cfg.llm)
        params |= {f"model.{name}": spec.model for name, spec in specs.items()}
        params |= {f"template_hash.{name}": spec.template.hash for name, spec in specs.items()}
        templates = {name: template_source(cfg.llm.stage(name).template) for name in specs}
    tracker.start(run_id, params, templates)
    ctx = replace(ctx, mlflow_run_id=tracker.run_id)
    tables = ctx.tables
    summary: dict[str, Any] = {
        "run_id": run_id,
        "mlflow_run_id": tracker.run_id,
        "stages": {},
        "export": None,
        "tables": {name: tables.location(name) for name in tables.schemas},
        "error": None,
        "failed_stage": None,
        "reads": {},  # the tables each stage actually read (its record declares them too)
        "phases": {},  # per stage: seconds of each timed Spark action (Tables.timed), summed by phase
        # the Spark it ran on: a classic session (a JVM of its own or spark-submit's) or a Connect client
        "spark": {"version": ctx.spark.version, "connect": is_connect(ctx.spark)},
    }
    ok = False
    jvm_alive = True
    settings = memory_settings(ctx.spark)
    head_start = start_head_start(ctx, stages)
    try:
        if any(st.llm is not None or st.name == "export" for st in stages):
            # what the LLM stages and the export are judged by, for `backforth status` to read back
            summary["failed_stage"] = stages[0].name
            tables.record_run(recorded_settings(cfg))
        for stage in stages:
            summary["failed_stage"] = stage.name
            # the versions of the tables a stage reads, for MLflow's dataset inputs (a Spark job each:
            # asked only when they are logged)
            reads = {}
            if tracker.active:
                reads = {name: (tables.dataset_source(name), tables.version(name)) for name in stage.reads}
            started, mark, phase_mark = time.perf_counter(), len(tables.read_log), len(tables.phase_log)
            # the stage's Spark jobs carry its name as a tag (event log: what each stage read)
            with tagged(ctx.spark, f"backforth-{stage.name}"):
                counts = stage.run(ctx)
            summary["reads"][stage.name] = sorted(set(tables.read_log[mark:]))
            summary["phases"][stage.name] = phase_seconds(tables.phase_log[phase_mark:])
            counts["wall_s"] = round(time.perf_counter() - started, 2)
            summary["stages"][stage.name] = counts
            # committed to Delta above; only then tracked, so a tracking failure loses no data
            tracker.stage(stage.name, counts, {k: v for k, v in reads.items() if v[1] is not None})
            echo(format_counts(stage.name, counts))
            if stage.name == "export":
                summary["export"] = {"path": counts["path"], "pairs": counts["rows_out"]}
                card = storage.read_text(storage.join(counts["path"], CARD)) if tracker.active else None
                sample = read_sample(counts["path"]) if tracker.active else None
                tracker.export(counts, sample, card, PAIRS_DIR)
                if "baseline_path" in counts:
                    baseline = {"path": counts["baseline_path"], "pairs": counts["baseline_pairs"]}
                    summary["export"]["baseline"] = baseline
        ok = True
        summary["failed_stage"] = None
    except Exception as exc:
        log.exception("stage %s failed", summary["failed_stage"])
        jvm_alive = not jvm_stopping(ctx.spark, exc)
        jvm_exit = None if jvm_alive else launched_jvm_exit()
        summary["error"] = failure_line(exc, settings, jvm_alive, jvm_exit)
    finally:
        head_start.join()
        try:
            tables.drop_staging()
        except Exception as exc:  # a catalog's staging needs the JVM the failure may have taken
            log.warning("staging of run %s not dropped: %s", run_id, error_line(exc))
        tracker.end(ok)
        summary["tracking_error"] = tracker.error
    return summary


# what the stages' Python workers import: a worker started ahead has them loaded
WORKER_MODULES = ("udfs.ingest", "udfs.text", "udfs.chunking")


def start_head_start(ctx: StageContext, stages: Sequence[Stage]):
    """Start, in a thread for the caller to join, the work every stage of a fresh process waits for:
    Python workers (a task per core, importing WORKER_MODULES) and the Delta state of each table the
    stages read, in the order they read them. A fresh process pays both before its first Python task
    and its first read of each table (a second or more each, cold); started here, they overlap the
    stages' own driver work instead of adding to it. Only a head start: a failure is logged, and
    the stages do the same work themselves."""
    spark, tables = ctx.spark, ctx.tables
    names = list(dict.fromkeys(name for st in stages for name in st.reads))

    def run() -> None:
        try:
            cores = default_parallelism(spark)
            spark.range(0, cores, 1, cores).mapInPandas(import_modules(WORKER_MODULES), "id long").collect()
        except Exception as exc:
            log.debug("no head start for the Python workers: %s", exc)
        tables.build_states(names)

    thread = spark_thread(spark, run, "head-start")
    thread.start()
    return thread


def phase_seconds(log: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Seconds per phase, summed over repeats (a MERGE retried, a loop's rounds), in first-seen order."""
    out: dict[str, float] = {}
    for phase, seconds in log:
        out[phase] = round(out.get(phase, 0.0) + seconds, 2)
    return out


def failure_line(
    exc: BaseException, settings: dict[str, str], jvm_alive: bool = True, jvm_exit: int | None = None
) -> str:
    """One line saying why a stage failed: what ran out and the setting to raise when it ran out of
    memory, that the JVM died when it did, else the error's own line (error_line)."""
    local = settings.get("spark.master", "").startswith("local")
    shortage = memory_shortage(error_text(exc), local=local, jvm_exit=jvm_exit)
    if shortage is not None:
        return shortage.sentence(settings)
    if not jvm_alive:
        code = "" if jvm_exit is None else f" (exit code {jvm_exit})"
        return f"the driver's JVM stopped answering{code}: its log (logs/spark.log) says why"
    return error_line(exc)


def error_line(exc: BaseException) -> str:
    """One line saying what failed. A Python worker's failure reaches the driver as Spark's wrapper
    around the worker's traceback: its own exception line is what says why."""
    text = error_text(exc)
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if "Traceback (most recent call last):" in lines[i]:
            # frames are indented; the exception's line is the first one after them that is not
            cause = next((ln for ln in lines[i + 1 :] if ln.strip() and not ln.startswith(" ")), None)
            if cause:
                return cause.strip()
    # a Java error: its message, without the JVM's stack (that stays in the log)
    first = " ".join(ln.strip() for ln in lines[:2] if ln.strip() and not ln.lstrip().startswith("at "))
    return f"{type(exc).__name__}: {first or text}"


def format_counts(stage: str, counts: dict[str, Any]) -> str:
    # the export's analyses go to the summary and MLflow, not the console line
    shown = {k: v for k, v in counts.items() if not k.startswith(("analysis_", "baseline_analysis_"))}
    rest = " ".join(f"{k}={v}" for k, v in shown.items() if k not in ("rows_in", "rows_out"))
    return f"{stage:<14} in={counts.get('rows_in')} out={counts.get('rows_out')} {rest}"


def plan(
    cfg: Config, inputs: Sequence[str], stages: Sequence[Stage], pipeline: Sequence[Stage] = STAGES
) -> dict[str, Any]:
    """What `run` would do, without doing it: the stages, the input files (ingest), and per LLM stage
    how many rows it owes now (upstream stages in this run may add more)."""
    ctx = context_for(cfg, "dry-run", inputs, stages, pipeline)
    out: dict[str, Any] = {
        "stages": [st.name for st in stages],
        "workdir": cfg.workdir_uri,
        "input_files": None,
    }
    if any(st.name == "ingest" for st in stages):
        files = input_files(ctx.spark, cfg.ingest, inputs).select("path", "length")
        row = files.agg(F.count("*").alias("n"), F.sum("length").alias("bytes")).first()
        out["input_files"] = {"files": row["n"], "bytes": row["bytes"] or 0}
    report = status(ctx)
    out["tables"] = {name: info["rows"] for name, info in report["tables"].items()}
    out["would_generate"] = {st.name: report["llm_stages"][st.name]["pending"] for st in stages if st.llm}
    return out
