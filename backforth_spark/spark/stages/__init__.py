"""The pipeline's stages, each declared once as a `Stage` record, in pipeline order.

A record names the stage, the tables it reads and writes, the config switch that enables it and its
runner (`run(ctx) -> counts`); an LLM stage's record also holds its `LLMTask` (template settings, inputs,
upstream stage, parser, pass-through columns; backforth_spark/core/generation.py). The pipeline's order, the
`--stages` check, `status`, `--dry-run`, the config check and the MLflow inputs read these records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from backforth_spark.core import schemas as s
from backforth_spark.core.config import Config
from backforth_spark.core.generation import BACKTRANSLATE, DISTILL, GROUND, LLM_TASKS, REWRITE, SCORE, LLMTask
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.stages import chunk, dedup, export, generate, ingest

Runner = Callable[[StageContext], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # tables read, MERGE targets included (logged to MLflow with their versions)
    writes: tuple[str, ...]
    run: Runner
    enabled_by: str | None = None  # a dotted boolean config key; None: always on
    llm: LLMTask | None = None

    def enabled(self, cfg: Config) -> bool:
        if self.enabled_by is None:
            return True
        value: Any = cfg
        for part in self.enabled_by.split("."):
            value = getattr(value, part)
        return bool(value)


def llm_stage(task: LLMTask, tasks: Sequence[LLMTask] = LLM_TASKS, enabled_by: str | None = None) -> Stage:
    """The record of an LLM stage: what it reads and writes follows from its task."""
    return Stage(
        task.name, task.reads(tasks), (task.table,), partial(generate.run, task=task), enabled_by, task
    )


def export_reads(tasks: Sequence[LLMTask] = LLM_TASKS) -> tuple[str, ...]:
    return (s.DOCUMENTS, s.PASSAGES, *(t.table for t in tasks if t is not BACKTRANSLATE))


STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        (s.INPUT_FILES, s.DOCUMENTS, s.QUARANTINE),
        (s.DOCUMENTS, s.QUARANTINE, s.INPUT_FILES),
        ingest.run,
    ),
    Stage("dedup", (s.DOCUMENTS, s.DEDUP, s.MINHASH), (s.DEDUP, s.MINHASH), dedup.run),
    Stage("chunk", (s.DOCUMENTS, s.DEDUP, s.PASSAGES), (s.PASSAGES,), chunk.run),
    llm_stage(BACKTRANSLATE),
    llm_stage(SCORE),
    llm_stage(REWRITE),
    llm_stage(GROUND, enabled_by="curate.grounding"),
    llm_stage(DISTILL, enabled_by="curate.distillation_baseline"),
    Stage("export", export_reads(), (), export.run),
)


def llm_tasks(stages: Sequence[Stage]) -> tuple[LLMTask, ...]:
    """The LLM stages' tasks, in pipeline order (the fingerprint chain runs through them)."""
    return tuple(st.llm for st in stages if st.llm is not None)


def select(spec: str | None, cfg: Config, stages: Sequence[Stage] = STAGES) -> list[Stage]:
    """`a,b` -> those stages in pipeline order; None or "" -> every stage the config enables.
    An unknown name is a ValueError naming the known ones."""
    if not spec:
        return [st for st in stages if st.enabled(cfg)]
    wanted = [x.strip() for x in spec.split(",") if x.strip()]
    known = [st.name for st in stages]
    unknown = [x for x in wanted if x not in known]
    if unknown or not wanted:
        raise ValueError(f"unknown stage(s) {unknown or spec!r}; stages are {', '.join(known)}")
    return [st for st in stages if st.name in wanted]
