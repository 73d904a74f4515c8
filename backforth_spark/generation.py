"""The LLM stages as records, and how one batch of a stage is generated and parsed (pure Python).

An `LLMTask` declares everything about an LLM stage that is not Spark: its table and the columns it adds,
where its inputs come from (the passage, columns of upstream stages' ok rows), the stage whose fingerprint
it chains to, and the parser of its output. The Spark runner (backforth_spark/stages/generate.py), the
fingerprints, the table schemas, status, the config check and export all read these records.

Each stage's rows are keyed by (passage_id, fingerprint). The fingerprint hashes the stage, the model, the
template, the sampling parameters and the upstream stage's fingerprint, so changing a prompt or the model
regenerates that stage and the ones after it, and nothing else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from backforth_spark import prompts
from backforth_spark.config import Config, ConfigError
from backforth_spark.engine import Completion, Engine, GenerationParams
from backforth_spark.schemas import GENERATION_COLUMNS, LINEAGE, PASSAGES, Column
from backforth_spark.text import stable_hash

ENGINE_ERROR = "engine_error"
TOO_LONG = "too_long"

Parser = Callable[[Completion, GenerationParams], dict]


@dataclass(frozen=True)
class Select:
    """Columns taken from the current ok rows of an upstream stage, optionally filtered (SQL built from
    the config, e.g. the score threshold)."""

    stage: str
    columns: tuple[str, ...] = ()
    where: Callable[[Config], str] | None = None


@dataclass(frozen=True)
class LLMTask:
    """One LLM stage, declared once. Its settings are `llm.<name>` in the config (`llm.extra_stages.<name>`
    for a stage the schema does not name)."""

    name: str
    table: str
    # (name, type, nullable) of the columns the stage adds: copied inputs first, then parsed values
    passthrough: tuple[Column, ...]
    values: tuple[Column, ...]
    parse: Parser
    reads_passage: bool = True  # the passage text is an input (column `passage`)
    selects: tuple[Select, ...] = ()
    upstream: str | None = None  # the stage whose fingerprint this one's chains to
    judge: bool = False  # outputs a 1..5 grade: json and choice constraints apply

    @property
    def input_columns(self) -> list[str]:
        """The columns of a batch handed to `run_batch` (template placeholders come from these)."""
        cols = ["passage_id", *(["passage"] if self.reads_passage else [])]
        cols += [c for s in self.selects for c in s.columns]
        return [*cols, "attempts"]

    @property
    def output_columns(self) -> list[str]:
        """The columns a Python worker produces: the table's columns less lineage."""
        return [name for name, _, _ in (*GENERATION_COLUMNS, *self.passthrough, *self.values)]

    @property
    def columns(self) -> tuple[Column, ...]:
        """The table's columns, lineage included."""
        return (*GENERATION_COLUMNS, *self.passthrough, *self.values, *LINEAGE)

    def reads(self, tasks: Sequence[LLMTask]) -> tuple[str, ...]:
        """The tables the stage reads: the passages, its upstream stages' tables and its own."""
        by_name = {t.name: t for t in tasks}
        upstream = [by_name[s.stage].table for s in self.selects]
        return tuple(dict.fromkeys([*([PASSAGES] if self.reads_passage else []), *upstream, self.table]))


# ---- parsers: model output -> status, error and the stage's value columns; they never raise --------


def _instruction(c: Completion, params: GenerationParams) -> dict:
    p = prompts.parse_instruction(c.text, c.finish_reason)
    return {"status": p.status, "error": p.error, "instruction": p.value}


def _judgement(c: Completion, params: GenerationParams) -> dict:
    if params.json_schema:
        p = prompts.parse_score_json(c.text)
    elif params.choice:
        p = prompts.parse_score_choice(c.text)
    else:
        p = prompts.parse_score(c.text)
    return {"status": p.status, "error": p.error, "reason": p.value, "score": p.score}


def _rewrite(c: Completion, params: GenerationParams) -> dict:
    p = prompts.parse_rewrite(c.text)
    return {"status": p.status, "error": p.error, "response": p.value}


def _answer(c: Completion, params: GenerationParams) -> dict:
    p = prompts.parse_answer(c.text)
    return {"status": p.status, "error": p.error, "response": p.value}


INSTRUCTION: Column = ("instruction", "string", True)
SCORE_COL: Column = ("score", "int", True)
RESPONSE: Column = ("response", "string", True)
REASON: Column = ("reason", "string", True)


def _kept(cfg: Config) -> str:
    # the paper keeps only the pairs its judge graded 5; the threshold is not in any fingerprint
    return f"score >= {int(cfg.curate.min_score)}"


BACKTRANSLATE = LLMTask(
    "backtranslate", "instructions", passthrough=(), values=(INSTRUCTION,), parse=_instruction
)
SCORE = LLMTask(
    "score",
    "scores",
    passthrough=(INSTRUCTION,),
    values=(REASON, SCORE_COL),
    parse=_judgement,
    selects=(Select("backtranslate", ("instruction",)),),
    upstream="backtranslate",
    judge=True,
)
REWRITE = LLMTask(
    "rewrite",
    "responses",
    passthrough=(INSTRUCTION, SCORE_COL),
    values=(RESPONSE,),
    parse=_rewrite,
    selects=(Select("backtranslate", ("instruction",)), Select("score", ("score",), _kept)),
    upstream="score",
)
# optional: a second judge (is the rewrite faithful to its passage?) and the distillation baseline
GROUND = LLMTask(
    "ground",
    "grounding",
    passthrough=(RESPONSE,),
    values=(REASON, SCORE_COL),
    parse=_judgement,
    selects=(Select("rewrite", ("response",)),),
    upstream="rewrite",
    judge=True,
)
DISTILL = LLMTask(
    "distill",
    "distillations",
    passthrough=(INSTRUCTION,),
    values=(RESPONSE,),
    parse=_answer,
    reads_passage=False,
    selects=(Select("backtranslate", ("instruction",)), Select("score", (), _kept)),
    upstream="score",
)
LLM_TASKS: tuple[LLMTask, ...] = (BACKTRANSLATE, SCORE, REWRITE, GROUND, DISTILL)


# ---- specs and fingerprints -----------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """Everything a Python worker needs to run one LLM stage on a batch (picklable)."""

    task: LLMTask
    template: prompts.Template
    params: GenerationParams
    model: str
    fingerprint: str

    @property
    def stage(self) -> str:
        return self.task.name


def stage_spec(cfg: Config, task: LLMTask, model: str, upstream_fingerprint: str = "") -> StageSpec:
    stage_cfg = cfg.llm.stage(task.name)
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
    fingerprint = stable_hash(task.name, model, template.hash, params.as_json(), upstream_fingerprint)[:16]
    return StageSpec(task, template, params, model, fingerprint)


def fingerprints(cfg: Config, model: str, tasks: Sequence[LLMTask] = LLM_TASKS) -> dict[str, StageSpec]:
    """The stage specs, each fingerprint chained to its upstream stage's (tasks in pipeline order)."""
    specs: dict[str, StageSpec] = {}
    for task in tasks:
        upstream = specs[task.upstream].fingerprint if task.upstream else ""
        specs[task.name] = stage_spec(cfg, task, model, upstream)
    return specs


def check_config(cfg: Config, tasks: Sequence[LLMTask] = LLM_TASKS) -> None:
    """What the config schema alone cannot check, from the stage records: every stage has settings and a
    template whose placeholders its inputs fill; json and choice constraints only on judges; a passage of
    `chunk.max_tokens` leaves room in the context for each stage's output. Raises ConfigError naming keys."""
    problems = []
    for task in tasks:
        try:
            stage_cfg = cfg.llm.stage(task.name)
            template = prompts.load_template(stage_cfg.template)
        except (ConfigError, FileNotFoundError) as exc:
            problems.append(f"llm.{task.name}: {exc}")
            continue
        missing = template.fields - set(task.input_columns)
        if missing:
            problems.append(
                f"llm.{task.name}.template {template.name!r} uses {sorted(missing)}; "
                f"the stage provides {task.input_columns[:-1]}"
            )
        if stage_cfg.structured in ("json", "choice") and not task.judge:
            problems.append(f"llm.{task.name}.structured: json and choice are for judging stages only")
        if (
            task.reads_passage
            and cfg.chunk.max_tokens + stage_cfg.sampling.max_tokens >= cfg.llm.max_model_len
        ):
            problems.append(
                f"chunk.max_tokens ({cfg.chunk.max_tokens}) + llm.{task.name}.sampling.max_tokens "
                f"({stage_cfg.sampling.max_tokens}) must stay below llm.max_model_len "
                f"({cfg.llm.max_model_len})"
            )
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


# ---- one batch ------------------------------------------------------------------------------------


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
    records = batch.to_dict("records")
    convs = [spec.template.render(**{f: str(row[f]) for f in spec.template.fields}) for row in records]
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
    columns = spec.task.output_columns
    passthrough = [name for name, _, _ in spec.task.passthrough]

    rows = []
    for i, row in enumerate(records):
        # every column present in every row: a column pandas had to invent would be float NaN,
        # which Arrow cannot turn into a string column
        base = dict.fromkeys(columns)
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
            **{col: row.get(col) for col in passthrough},
        }
        c = by_index.get(i)
        if c is None:
            limit = engine.max_model_len - spec.params.max_tokens
            base.update(status=TOO_LONG, error=f"prompt has {prompt_tokens[i]} tokens; at most {limit} fit")
        elif c.error is not None:
            base.update(status=ENGINE_ERROR, error=c.error)
        else:
            parsed = spec.task.parse(c, spec.params)
            base.update(
                raw_output=c.text,
                finish_reason=c.finish_reason,
                completion_tokens=c.completion_tokens,
                prompt_tokens=c.prompt_tokens or prompt_tokens[i],
                latency_s=latency,
                **{k: v for k, v in parsed.items() if k in base},
            )
        rows.append(base)
    out = pd.DataFrame(rows).reindex(columns=columns)
    ints = {name: "Int32" for name, typ, _ in spec.task.columns if typ == "int" and name != "attempts"}
    return out.astype({**ints, "attempts": "int32", "latency_s": "float64"})
