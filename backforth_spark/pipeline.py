"""Run stages in order, track the run in MLflow, and build the run summary."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backforth_spark import chunk, dedup, export, generate, ingest
from backforth_spark import tables as t
from backforth_spark.config import Config
from backforth_spark.context import StageContext
from backforth_spark.model import resolve_model
from backforth_spark.prompts import template_source
from backforth_spark.session import get_spark
from backforth_spark.tracking import Tracker

log = logging.getLogger(__name__)

STAGES = ("ingest", "dedup", "chunk", "backtranslate", "score", "rewrite", "ground", "distill", "export")

# The pipeline tables each stage reads (logged to MLflow as the stage's inputs, with their versions).
STAGE_READS = {
    "ingest": [t.DOCUMENTS],
    "dedup": [t.DOCUMENTS, t.DEDUP, t.MINHASH],
    "chunk": [t.DOCUMENTS, t.DEDUP, t.PASSAGES],
    "backtranslate": [t.PASSAGES, t.INSTRUCTIONS],
    "score": [t.PASSAGES, t.INSTRUCTIONS, t.SCORES],
    "rewrite": [t.PASSAGES, t.INSTRUCTIONS, t.SCORES, t.RESPONSES],
    "ground": [t.PASSAGES, t.RESPONSES, t.GROUNDING],
    "distill": [t.INSTRUCTIONS, t.SCORES, t.DISTILLATIONS],
    "export": [t.DOCUMENTS, t.PASSAGES, t.SCORES, t.RESPONSES, t.GROUNDING, t.DISTILLATIONS],
}


def _stage_runner(stage: str, inputs: list[str]) -> Callable[[StageContext], dict[str, Any]]:
    if stage == "ingest":
        return lambda ctx: ingest.run(ctx, inputs)
    if stage in generate.LLM_STAGES:
        return lambda ctx: generate.run(ctx, stage)
    return {"dedup": dedup.run, "chunk": chunk.run, "export": export.run}[stage]


def parse_stages(spec: str | None, cfg: Config | None = None) -> list[str]:
    """`a,b` -> validated stage names in pipeline order; None -> every stage the config enables
    (`ground` with curate.grounding, `distill` with curate.distillation_baseline)."""
    if not spec:
        optional = {
            "ground": cfg and cfg.curate.grounding,
            "distill": cfg and cfg.curate.distillation_baseline,
        }
        return [s for s in STAGES if optional.get(s, True)]
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    return [s for s in STAGES if s in wanted]


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def run_pipeline(
    cfg: Config,
    inputs: list[str],
    stages: list[str],
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run `stages`; returns the run summary. A failed stage stops the run and is named in
    `summary["error"]` (stages before it have committed their tables)."""
    if "ingest" in stages and not inputs:
        raise ValueError("the ingest stage needs --input (Dolma files, folders or globs)")
    run_id = new_run_id()
    spark = get_spark(cfg.spark)
    tables = t.Tables.from_config(spark, cfg, run_id)
    tracker = Tracker(cfg)
    params = {**cfg.flat(), "stages": ",".join(stages), "inputs": ",".join(inputs)}
    templates = {}
    if any(s in generate.LLM_STAGES or s == "export" for s in stages):
        specs = generate.fingerprints(cfg, resolve_model(cfg.llm))
        params["model"] = specs[generate.BACKTRANSLATE].model
        params |= {f"template_hash.{s}": spec.template.hash for s, spec in specs.items()}
        templates = {s: template_source(getattr(cfg.llm, s).template) for s in specs}
    tracker.start(run_id, params, templates)
    ctx = StageContext(spark, cfg, tables, run_id, mlflow_run_id=tracker.run_id)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "mlflow_run_id": tracker.run_id,
        "stages": {},
        "export": None,
        "tables": {name: tables.location(name) for name in t.SCHEMAS},
    }
    ok = False
    summary["error"] = None
    try:
        for stage in stages:
            summary["failed_stage"] = stage
            reads = {name: (tables.dataset_source(name), tables.version(name)) for name in STAGE_READS[stage]}
            started = time.perf_counter()
            counts = _stage_runner(stage, inputs)(ctx)
            counts["wall_s"] = round(time.perf_counter() - started, 2)
            summary["stages"][stage] = counts
            # committed to Delta above; only then tracked, so a tracking failure loses no data
            tracker.stage(stage, counts, {k: v for k, v in reads.items() if v[1] is not None})
            echo(_format_counts(stage, counts))
            if stage == "export":
                summary["export"] = {"path": counts["path"], "pairs": counts["rows_out"]}
                tracker.export(counts, export.read_sample(Path(counts["path"])), Path(counts["path"]))
                if "baseline_path" in counts:
                    baseline = {"path": counts["baseline_path"], "pairs": counts["baseline_pairs"]}
                    summary["export"]["baseline"] = baseline
        ok = True
        summary["failed_stage"] = None
    except Exception as exc:
        log.exception("stage %s failed", summary["failed_stage"])
        summary["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        tables.drop_staging()
        tracker.end(ok)
        summary["tracking_error"] = tracker.error
    return summary


def _format_counts(stage: str, counts: dict[str, Any]) -> str:
    rest = " ".join(f"{k}={v}" for k, v in counts.items() if k not in ("rows_in", "rows_out"))
    return f"{stage:<14} in={counts.get('rows_in')} out={counts.get('rows_out')} {rest}"


def plan(cfg: Config, inputs: list[str], stages: list[str]) -> dict[str, Any]:
    """What `run` would do, without doing it: the stages, the input files (ingest), and per LLM stage
    how many rows it owes now (upstream stages in this run may add more)."""
    from pyspark.sql import functions as F

    from backforth_spark.status import status

    spark = get_spark(cfg.spark)
    tables = t.Tables.from_config(spark, cfg)
    out: dict[str, Any] = {"stages": stages, "workdir": str(cfg.workdir_path), "input_files": None}
    if "ingest" in stages:
        files = ingest.input_files(spark, cfg.ingest, inputs).select("path", "length")
        row = files.agg(F.count("*").alias("n"), F.sum("length").alias("bytes")).first()
        out["input_files"] = {"files": row["n"], "bytes": row["bytes"] or 0}
    report = status(StageContext(spark, cfg, tables, "dry-run"))
    out["tables"] = {name: info["rows"] for name, info in report["tables"].items()}
    out["would_generate"] = {
        s: report["llm_stages"][s]["pending"] for s in stages if s in generate.LLM_STAGES
    }
    return out
