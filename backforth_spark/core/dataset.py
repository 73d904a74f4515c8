"""The exported dataset's shape (pure Python): records, the layout of its folder and the dataset card.
The `export` stage (backforth_spark/spark/stages/export.py) writes, on any filesystem the workdir is on:

    <workdir>/export/pairs/README.md            the dataset card, written last: its YAML names the
                                                current version's files, so it is the export's pointer
    <workdir>/export/pairs/<version>/data/part-*.parquet   the pairs, sharded (Spark's executors write
    <workdir>/export/pairs/<version>/data/part-*.json      them); the same rows as JSON lines

Hugging Face `datasets` loads the folder as is (`load_dataset("<workdir>/export/pairs")` reads the
card and the files it names); the chat style is TRL's SFT format ({"messages": [system?, user,
assistant]}), the alpaca style has instruction, input and output. Every row keeps its source ids and
score. A new export writes a new version folder, then the card, then removes the older versions: a
reader sees the last whole export throughout. With the distillation baseline on, `export/distilled/`
holds the same instructions answered without their passage.
"""

from __future__ import annotations

from typing import Any

import yaml

from backforth_spark.core import storage
from backforth_spark.core.config import Config

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


def shard_count(n_rows: int, shard_rows: int) -> int:
    """How many data files of at most `shard_rows` rows hold `n_rows` (at least one, even empty)."""
    return max(1, -(-n_rows // shard_rows))


# the data files' extension for each export format (Spark's JSON writer names JSON lines `.json`)
EXTENSIONS = {"parquet": "parquet", "jsonl": "json"}
CARD = "README.md"


def data_files(version: str, fmt: str) -> str:
    """The data files of one format of an export version, relative to the export's folder."""
    return f"{version}/data/*.{EXTENSIONS[fmt]}"


def buckets(edges: list[int]) -> list[tuple[int, int | None, str]]:
    """(low, high-exclusive or None, label) for consecutive edges, the last bucket open-ended."""
    highs = [*edges[1:], None]
    return [
        (lo, hi, f"{lo}-{hi - 1}" if hi is not None else f"{lo}+")
        for lo, hi in zip(edges, highs, strict=True)
    ]


WORD_EDGES = [0, 25, 50, 100, 200, 400, 800]


def dataset_card(
    title: str, stats: dict[str, Any], lineage: dict[str, Any], cfg: Config, version: str
) -> str:
    """The dataset's README.md: YAML metadata `datasets` reads (naming `version`'s files), then counts,
    distributions and lineage."""
    # `datasets` builds every config of a folder with one loader, so the card names one format: Parquet
    # when written; JSON lines beside it load with load_dataset("json", data_files=...)
    fmt = "parquet" if "parquet" in cfg.export.formats else "jsonl"
    configs = [
        {"config_name": "default", "data_files": [{"split": "train", "path": data_files(version, fmt)}]}
    ]
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
        f"{stats['shards']} shard(s) of at most {cfg.export.shard_rows} rows, in `{version}/data/`.",
        "",
        f'Load it with `datasets.load_dataset("<this folder>")` ({fmt} files)'
        + (
            ', or the JSON lines with `load_dataset("json", data_files="<this folder>/'
            + data_files(version, "jsonl")
            + '")`.'
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


def current_files(export_uri: str) -> tuple[str | None, list[str]]:
    """(the version the export's card names, its data files of the card's format, as URIs), from the
    card; (None, []) when there is no export."""
    card = storage.read_text(storage.join(export_uri, CARD))
    if card is None:
        return None, []
    meta = yaml.safe_load(card.split("---\n")[1])
    pattern = meta["configs"][0]["data_files"][0]["path"]  # <version>/data/*.<ext>
    version, ext = pattern.split("/")[0], pattern.rsplit(".", 1)[1]
    folder = storage.join(export_uri, version, "data")
    return version, [storage.join(folder, n) for n in storage.file_names(folder) if n.endswith("." + ext)]


def read_sample(export_uri: str, n: int = 50):
    """The first `n` exported rows of an export folder (any filesystem) as a flat pandas DataFrame
    (instruction, response, score, passage_id), whatever the export style and file format."""
    import pandas as pd
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    empty = pd.DataFrame(columns=["instruction", "response", "score", "passage_id"])
    _, files = current_files(export_uri)
    for uri in files:
        fs, path = storage.filesystem(uri)
        if uri.endswith(".parquet"):
            df = pq.read_table(path, filesystem=fs).to_pandas()
        elif fs.get_file_info(path).size:
            with fs.open_input_stream(path) as stream:
                df = pajson.read_json(stream).to_pandas()
        else:  # an export of zero pairs: an empty file
            df = empty
        if not df.empty:
            break
    else:
        return empty
    df = df.head(n)
    if "messages" in df:

        def turn(messages, role: str) -> str:
            return next(m["content"] for m in messages if m["role"] == role)

        df["instruction"] = [turn(ms, "user") for ms in df["messages"]]
        df["response"] = [turn(ms, "assistant") for ms in df["messages"]]
    else:
        df = df.rename(columns={"output": "response"})
    return df[["instruction", "response", "score", "passage_id"]].reset_index(drop=True)
