"""The LLM stages' Spark runner: one function runs any `LLMTask` (backforth_spark/core/generation.py).

A stage reads the rows it still owes (no `ok` row for the current fingerprint, fewer than `max_attempts`
tries), freezes them in a staging table, hands them to the engine in large batches inside `mapInPandas`,
and MERGEs one row per (passage_id, fingerprint) into its table, slice by slice.
"""

from __future__ import annotations

import logging
import os
import time

from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from backforth_spark.core import schemas as s
from backforth_spark.core.config import LLMConfig, OpenAIConfig
from backforth_spark.core.generation import DETERMINISTIC_AT_ZERO, TOO_LONG, LLMTask, StageSpec, fingerprints
from backforth_spark.core.model import Hub
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.session import default_parallelism, is_local_master, tagged
from backforth_spark.spark.tables import KeyRange, require_columns, struct, without_lineage
from udfs.generation import TASK_ENGINE_LOADS, TASK_SECONDS, generate

log = logging.getLogger(__name__)

KEYS = ["passage_id", "fingerprint"]


def resolve_api_key(cfg: OpenAIConfig, spark=None) -> str | None:
    """The API key from a Databricks secret (when a scope and key are configured) or the environment.
    Resolved on the driver, shipped inside the stage's function, never logged or stored."""
    if cfg.databricks_secret_scope and cfg.databricks_secret_key:
        return databricks_secret(cfg.databricks_secret_scope, cfg.databricks_secret_key)
    if cfg.api_key_env:
        return os.environ.get(cfg.api_key_env) or None
    return None


def hub_for(llm: LLMConfig) -> Hub:
    """Where the workers fetch Hub models (llm.hub_*), with the token read from the driver's
    environment: shipped inside the stage's function, never set in a worker's environment or logged."""
    token = os.environ.get(llm.hub_token_env) if llm.hub_token_env else None
    return Hub(llm.hub_cache_dir, llm.hub_endpoint, token or None)


def databricks_secret(scope: str, key: str) -> str:
    """A Databricks secret, through the Databricks SDK (on every Databricks runtime, and in any
    process with workspace credentials): `DBUtils(spark)` needs a classic session, which Spark Connect
    (standard access mode, serverless) does not give."""
    try:
        from databricks.sdk import WorkspaceClient
    except ImportError:
        raise ValueError(
            f"llm.openai.databricks_secret_scope={scope!r} needs the Databricks SDK "
            "(`pip install databricks-sdk`; Databricks runtimes ship it)"
        ) from None
    return WorkspaceClient().dbutils.secrets.get(scope=scope, key=key)


def current_specs(ctx: StageContext) -> dict[str, StageSpec]:
    """The spec (template, sampling, fingerprint) of every LLM stage of this pipeline."""
    return fingerprints(ctx.cfg, tasks=ctx.llm_tasks)


def _ok_rows(ctx: StageContext, task: LLMTask, spec: StageSpec) -> DataFrame:
    rows = ctx.tables.read(task.table)
    require_columns(rows, ["passage_id", "fingerprint", "status"], task.table)
    return rows.where((F.col("fingerprint") == spec.fingerprint) & (F.col("status") == "ok"))


SLICE = "_slice"  # the commit slice of an owed row, in the laid-out staging table


def _laid_out_by_slice(
    ctx: StageContext, task: LLMTask, todo: DataFrame, slices: int
) -> tuple[DataFrame, dict[int, int]]:
    """The owed rows staged once more, in a folder per commit slice, and each slice's rows: a slice then
    reads its own files only (a filter on `slice` prunes the folders), where a filter on a hash of every
    row would read the whole staging table once per slice, O(owed x slices) for the stage. Slices are
    contiguous passage_id ranges (Spark samples the keys for the bounds), so each slice's MERGE reads
    only the target files of its range (Tables.merge_upsert_unless_ok's `within`)."""
    laid = todo.repartitionByRange(slices, "passage_id").withColumn(SLICE, F.spark_partition_id())
    laid = ctx.tables.stage(f"{task.name}_slices", laid, partition_by=[SLICE])
    # the partition column alone: Parquet answers from its footers, no data is read
    sizes = {r[0]: r[1] for r in laid.groupBy(SLICE).count().collect()}
    return laid, sizes


def _one_slice(ctx, task, part, n, parts, worker, schema, profile) -> tuple[dict[str, float], list]:
    """Generate slice `part` (`n` rows), stage what the tasks produced, MERGE it into the stage's table
    within the slice's key range. Returns its seconds and what its tasks reported (task seconds, engine
    loads, output tokens, rows)."""
    clock = time.perf_counter()
    results = part.repartition(min(parts, n)).mapInPandas(worker, schema, profile=profile)
    results = results.select(
        *schema.fieldNames(),
        F.lit(ctx.run_id).alias("run_id"),
        F.current_timestamp().alias("written_at"),
    )
    # Stage the generations in Delta before the MERGE: a MERGE may scan its source more than
    # once, and a recomputed source would pay for every generation again.
    staged = ctx.tables.stage(task.table, results)
    generate_s, clock = time.perf_counter() - clock, time.perf_counter()
    # what the tasks reported of themselves, the slice's rows, tokens and key range: one small job
    spent = staged.agg(
        F.sum(TASK_SECONDS),
        F.sum(TASK_ENGINE_LOADS),
        F.sum("completion_tokens"),
        F.count(F.lit(1)),
        F.min("passage_id"),
        F.max("passage_id"),
    ).first()
    staged = staged.drop(TASK_SECONDS, TASK_ENGINE_LOADS)
    within = KeyRange("passage_id", spent[4], spent[5]) if spent[3] else None
    ctx.tables.merge_upsert_unless_ok(task.table, staged, KEYS, within)
    return {"generate_s": generate_s, "merge_s": time.perf_counter() - clock}, list(spent)


def stage_inputs(ctx: StageContext, task: LLMTask, specs: dict[str, StageSpec]) -> DataFrame:
    """The candidates of an LLM stage: (passage_id, [passage], upstream columns...), from its record."""
    by_name = {t.name: t for t in ctx.llm_tasks}
    frames = []
    if task.reads_passage:
        passages = ctx.tables.read(s.PASSAGES)
        require_columns(passages, ["passage_id", "text", "n_tokens", "status"], s.PASSAGES)
        frames.append(
            passages.where("status = 'ok'").select(
                "passage_id", F.col("text").alias("passage"), F.col("n_tokens").alias("passage_tokens")
            )
        )
    for sel in task.selects:
        upstream = _ok_rows(ctx, by_name[sel.stage], specs[sel.stage])
        require_columns(upstream, list(sel.columns), f"{by_name[sel.stage].table} (for {task.name})")
        if sel.where is not None:
            upstream = upstream.where(sel.where(ctx.cfg))
        frames.append(upstream.select("passage_id", *sel.columns))
    out = frames[0]
    for frame in frames[1:]:
        out = out.join(frame, "passage_id")
    return out


def final_statuses(spec: StageSpec) -> list[str]:
    """Statuses not generated again under the same fingerprint: `ok`, a prompt too long for the context,
    and at temperature 0 the failures the same prompt and sampling would give again."""
    deterministic = list(DETERMINISTIC_AT_ZERO) if spec.params.temperature == 0 else []
    return ["ok", TOO_LONG, *deterministic]


def pending(ctx: StageContext, task: LLMTask, candidates: DataFrame, spec: StageSpec) -> DataFrame:
    """Candidates that can still change: no row with a final status for this fingerprint, attempts left;
    with their tries so far and the status of the last one (`previous`)."""
    existing = ctx.tables.read(task.table).where(F.col("fingerprint") == spec.fingerprint)
    done = existing.where(F.col("status").isin(final_statuses(spec))).select("passage_id")
    tries = existing.select("passage_id", "attempts", F.col("status").alias("previous"))
    return (
        candidates.join(done, "passage_id", "left_anti")
        .join(tries, "passage_id", "left")
        .withColumn("attempts", F.coalesce("attempts", F.lit(0)))
        .where(F.col("attempts") < ctx.cfg.llm.max_attempts)
    )


def _on_cluster(ctx: StageContext) -> bool:
    return not is_local_master(ctx.spark)


def _task_slots(ctx: StageContext, llm: LLMConfig) -> int:
    """How many LLM tasks can run at once: executor cores over cpus_per_task (set cpus_per_task so
    that this equals the GPUs, e.g. 8 cores and 2 GPUs per executor: cpus_per_task=4)."""
    cores = default_parallelism(ctx.spark)
    per_task = llm.cpus_per_task if _on_cluster(ctx) else 1
    return max(1, cores // per_task)


def llm_resource_profile(ctx: StageContext, llm: LLMConfig):
    """The stage-level resource profile of LLM tasks (GPUs and CPUs per task), or None in local mode,
    where Spark refuses profiles. CPU stages keep the default profile."""
    if not _on_cluster(ctx):
        return None
    requests = TaskResourceRequests().cpus(llm.cpus_per_task)
    if llm.gpus_per_task > 0:
        if ctx.spark.conf.get("spark.executor.resource.gpu.amount", None) is None:
            raise ValueError(
                f"llm.gpus_per_task={llm.gpus_per_task} but the executors offer no GPUs "
                "(spark.executor.resource.gpu.amount is not set): give them GPUs, or set "
                "llm.gpus_per_task=0 to run the LLM stages on CPU executors"
            )
        requests = requests.resource("gpu", llm.gpus_per_task)
    return ResourceProfileBuilder().require(requests).build


def run(ctx: StageContext, task: LLMTask) -> dict[str, int | float]:
    """Run one LLM stage over what it still owes; returns its counts."""
    llm = ctx.cfg.llm.for_stage(task.name)  # the stage's own model and engine settings
    specs = current_specs(ctx)
    spec = specs[task.name]
    clock = time.perf_counter()
    candidates = stage_inputs(ctx, task, specs)
    n_candidates = candidates.count()
    todo = pending(ctx, task, candidates, spec).select(*task.input_columns, "previous")
    # Freeze what this run owes before any generation starts
    todo = ctx.tables.stage(f"{task.name}_todo", todo)
    # one job for both: what is owed, and what of it is a retry (by the last try's status)
    owed = {r[0]: r[1] for r in todo.groupBy("previous").count().collect()}
    retried = {status: n for status, n in owed.items() if status is not None}
    todo = todo.drop("previous")
    n_todo = sum(owed.values())
    slices = -(-n_todo // llm.commit_rows) if llm.commit_rows and n_todo > llm.commit_rows else 1
    todo, sizes = _laid_out_by_slice(ctx, task, todo, slices) if slices > 1 else (todo, {0: n_todo})
    # `owed`: what the plan froze; `generated`: the rows the slices' tasks produced and this run
    # committed, fewer when the run dies between slices
    counts: dict[str, int | float] = {"rows_in": n_candidates, "owed": n_todo, "commits": 0}
    # what this run generates again, by the status of the last try (see final_statuses for what is not)
    counts |= {f"retried_{status}": n for status, n in sorted(retried.items())}
    counts["plan_s"] = round(time.perf_counter() - clock, 2)
    gen_s = merge_s = 0.0
    task_seconds, engine_loads, generated = 0.0, 0, 0
    if n_todo:
        api_key = resolve_api_key(llm.openai, ctx.spark) if llm.engine == "openai" else None
        worker = generate(spec, llm, ctx.engine_factory, api_key, hub_for(llm))
        profile = llm_resource_profile(ctx, llm)
        parts = llm.num_partitions or _task_slots(ctx, llm) * llm.partitions_per_slot
        columns = without_lineage(struct(task.columns))
        metrics = [
            T.StructField(TASK_SECONDS, T.DoubleType()),
            T.StructField(TASK_ENGINE_LOADS, T.LongType()),
        ]
        schema = T.StructType([*columns.fields, *metrics])
        for k in range(slices):
            n = sizes.get(k, 0)
            if n == 0:
                continue
            part = todo if slices == 1 else todo.where(F.col(SLICE) == k).drop(SLICE)
            with tagged(ctx.spark, f"backforth-{task.name}-slice-{k}"):
                merged, spent = _one_slice(ctx, task, part, n, parts, worker, schema, profile)
            task_seconds += spent[0] or 0.0
            engine_loads += spent[1] or 0
            gen_s, merge_s = gen_s + merged["generate_s"], merge_s + merged["merge_s"]
            counts["commits"] += 1
            generated += spent[3]  # (a retried task's rows are staged once: its failed try's never are)
            if slices > 1:  # progress of a long stage, one line per committed slice
                tokens = spent[2] or 0
                log.info(
                    "%s: %d/%d rows committed, %.1f output tokens/s",
                    task.name,
                    generated,
                    n_todo,
                    tokens / merged["generate_s"] if merged["generate_s"] else 0.0,
                )
    counts["generate_s"], counts["merge_s"] = round(gen_s, 2), round(merge_s, 2)
    current = ctx.tables.read(task.table).where(F.col("fingerprint") == spec.fingerprint)
    this_run = F.col("run_id") == ctx.run_id
    # one job for the statuses, this run's tokens and (a judge's) the histogram of ok scores
    by = ["status", "score"] if task.judge else ["status"]
    rows = current.groupBy(*by).agg(
        F.count("*").alias("count"),
        F.sum(F.when(this_run, F.col("prompt_tokens"))).alias("tokens_in"),
        F.sum(F.when(this_run, F.col("completion_tokens"))).alias("tokens_out"),
    )
    by_status, scores, tokens_in, tokens_out = {}, {}, 0, 0
    for r in rows.collect():
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["count"]
        if task.judge and r["status"] == "ok":
            scores[r["score"]] = r["count"]
        tokens_in += r["tokens_in"] or 0
        tokens_out += r["tokens_out"] or 0
    counts["generated"], counts["rows_out"] = generated, by_status.get("ok", 0)
    counts.update({f"status_{k}": v for k, v in sorted(by_status.items())})
    total = sum(by_status.values())
    counts["parse_failure_rate"] = round(by_status.get("parse_error", 0) / total, 4) if total else 0.0
    counts["failure_rate"] = round(1 - counts["rows_out"] / total, 4) if total else 0.0
    # tokens of the rows this run generated; per second of the generating Spark jobs
    counts["tokens_in"], counts["tokens_out"] = tokens_in, tokens_out
    counts["tokens_per_s"] = round(tokens_out / gen_s, 1) if gen_s else 0.0
    # what the run cost: the tasks' wall time (engine loading included) x the GPUs each task held
    gpus = llm.gpus_per_task if _on_cluster(ctx) else 0.0
    counts["engine_task_s"] = round(task_seconds, 1)
    # engines built by this stage's tasks: one per task slot when workers kept theirs, more when Spark
    # stopped an idle worker that held one (see udfs/generation.py)
    counts["engine_loads"] = int(engine_loads)
    counts["accelerator_s"] = round(task_seconds * gpus, 1)
    counts["tokens_per_accelerator_s"] = (
        round(tokens_out / counts["accelerator_s"], 1) if counts["accelerator_s"] else 0.0
    )
    counts.update({f"score_{score}": n for score, n in sorted(scores.items())})
    return counts
