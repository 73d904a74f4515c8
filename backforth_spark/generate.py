"""Stages `backtranslate`, `score` and `rewrite`: the three LLM passes.

Each stage reads the rows it still owes (no `ok` row for the current fingerprint, fewer than
`max_attempts` tries), hands them to the engine in large batches inside `mapInPandas`, and MERGEs
one row per (passage_id, fingerprint) into its table. The fingerprint hashes the model, the template,
the sampling parameters and the upstream stage's fingerprint, so changing a prompt or the model
regenerates that stage and the ones after it, and nothing else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from backforth_spark import prompts
from backforth_spark.config import Config, StageConfig
from backforth_spark.context import StageContext
from backforth_spark.engine import Completion, Engine, GenerationParams
from backforth_spark.text import stable_hash

log = logging.getLogger(__name__)

BACKTRANSLATE, SCORE, REWRITE = "backtranslate", "score", "rewrite"
GROUND, DISTILL = "ground", "distill"  # optional: the grounding check and the distillation baseline
LLM_STAGES = (BACKTRANSLATE, SCORE, REWRITE, GROUND, DISTILL)

ENGINE_ERROR = "engine_error"
TOO_LONG = "too_long"

# The template placeholders each stage fills, and the input columns that feed them.
STAGE_INPUTS = {
    BACKTRANSLATE: ["passage_id", "passage", "attempts"],
    SCORE: ["passage_id", "passage", "instruction", "attempts"],
    REWRITE: ["passage_id", "passage", "instruction", "score", "attempts"],
    GROUND: ["passage_id", "passage", "response", "attempts"],
    DISTILL: ["passage_id", "instruction", "attempts"],
}
# Input columns copied to the output row as they are (the rest of the row is generated).
PASSTHROUGH = ("instruction", "score", "response")


@dataclass(frozen=True)
class StageSpec:
    """Everything a Python worker needs to run one LLM stage on a batch (picklable)."""

    stage: str
    template: prompts.Template
    params: GenerationParams
    model: str
    fingerprint: str

    @property
    def output_columns(self) -> list[str]:
        from backforth_spark import tables as t

        return t.without_lineage(t.SCHEMAS[STAGE_TABLE[self.stage]]).fieldNames()


def stage_spec(cfg: Config, stage: str, model: str, upstream_fingerprint: str = "") -> StageSpec:
    stage_cfg: StageConfig = getattr(cfg.llm, stage)
    template = prompts.load_template(stage_cfg.template)
    mode = stage_cfg.structured
    params = GenerationParams(
        temperature=stage_cfg.sampling.temperature,
        top_p=stage_cfg.sampling.top_p,
        max_tokens=stage_cfg.sampling.max_tokens,
        regex=template.structured_regex if mode == "regex" else None,
        json_schema=json.dumps(prompts.SCORE_JSON_SCHEMA, sort_keys=True) if mode == "json" else None,
        choice=prompts.SCORE_CHOICES if mode == "choice" else None,
    )
    fingerprint = stable_hash(stage, model, template.hash, params.as_json(), upstream_fingerprint)[:16]
    return StageSpec(stage, template, params, model, fingerprint)


def fingerprints(cfg: Config, model: str) -> dict[str, StageSpec]:
    """The stage specs, each fingerprint chained to the stage it reads from."""
    bt = stage_spec(cfg, BACKTRANSLATE, model)
    sc = stage_spec(cfg, SCORE, model, bt.fingerprint)
    # The score threshold only selects which passages go on; a kept passage's rewrite does not depend
    # on it, so it is not part of the fingerprint (raising it regenerates nothing).
    rw = stage_spec(cfg, REWRITE, model, sc.fingerprint)
    return {
        BACKTRANSLATE: bt,
        SCORE: sc,
        REWRITE: rw,
        GROUND: stage_spec(cfg, GROUND, model, rw.fingerprint),
        DISTILL: stage_spec(cfg, DISTILL, model, sc.fingerprint),
    }


def _parse(spec: StageSpec, c: Completion) -> dict:
    if spec.stage == BACKTRANSLATE:
        p = prompts.parse_instruction(c.text, c.finish_reason)
        return {"status": p.status, "error": p.error, "instruction": p.value}
    if spec.stage in (SCORE, GROUND):
        if spec.params.json_schema:
            p = prompts.parse_score_json(c.text)
        elif spec.params.choice:
            p = prompts.parse_score_choice(c.text)
        else:
            p = prompts.parse_score(c.text)
        return {"status": p.status, "error": p.error, "reason": p.value, "score": p.score}
    if spec.stage == DISTILL:
        p = prompts.parse_answer(c.text)
        return {"status": p.status, "error": p.error, "response": p.value}
    p = prompts.parse_rewrite(c.text)
    return {"status": p.status, "error": p.error, "response": p.value}


def _chat_isolating_failures(engine: Engine, convs: list, params: GenerationParams) -> list[Completion]:
    """One engine call for the batch; if it fails, retry one by one so a bad prompt fails alone."""
    try:
        return engine.chat(convs, params)
    except Exception:
        out = []
        for conv in convs:
            try:
                out.extend(engine.chat([conv], params))
            except Exception as exc:
                out.append(Completion(None, None, None, None, error=f"{type(exc).__name__}: {exc}"[:2000]))
        return out


def run_batch(
    batch: pd.DataFrame, engine: Engine, spec: StageSpec, device: str | None = None
) -> pd.DataFrame:
    """Generate and parse one batch of stage inputs; one output row per input row, never raises
    on model output or engine errors (they become statuses). `device` is recorded on every row."""
    n = len(batch)
    convs = [
        spec.template.render(**{f: str(row[f]) for f in spec.template.fields})
        for row in batch.to_dict("records")
    ]
    prompt_tokens = engine.count_prompt_tokens(convs)
    # A prompt that cannot fit with its output is never sent: vLLM would reject the whole batch.
    fits = [p + spec.params.max_tokens <= engine.max_model_len for p in prompt_tokens]
    to_send = [i for i in range(n) if fits[i]]
    started = time.perf_counter()
    completions = (
        _chat_isolating_failures(engine, [convs[i] for i in to_send], spec.params) if to_send else []
    )
    latency = time.perf_counter() - started
    by_index = dict(zip(to_send, completions, strict=True))

    rows = []
    for i, row in enumerate(batch.to_dict("records")):
        # every column present in every row: a column pandas had to invent would be float NaN,
        # which Arrow cannot turn into a string column
        base = dict.fromkeys(spec.output_columns)
        base |= {
            "passage_id": row["passage_id"],
            "fingerprint": spec.fingerprint,
            "attempts": int(row.get("attempts") or 0) + 1,
            "model": spec.model,
            "template": spec.template.name,
            "template_hash": spec.template.hash,
            "sampling": spec.params.as_json(),
            "device": device,
            "prompt_tokens": prompt_tokens[i],
            **{col: row.get(col) for col in PASSTHROUGH},
        }
        base = {k: v for k, v in base.items() if k in spec.output_columns}
        c = by_index.get(i)
        if c is None:
            limit = engine.max_model_len - spec.params.max_tokens
            base.update(status=TOO_LONG, error=f"prompt has {prompt_tokens[i]} tokens; at most {limit} fit")
        elif c.error is not None:
            base.update(status=ENGINE_ERROR, error=c.error)
        else:
            base.update(
                raw_output=c.text,
                finish_reason=c.finish_reason,
                completion_tokens=c.completion_tokens,
                prompt_tokens=c.prompt_tokens or prompt_tokens[i],
                latency_s=latency,
                **_parse(spec, c),
            )
        rows.append(base)
    out = pd.DataFrame(rows).reindex(columns=spec.output_columns)
    ints = {c: "Int32" for c in ("prompt_tokens", "completion_tokens", "score") if c in out}
    return out.astype({**ints, "attempts": "int32", "latency_s": "float64"})


# ---- Spark glue ---------------------------------------------------------------------------------


def pending(ctx: StageContext, table: str, candidates, spec: StageSpec):
    """Candidates without an ok row for this fingerprint and with attempts left, plus their tries so far."""
    from pyspark.sql import functions as F

    existing = ctx.tables.read(table).where(F.col("fingerprint") == spec.fingerprint)
    done = existing.where("status = 'ok'").select("passage_id")
    tries = existing.select("passage_id", "attempts")
    return (
        candidates.join(done, "passage_id", "left_anti")
        .join(tries, "passage_id", "left")
        .withColumn("attempts", F.coalesce("attempts", F.lit(0)))
        .where(F.col("attempts") < ctx.cfg.llm.max_attempts)
    )


def stage_inputs(ctx: StageContext, stage: str, specs: dict[str, StageSpec]):
    from pyspark.sql import functions as F

    from backforth_spark import tables as t

    passages = (
        ctx.tables.read(t.PASSAGES)
        .where("status = 'ok'")
        .select("passage_id", F.col("text").alias("passage"))
    )
    if stage == BACKTRANSLATE:
        return passages
    bt = specs[BACKTRANSLATE].fingerprint
    instructions = (
        ctx.tables.read(t.INSTRUCTIONS)
        .where((F.col("fingerprint") == bt) & (F.col("status") == "ok"))
        .select("passage_id", "instruction")
    )
    if stage == SCORE:
        return passages.join(instructions, "passage_id")
    sc = specs[SCORE].fingerprint
    kept = (
        ctx.tables.read(t.SCORES)
        .where((F.col("fingerprint") == sc) & (F.col("status") == "ok"))
        .where(F.col("score") >= ctx.cfg.curate.min_score)
        .select("passage_id", "score")
    )
    if stage == DISTILL:
        return instructions.join(kept.select("passage_id"), "passage_id")
    if stage == REWRITE:
        return passages.join(instructions, "passage_id").join(kept, "passage_id")
    rewrites = (
        ctx.tables.read(t.RESPONSES)
        .where((F.col("fingerprint") == specs[REWRITE].fingerprint) & (F.col("status") == "ok"))
        .select("passage_id", "response")
    )
    return passages.join(rewrites, "passage_id")


STAGE_TABLE = {
    BACKTRANSLATE: "instructions",
    SCORE: "scores",
    REWRITE: "responses",
    GROUND: "grounding",
    DISTILL: "distillations",
}


def _on_cluster(ctx: StageContext) -> bool:
    return not ctx.spark.sparkContext.master.startswith("local")


def _task_slots(ctx: StageContext) -> int:
    """How many LLM tasks can run at once: executor cores over cpus_per_task (set cpus_per_task so
    that this equals the GPUs, e.g. 8 cores and 2 GPUs per executor: cpus_per_task=4)."""
    cores = ctx.spark.sparkContext.defaultParallelism
    per_task = ctx.cfg.llm.cpus_per_task if _on_cluster(ctx) else 1
    return max(1, cores // per_task)


def llm_resource_profile(ctx: StageContext):
    """The stage-level resource profile of LLM tasks (GPUs and CPUs per task), or None in local mode,
    where Spark refuses profiles. CPU stages keep the default profile."""
    if not _on_cluster(ctx):
        return None
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    llm = ctx.cfg.llm
    requests = TaskResourceRequests().cpus(llm.cpus_per_task)
    if llm.gpus_per_task > 0:
        if ctx.spark.sparkContext.getConf().get("spark.executor.resource.gpu.amount") is None:
            raise ValueError(
                f"llm.gpus_per_task={llm.gpus_per_task} but the executors offer no GPUs "
                "(spark.executor.resource.gpu.amount is not set): give them GPUs, or set "
                "llm.gpus_per_task=0 to run the LLM stages on CPU executors"
            )
        requests = requests.resource("gpu", llm.gpus_per_task)
    return ResourceProfileBuilder().require(requests).build


def run(ctx: StageContext, stage: str, engine_factory: Callable[[], Engine] | None = None) -> dict[str, int]:
    """Run one LLM stage over what it still owes; returns its counts."""
    from pyspark.sql import functions as F

    from backforth_spark import tables as t
    from backforth_spark.model import resolve_model
    from backforth_spark.openai_engine import resolve_api_key
    from udfs.generation import generate

    llm = ctx.cfg.llm
    model = resolve_model(llm)
    specs = fingerprints(ctx.cfg, model)
    spec = specs[stage]
    table = STAGE_TABLE[stage]
    clock = time.perf_counter()
    candidates = stage_inputs(ctx, stage, specs)
    n_candidates = candidates.count()
    todo = pending(ctx, table, candidates, spec).select(*STAGE_INPUTS[stage])
    t.require_columns(todo, STAGE_INPUTS[stage], f"{stage} input")
    # Freeze what this run owes before any generation starts; `h` spreads it over commit slices.
    todo = ctx.tables.stage(f"{stage}_todo", todo.withColumn("h", F.abs(F.xxhash64("passage_id"))))
    n_todo = todo.count()
    slices = -(-n_todo // llm.commit_rows) if llm.commit_rows and n_todo > llm.commit_rows else 1
    counts: dict[str, int | float] = {"rows_in": n_candidates, "generated": n_todo, "commits": 0}
    counts["plan_s"], clock = round(time.perf_counter() - clock, 2), time.perf_counter()
    gen_s = merge_s = 0.0
    done = 0
    if n_todo:
        api_key = resolve_api_key(llm.openai, ctx.spark) if llm.engine == "openai" else None
        worker = generate(spec, llm, engine_factory, api_key)
        profile = llm_resource_profile(ctx)
        parts = llm.num_partitions or _task_slots(ctx) * llm.partitions_per_slot
        schema = t.without_lineage(t.SCHEMAS[table])
        for k in range(slices):
            part = todo.where(F.col("h") % slices == k).drop("h")
            n = n_todo if slices == 1 else part.count()
            if n == 0:
                continue
            results = part.repartition(min(parts, n)).mapInPandas(worker, schema, profile=profile)
            results = results.select(
                *schema.fieldNames(),
                F.lit(ctx.run_id).alias("run_id"),
                F.current_timestamp().alias("written_at"),
            )
            # Stage the generations in Delta before the MERGE: a MERGE may scan its source more than
            # once, and a recomputed source would pay for every generation again.
            staged = ctx.tables.stage(table, results)
            gen_s, clock = gen_s + time.perf_counter() - clock, time.perf_counter()
            ctx.tables.merge_upsert_unless_ok(table, staged, ["passage_id", "fingerprint"])
            merge_s, clock = merge_s + time.perf_counter() - clock, time.perf_counter()
            counts["commits"] += 1
            done += n
            if slices > 1:  # progress of a long stage, one line per committed slice
                tokens = staged.agg(F.sum("completion_tokens")).first()[0] or 0
                log.info(
                    "%s: %d/%d rows committed, %.1f output tokens/s", stage, done, n_todo, tokens / gen_s
                )
    counts["generate_s"], counts["merge_s"] = round(gen_s, 2), round(merge_s, 2)
    current = ctx.tables.read(table).where(F.col("fingerprint") == spec.fingerprint)
    this_run = F.col("run_id") == ctx.run_id
    rows = current.groupBy("status").agg(
        F.count("*").alias("count"),
        F.sum(F.when(this_run, F.col("prompt_tokens"))).alias("tokens_in"),
        F.sum(F.when(this_run, F.col("completion_tokens"))).alias("tokens_out"),
    )
    by_status, tokens_in, tokens_out = {}, 0, 0
    for r in rows.collect():
        by_status[r["status"]] = r["count"]
        tokens_in += r["tokens_in"] or 0
        tokens_out += r["tokens_out"] or 0
    counts["rows_out"] = by_status.get("ok", 0)
    counts.update({f"status_{k}": v for k, v in sorted(by_status.items())})
    total = sum(by_status.values())
    counts["parse_failure_rate"] = round(by_status.get("parse_error", 0) / total, 4) if total else 0.0
    counts["failure_rate"] = round(1 - counts["rows_out"] / total, 4) if total else 0.0
    # tokens of the rows this run generated; per second of the generating Spark jobs
    counts["tokens_in"], counts["tokens_out"] = tokens_in, tokens_out
    counts["tokens_per_s"] = round(tokens_out / gen_s, 1) if gen_s else 0.0
    if stage in (SCORE, GROUND):
        hist = current.where("status = 'ok'").groupBy("score").count().collect()
        counts.update({f"score_{r['score']}": r["count"] for r in sorted(hist, key=lambda r: r["score"])})
    return counts
