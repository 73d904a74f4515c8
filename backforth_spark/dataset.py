"""The exported dataset's shape (pure Python): records, shard names and the dataset card. The `export`
stage (backforth_spark/stages/export.py) writes:

    <workdir>/export/pairs/README.md                         dataset card (counts, distributions, lineage)
    <workdir>/export/pairs/data/train-00000-of-00001.jsonl   one pair a line
    <workdir>/export/pairs/data/train-00000-of-00001.parquet the same rows

Hugging Face `datasets` loads the folder as is (the card's YAML names the data files); the chat style
is TRL's SFT format ({"messages": [system?, user, assistant]}), the alpaca style has instruction, input
and output. Every row keeps its source ids and score. The curation policies (backforth_spark/curate.py,
and the grounding check when enabled) decide which rewrites are kept; every removal is counted by its
reason. With the distillation baseline on, `export/distilled/` holds the same instructions answered
without their passage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from backforth_spark.config import Config, ExportConfig

PAIRS_DIR = "pairs"
BASELINE_DIR = "distilled"  # the distillation baseline, when enabled
LINEAGE_FIELDS = ("passage_id", "doc_key", "source", "id", "score")
# per pair: the share of the response's word trigrams found in its passage
METRIC_FIELDS = ("source_copy",)
LICENSE_NOTES = {
    "odc-by": "The source passages come from Dolma, released under the Open Data Commons Attribution "
    "License (ODC-BY) v1.0; use of the source text is also bound by the terms of its original sites.",
}

# ---- pure core: records, shard names, dataset card ------------------------------------------------


def to_record(row: dict, cfg: ExportConfig) -> dict:
    """One exported row from a joined (instruction, response, lineage) row, in the configured style."""
    lineage = {k: row[k] for k in (*LINEAGE_FIELDS, *METRIC_FIELDS)}
    if cfg.style == "alpaca":
        return {"instruction": row["instruction"], "input": "", "output": row["response"], **lineage}
    messages = []
    if cfg.include_system:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages += [
        {"role": "user", "content": row["instruction"]},
        {"role": "assistant", "content": row["response"]},
    ]
    return {"messages": messages, **lineage}


def shard_names(n_rows: int, shard_rows: int) -> list[str]:
    """File stems of the shards, Hugging Face style: train-00000-of-00003 (at least one, even empty)."""
    n = max(1, -(-n_rows // shard_rows))
    return [f"train-{i:05d}-of-{n:05d}" for i in range(n)]


def buckets(edges: list[int]) -> list[tuple[int, int | None, str]]:
    """(low, high-exclusive or None, label) for consecutive edges, the last bucket open-ended."""
    highs = [*edges[1:], None]
    return [
        (lo, hi, f"{lo}-{hi - 1}" if hi is not None else f"{lo}+")
        for lo, hi in zip(edges, highs, strict=True)
    ]


WORD_EDGES = [0, 25, 50, 100, 200, 400, 800]


def dataset_card(title: str, stats: dict[str, Any], lineage: dict[str, Any], cfg: Config) -> str:
    """The dataset's README.md: YAML metadata `datasets` reads, then counts, distributions and lineage."""
    # `datasets` builds every config of a folder with one loader, so the card names one format: Parquet
    # when written; JSONL files beside it load with load_dataset("json", data_files=".../data/*.jsonl")
    fmt = "parquet" if "parquet" in cfg.export.formats else "jsonl"
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": f"data/train-*.{fmt}"}]}]
    meta = {
        "license": cfg.export.source_license,
        "task_categories": ["text-generation"],
        "tags": ["instruction-tuning", "backtranslation", "synthetic"],
        "configs": configs,
    }

    def table(rows: dict[str, Any], head: tuple[str, str]) -> list[str]:
        return [f"| {head[0]} | {head[1]} |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows.items())]

    counts = {k: v for k, v in stats["counts"].items() if isinstance(v, int)}
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        f"{stats['rows']} instruction-response pairs made by backforth-spark with instruction",
        "back-and-forth translation (Nguyen et al., 2024, arXiv 2408.04614): a web passage is backtranslated",
        "into the instruction it answers, the pair is scored by an LLM judge, and the passage is rewritten",
        f"into the response. Style: `{cfg.export.style}`; files: {', '.join(cfg.export.formats)};",
        f"{stats['shards']} shard(s) of at most {cfg.export.shard_rows} rows.",
        "",
        f'Load it with `datasets.load_dataset("<this folder>")` ({fmt} files)'
        + (
            ', or the JSONL files with `load_dataset("json", data_files="<this folder>/data/*.jsonl")`.'
            if fmt == "parquet" and "jsonl" in cfg.export.formats
            else "."
        ),
        "",
        "## Counts",
        "",
        *table(counts, ("count", "rows")),
        "",
        "## Judge scores of the exported pairs",
        "",
        *table(stats["scores"], ("score", "pairs")),
        "",
        "## Response length (words)",
        "",
        *table(stats["response_words"], ("words", "pairs")),
        "",
        *_analysis_lines(stats.get("analysis")),
        "## Lineage",
        "",
        f"- pipeline run: `{lineage['run_id']}`; MLflow run: `{lineage['mlflow_run_id']}`",
        f"- model: `{lineage['model']}`",
        *(f"- template `{k}`: `{v}`" for k, v in lineage["templates"].items()),
        *(f"- fingerprint `{k}`: `{v}`" for k, v in lineage["fingerprints"].items()),
        "- Delta table versions read: "
        + ", ".join(f"`{k}` v{v}" for k, v in lineage["table_versions"].items()),
        "",
        "## License",
        "",
        LICENSE_NOTES.get(cfg.export.source_license, f"Source text license: {cfg.export.source_license}."),
        f"The responses were generated by `{lineage['model']}`; its license applies to them as well.",
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(lineage["config"], sort_keys=True).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _analysis_lines(analysis: dict[str, Any] | None) -> list[str]:
    """The card's analyses section (lengths, diversity, source copy, and the comparison with the
    distillation baseline when there is one)."""
    if not analysis:
        return []
    lines = ["## Analyses", "", f"Computed on {analysis['rows']} pairs.", ""]
    for group, values in analysis["groups"].items():
        lines += [f"### {group.replace('_', ' ')}", "", "| measure | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in values.items()] + [""]
    if analysis.get("two_sample_accuracy") is not None or "baseline" in analysis:
        acc = analysis.get("two_sample_accuracy")
        lines += [
            "### rewritten vs distilled",
            "",
            "Held-out accuracy of a classifier telling rewritten from distilled responses (hashed word "
            "n-grams, logistic regression, 5-fold): 0.5 means indistinguishable. "
            + (f"**{acc}**" if acc is not None else "not computed (fewer than 5 pairs in a set)"),
            "",
        ]
    return lines


def read_sample(dataset_dir: Path, n: int = 50):
    """The first `n` exported rows of a dataset folder as a flat pandas DataFrame (instruction,
    response, score, passage_id), whatever the export style and file format."""
    import pandas as pd

    files = sorted((dataset_dir / "data").glob("train-*"))
    if not files:
        return pd.DataFrame(columns=["instruction", "response", "score", "passage_id"])
    first = files[0]
    df = pd.read_parquet(first) if first.suffix == ".parquet" else pd.read_json(first, lines=True)
    df = df.head(n)
    if df.empty:  # an export of zero pairs
        return pd.DataFrame(columns=["instruction", "response", "score", "passage_id"])
    if "messages" in df:

        def turn(messages, role: str) -> str:
            return next(m["content"] for m in messages if m["role"] == role)

        df["instruction"] = [turn(ms, "user") for ms in df["messages"]]
        df["response"] = [turn(ms, "assistant") for ms in df["messages"]]
    else:
        df = df.rename(columns={"output": "response"})
    return df[["instruction", "response", "score", "passage_id"]].reset_index(drop=True)
