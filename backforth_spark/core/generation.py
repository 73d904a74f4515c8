"""The LLM stages as records, and how one batch of a stage is generated and parsed (pure Python).

An `LLMTask` declares everything about an LLM stage that is not Spark: its table and the columns it adds,
where its inputs come from (the passage, columns of upstream stages' ok rows), the stage whose fingerprint
it chains to, and the parser of its output. The Spark runner (backforth_spark/spark/stages/generate.py), the
fingerprints, the table schemas, status, the config check and export all read these records.

Each stage's rows are keyed by (passage_id, fingerprint). The fingerprint hashes the stage, the model, the
template, the sampling parameters and the upstream stage's fingerprint, so changing a prompt or the model
regenerates that stage and the ones after it, and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from backforth_spark.core import prompts
from backforth_spark.core.config import Config, ConfigError
from backforth_spark.core.engines.engine import Completion, Engine, FatalEngineError, GenerationParams
from backforth_spark.core.model import resolve_model
from backforth_spark.core.schemas import GENERATION_COLUMNS, LINEAGE, PASSAGES, Column
from backforth_spark.core.text import stable_hash

ENGINE_ERROR = "engine_error"
TOO_LONG = "too_long"
TRUNCATED = "truncated"  # the output ran into its token budget: never exported as a complete answer
# the output repeats the random marker that fenced its prompt's untrusted text ("Why 4947e1c720597451 is
# an excellent answer!"): prompt text leaked into the answer. A retry draws another marker.
FENCE_MARKER = "fence_marker"
# failures that the same prompt and sampling give again at temperature 0: not regenerated under the
# same fingerprint (an engine error may pass; too_long never fits)
DETERMINISTIC_AT_ZERO = ("parse_error", TRUNCATED, "empty", "refused")

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
    # the whole output is the answer (no closing structure), so hitting the token limit cuts it
    whole_output: bool = False

    @property
    def input_columns(self) -> list[str]:
        """The columns of a batch handed to `run_batch` (template placeholders come from these)."""
        cols = ["passage_id", *(["passage", "passage_tokens"] if self.reads_passage else [])]
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
    whole_output=True,
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
    # (factor, margin): a row's output budget is factor x its passage tokens + margin, at most max_tokens
    budget: tuple[float, int] | None = None

    @property
    def stage(self) -> str:
        return self.task.name

    def max_tokens(self, passage_tokens: int | None) -> int:
        """The output budget of a row whose passage has `passage_tokens` tokens."""
        if self.budget is None or passage_tokens is None:
            return self.params.max_tokens
        factor, margin = self.budget
        return min(self.params.max_tokens, math.ceil(factor * passage_tokens) + margin)


def stage_spec(cfg: Config, task: LLMTask, model: str, upstream_fingerprint: str = "") -> StageSpec:
    stage_cfg = cfg.llm.stage(task.name)
    template = prompts.load_template(stage_cfg.template)
    mode = stage_cfg.structured
    sampling = stage_cfg.sampling
    params = GenerationParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        regex=template.structured_regex if mode == "regex" else None,
        json_schema=json.dumps(prompts.SCORE_JSON_SCHEMA, sort_keys=True) if mode == "json" else None,
        choice=prompts.SCORE_CHOICES if mode == "choice" else None,
        repetition_penalty=sampling.repetition_penalty,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        stop=tuple(sampling.stop),
    )
    budget = (sampling.output_per_input_token, sampling.output_margin) if task.reads_passage else None
    if budget and budget[0] is None:
        budget = None
    # the budget rule is part of the sampling: changing it regenerates the stage
    extra = json.dumps(budget) if budget else ""
    fingerprint = stable_hash(task.name, model, template.hash, params.as_json() + extra, upstream_fingerprint)
    return StageSpec(task, template, params, model, fingerprint[:16], budget)


def fingerprints(
    cfg: Config, model: str | None = None, tasks: Sequence[LLMTask] = LLM_TASKS
) -> dict[str, StageSpec]:
    """The stage specs, each fingerprint chained to its upstream stage's (tasks in pipeline order).
    Each stage runs its own model (`llm.<stage>.model`, else `llm.model`) unless `model` names one for all."""
    specs: dict[str, StageSpec] = {}
    for task in tasks:
        upstream = specs[task.upstream].fingerprint if task.upstream else ""
        stage_model = model or resolve_model(cfg.llm.for_stage(task.name))
        specs[task.name] = stage_spec(cfg, task, stage_model, upstream)
    return specs


def output_budget(sampling, passage_tokens: int) -> int:
    """The uncapped output budget of a passage of `passage_tokens` under a stage's sampling settings."""
    if sampling.output_per_input_token is None:
        return sampling.max_tokens
    return math.ceil(sampling.output_per_input_token * passage_tokens) + sampling.output_margin


def check_config(cfg: Config, tasks: Sequence[LLMTask] = LLM_TASKS) -> None:
    """What the config schema alone cannot check, from the stage records: every stage has settings and a
    template whose placeholders its inputs fill; json and choice constraints only on judges; a passage of
    `chunk.max_tokens` leaves room in the context for each stage's output. Raises ConfigError naming keys."""
    problems = []
    for task in tasks:
        try:
            stage_cfg = cfg.llm.stage(task.name)
            template = prompts.load_template(stage_cfg.template)
        except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
            problems.append(f"llm.{task.name}: {exc}")
            continue
        missing = template.data_fields - set(task.input_columns)
        if missing:
            problems.append(
                f"llm.{task.name}.template {template.name!r} uses {sorted(missing)}; "
                f"the stage provides {task.input_columns[:-1]}"
            )
        if stage_cfg.structured in ("json", "choice") and not task.judge:
            problems.append(f"llm.{task.name}.structured: json and choice are for judging stages only")
        if task.reads_passage:
            # a passage of chunk.max_tokens must fit with its full output budget (the template's own
            # text takes more; a row that still does not fit is recorded too_long, never sent)
            sampling = stage_cfg.sampling
            need = output_budget(sampling, cfg.chunk.max_tokens)
            key = (
                f"llm.{task.name}.sampling.output_per_input_token/output_margin"
                if sampling.output_per_input_token
                else f"llm.{task.name}.sampling.max_tokens"
            )
            context = cfg.llm.for_stage(task.name).max_model_len
            context_key = (
                f"llm.{task.name}.engine_settings.max_model_len"
                if stage_cfg.engine_settings.max_model_len
                else "llm.max_model_len"
            )
            if cfg.chunk.max_tokens + need >= context:
                problems.append(
                    f"chunk.max_tokens ({cfg.chunk.max_tokens}) + the output budget of such a passage "
                    f"({need}, from {key}) must stay below {context_key} ({context})"
                )
            if sampling.output_per_input_token and need > sampling.max_tokens:
                problems.append(
                    f"llm.{task.name}.sampling.max_tokens ({sampling.max_tokens}) cuts the output budget "
                    f"of a passage of chunk.max_tokens ({need}): raise it, or lower chunk.max_tokens"
                )
        problems += _gpu_problems(cfg, task.name)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def _engine_key(cfg: Config, stage: str, key: str) -> str:
    """Where stage `stage` takes engine setting `key` from: its engine_settings, else llm.<key>."""
    given = getattr(cfg.llm.stage(stage).engine_settings, key) is not None
    return f"llm.{stage}.engine_settings.{key}" if given else f"llm.{key}"


def _gpu_problems(cfg: Config, stage: str) -> list[str]:
    """A stage's GPU request against its engine: whole GPUs (an engine host holds the GPUs its tasks
    are assigned, none shared: udfs/engine_host.py), and enough of them for its tensor parallelism."""
    llm = cfg.llm.for_stage(stage)
    gpus, gpus_key = llm.gpus_per_task, _engine_key(cfg, stage, "gpus_per_task")
    if gpus != int(gpus):
        return [
            f"{gpus_key} ({gpus}): an engine holds its GPUs whole, one engine per GPU; "
            "give a whole number, or 0 for CPU executors"
        ]
    if llm.engine == "vllm" and gpus >= 1 and llm.tensor_parallel_size > gpus:
        tp_key = _engine_key(cfg, stage, "tensor_parallel_size")
        return [
            f"{tp_key} ({llm.tensor_parallel_size}) is more than {gpus_key} ({int(gpus)}): a task's engine "
            "spans only the GPUs Spark assigned to that task"
        ]
    return []


@dataclass(frozen=True)
class Executors:
    """What one executor of the cluster offers its tasks, as its Spark conf says (None: not said)."""

    cores: int | None
    gpus: float | None


def check_executors(cfg: Config, stages: Sequence[str], executors: Executors) -> None:
    """Each of `stages` (LLM stages about to run) asks per task for what an executor has: Spark does not
    refuse a task no executor can hold, it waits for one (for ever with dynamic allocation off). Raises
    ConfigError naming both sides."""
    problems = []
    for stage in stages:
        llm = cfg.llm.for_stage(stage)
        asks = (
            ("cpus_per_task", llm.cpus_per_task, executors.cores, "spark.executor.cores"),
            ("gpus_per_task", llm.gpus_per_task, executors.gpus, "spark.executor.resource.gpu.amount"),
        )
        for key, wanted, offered, offered_key in asks:
            if offered is not None and wanted > offered:
                problems.append(
                    f"{_engine_key(cfg, stage, key)} ({_number(wanted)}) is more than an executor offers "
                    f"({offered_key} = {_number(offered)}): no executor can run a {stage} task"
                )
    if problems:
        raise ConfigError("the cluster cannot run this config: " + "; ".join(problems))


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


# ---- one batch ------------------------------------------------------------------------------------


# A pattern's length comes from the output budget: MAX_CHARS in a template's structured_regex becomes
# what surely fits the row's budget (a token carries at least one character: a looping small model was
# seen writing "\n\nA:" at one character per token; 16 tokens are left for the pattern's own markers),
# so a constrained output always ends before its budget does.
MAX_CHARS = "MAX_CHARS"
_CHARS_PER_TOKEN = 1.0
_MARKER_TOKENS = 16


def _within_budget(params: GenerationParams, budget: int) -> GenerationParams:
    """`params` for one row: its output budget, and any pattern length derived from it."""
    regex = params.regex
    if regex and MAX_CHARS in regex:
        regex = regex.replace(MAX_CHARS, str(max(32, int((budget - _MARKER_TOKENS) * _CHARS_PER_TOKEN))))
    return dataclasses.replace(params, max_tokens=budget, regex=regex)


def _int_or_none(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _generate_isolating_failures(
    call: Callable[[list, list[GenerationParams]], list[Completion]],
    prompts_: list,
    params: list[GenerationParams],
) -> list[Completion]:
    """One engine call for the batch; if it fails, retry one by one so a bad prompt fails alone. A fatal
    engine error (no prompt can succeed) is raised: the stage stops and no row is marked."""
    try:
        return call(prompts_, params)
    except FatalEngineError:
        raise
    except Exception:
        out = []
        for conv, p in zip(prompts_, params, strict=True):
            try:
                out.extend(call([conv], [p]))
            except FatalEngineError:
                raise
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
    values = [{f: str(row[f]) for f in spec.template.data_fields} for row in records]
    # each prompt's fence marker, drawn here so that its output can be checked for it
    fenced = prompts.FENCE in spec.template.fields
    fences = [prompts.new_fence(v.values()) if fenced else None for v in values]
    convs = [
        spec.template.render(**v, **({prompts.FENCE: f} if f else {}))
        for v, f in zip(values, fences, strict=True)
    ]
    prompt_tokens = engine.count_prompt_tokens(convs)
    budgets = [spec.max_tokens(_int_or_none(row.get("passage_tokens"))) for row in records]
    # A prompt that cannot fit with its output is never sent: vLLM would reject the whole batch.
    fits = [p + b <= engine.max_model_len for p, b in zip(prompt_tokens, budgets, strict=True)]
    to_send = [i for i in range(n) if fits[i]]
    params = [_within_budget(spec.params, budgets[i]) for i in to_send]
    started = time.perf_counter()
    # a completion template's prompt is raw text; a chat template's goes through the model's chat template
    call = engine.complete if spec.template.kind == prompts.COMPLETION else engine.chat
    completions = _generate_isolating_failures(call, [convs[i] for i in to_send], params) if to_send else []
    latency = time.perf_counter() - started
    by_index = dict(zip(to_send, completions, strict=True))
    sent_params = dict(zip(to_send, params, strict=True))
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
            # what this row was generated with: its own budget and pattern length
            "sampling": sent_params[i].as_json() if i in sent_params else spec.params.as_json(),
            "device": device,
            "prompt_tokens": prompt_tokens[i],
            **{col: row.get(col) for col in passthrough},
        }
        c = by_index.get(i)
        if c is None:
            limit = engine.max_model_len - budgets[i]
            base.update(
                status=TOO_LONG,
                error=f"prompt has {prompt_tokens[i]} tokens; with an output budget of {budgets[i]}, "
                f"at most {limit} fit",
            )
        elif c.error is not None:
            base.update(status=ENGINE_ERROR, error=c.error)
        else:
            parsed = spec.task.parse(c, spec.params)
            if c.finish_reason == "length" and (parsed["status"] != "ok" or spec.task.whole_output):
                parsed = {
                    **dict.fromkeys(parsed),
                    "status": TRUNCATED,
                    "error": f"the output reached its budget of {budgets[i]} tokens before it ended",
                }
            if fences[i] and fences[i][3:-3] in c.text:
                parsed = {
                    **dict.fromkeys(parsed),
                    "status": FENCE_MARKER,
                    "error": "the output repeats the marker that fenced the prompt's text",
                }
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
