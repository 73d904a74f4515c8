"""`backforth status`: what the tables hold and what each LLM stage has done, owes and failed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyspark.sql import functions as F

from backforth_spark.spark.context import StageContext
from backforth_spark.spark.stages import STAGES, Stage
from backforth_spark.spark.stages.generate import current_specs, pending, stage_inputs


def status(
    ctx: StageContext, judged_by: dict[str, Any] | None = None, pipeline: Sequence[Stage] = STAGES
) -> dict[str, Any]:
    """Row count and Delta version per table; per LLM stage (the fingerprints of ctx's config, which
    `judged_by` names): done, pending (owed, with attempts left), failed rows by status, and failures
    out of attempts, or `enabled: false` for a stage the config leaves off; the last run seen."""
    out: dict[str, Any] = {
        "workdir": ctx.cfg.workdir_uri,
        "judged_by": judged_by or {"config": "given"},
        "tables": {},
        "llm_stages": {},
        "last_run": None,
    }
    enabled = {st.llm.name: st.enabled(ctx.cfg) for st in pipeline if st.llm is not None}
    last: tuple | None = None
    for name in ctx.tables.schemas:
        if not ctx.tables.exists(name):
            out["tables"][name] = {"rows": 0, "version": None}
            continue
        version = ctx.tables.version(name)
        df = ctx.tables.read(name)
        row = df.agg(F.count("*").alias("n"), F.max(F.struct("written_at", "run_id")).alias("last")).first()
        out["tables"][name] = {"rows": row["n"], "version": version}
        if row["last"] is not None and (last is None or row["last"][0] > last[0]):
            last = (row["last"][0], row["last"][1])
    if last is not None:
        out["last_run"] = {"run_id": last[1], "written_at": last[0].isoformat()}

    specs = current_specs(ctx)
    for task in ctx.llm_tasks:
        spec = specs[task.name]
        rows = ctx.tables.read(task.table).where(F.col("fingerprint") == spec.fingerprint)
        by_status = {r["status"]: r["count"] for r in rows.groupBy("status").count().collect()}
        exhausted = rows.where(
            (F.col("status") != "ok") & (F.col("attempts") >= ctx.cfg.llm.max_attempts)
        ).count()
        on = enabled.get(task.name, True)
        # a stage the config leaves off owes nothing, whatever its inputs hold
        owed = pending(ctx, task, stage_inputs(ctx, task, specs), spec).count() if on else 0
        out["llm_stages"][task.name] = {
            "enabled": on,
            "fingerprint": spec.fingerprint,
            "done": by_status.get("ok", 0),
            "pending": owed,
            "failed": {k: v for k, v in sorted(by_status.items()) if k != "ok"},
            "out_of_attempts": exhausted,
        }
    return out


def format_status(s: dict[str, Any]) -> str:
    judged = s["judged_by"]
    if judged["config"] == "recorded":
        by = f"the settings run {judged['run_id']} recorded in the workdir"
    else:
        by = "the config given (--config and --set)"
    lines = [f"workdir {s['workdir']}", f"judged by {by}"]
    if s["last_run"]:
        lines.append(f"last run {s['last_run']['run_id']} at {s['last_run']['written_at']}")
    lines.append("")
    lines.append(f"{'table':<20} {'rows':>10} {'version':>8}")
    for name, info in s["tables"].items():
        version = "-" if info["version"] is None else str(info["version"])
        lines.append(f"{name:<20} {info['rows']:>10} {version:>8}")
    lines.append("")
    lines.append(f"{'llm stage':<14} {'done':>7} {'pending':>8}  failed (by status)")
    for stage, info in s["llm_stages"].items():
        failed = ", ".join(f"{k}={v}" for k, v in info["failed"].items()) or "-"
        if info["out_of_attempts"]:
            failed += f" ({info['out_of_attempts']} out of attempts)"
        owed = info["pending"] if info["enabled"] else "off"
        lines.append(f"{stage:<14} {info['done']:>7} {owed:>8}  {failed}")
    return "\n".join(lines)
