"""The `backforth` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from backforth_spark.config import ConfigError, load_config
from backforth_spark.pipeline import STAGES, parse_stages, run_pipeline


def _run_args(run: argparse.ArgumentParser) -> None:
    run.add_argument("--config", default=None, help="YAML config (default: the schema's defaults)")
    run.add_argument("--input", action="append", default=[], help="Dolma file, folder or glob; repeatable")
    run.add_argument("--workdir", default=None, help="root of the Delta tables, MLflow store and export")
    run.add_argument("--stages", default=None, help=f"comma-separated subset of: {','.join(STAGES)}")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="dotted config override, e.g. chunk.max_tokens=512; repeatable",
    )
    run.add_argument("--summary-json", default=None, help="also write the run summary to this path")
    run.add_argument(
        "--dry-run", action="store_true", help="print the plan (stages, inputs, owed rows); run nothing"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backforth", description="Instruction back-and-forth translation on Spark"
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (all stages or --stages)")
    _run_args(run)
    refresh = sub.add_parser(
        "refresh",
        help="process what is new, end to end (a scheduled job); inputs default to ingest.inputs",
    )
    _run_args(refresh)

    st = sub.add_parser("status", help="row counts per table; done, pending and failed per LLM stage")
    st.add_argument("--config", default=None)
    st.add_argument("--workdir", default=None)
    st.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")

    model = sub.add_parser("model", help="manage the embedded default model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    pull = model_sub.add_parser("pull", help="download and convert the default model (idempotent)")
    pull.add_argument("--config", default=None)
    pull.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    pull.add_argument("--force", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("backforth_spark").setLevel(logging.INFO)  # stage progress lines
    overrides = list(args.overrides)
    if getattr(args, "workdir", None):
        overrides.append(f"workdir={args.workdir}")
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "model":
        from backforth_spark.model import pull

        print(pull(cfg.llm, force=args.force))
        return 0

    if args.command == "status":
        return _status(cfg, args.json)
    if args.command == "refresh":
        args.input = args.input or cfg.ingest.inputs
        if not args.input:
            print("error: refresh needs --input or ingest.inputs in the config", file=sys.stderr)
            return 2

    try:
        stages = parse_stages(args.stages, cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        from backforth_spark.pipeline import plan

        try:
            print(json.dumps(plan(cfg, args.input, stages), indent=2))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        summary = run_pipeline(cfg, args.input, stages)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary["export"]:
        print(f"export: {summary['export']['path']} ({summary['export']['pairs']} pairs)")
    if summary.get("tracking_error"):
        print(f"warning: {summary['tracking_error']}", file=sys.stderr)
    print(f"mlflow run: {summary['mlflow_run_id']}  run id: {summary['run_id']}")
    generated = sum(c.get("generated", 0) for c in summary["stages"].values())
    summary["llm_rows_generated"] = generated
    if not summary["error"]:
        new_docs = summary["stages"].get("ingest", {}).get("documents")
        if generated == 0:
            print(f"no LLM work: nothing new to generate (new documents: {new_docs})")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    if summary["error"]:
        print(f"error: stage {summary['failed_stage']} failed: {summary['error']}", file=sys.stderr)
        return 1
    return 0


def _status(cfg, as_json: bool) -> int:
    from backforth_spark import tables as t
    from backforth_spark.context import StageContext
    from backforth_spark.session import get_spark
    from backforth_spark.status import format_status, status

    if cfg.tables.catalog_schema is None and not (cfg.workdir_path / "tables").exists():
        print(f"error: no tables under {cfg.workdir_path}; run `backforth run` first", file=sys.stderr)
        return 2
    spark = get_spark(cfg.spark)
    ctx = StageContext(spark, cfg, t.Tables.from_config(spark, cfg), "status")
    report = status(ctx)
    print(json.dumps(report, indent=2) if as_json else format_status(report))
    return 0


def job(stage: str | None) -> None:
    """Entry point of the spark-submit wrappers in jobs/: `backforth run` for one stage (None: all),
    or `backforth refresh`."""
    if stage == "refresh":
        argv = ["refresh", *sys.argv[1:]]
    else:
        argv = ["run", *sys.argv[1:]] if stage is None else ["run", "--stages", stage, *sys.argv[1:]]
    sys.exit(main(argv))


if __name__ == "__main__":
    sys.exit(main())
