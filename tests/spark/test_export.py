"""Export: record styles, shards and the dataset card (pure), and a real export loaded by `datasets` and
rendered through the model's chat template."""

from pathlib import Path

import pytest
import yaml

from backforth_spark.core import dataset as export
from backforth_spark.core.config import ExportConfig, load_config
from backforth_spark.spark.stages import export as export_stage
from tests.conftest import LOCAL_CONF, add_documents, exported_rows
from tests.spark.test_generate import ByContent, ScriptedEngine, _add_passages, run_stage

ROW = {
    "instruction": "How do I boil pasta?",
    "response": "Salt the water, boil it, add pasta.",
    "passage_id": "p1",
    "doc_key": "cc/1",
    "source": "cc",
    "id": "1",
    "score": 5,
    "source_copy": 0.75,
}


def _records(spark, cfg: ExportConfig) -> list[dict]:
    pairs = spark.createDataFrame([ROW])
    return [row.asDict(recursive=True) for row in export_stage.records(pairs, cfg).collect()]


def test_chat_record_is_trl_messages_with_lineage(spark):
    [rec] = _records(spark, ExportConfig(include_system=True, system_prompt="Be brief."))
    assert rec["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I boil pasta?"},
        {"role": "assistant", "content": "Salt the water, boil it, add pasta."},
    ]
    assert (rec["passage_id"], rec["doc_key"], rec["score"], rec["source_copy"]) == ("p1", "cc/1", 5, 0.75)
    assert sorted(rec) == ["doc_key", "id", "messages", "passage_id", "score", "source", "source_copy"]


def test_alpaca_record_has_instruction_input_output(spark):
    [rec] = _records(spark, ExportConfig(style="alpaca"))
    assert (rec["instruction"], rec["input"], rec["output"]) == (ROW["instruction"], "", ROW["response"])
    assert "messages" not in rec


def test_shards_hold_at_most_shard_rows_and_there_is_always_one():
    assert [export.shard_count(n, 2) for n in (0, 1, 2, 3, 5)] == [1, 1, 1, 2, 3]


def test_buckets_cover_everything_from_the_first_edge():
    assert export.buckets([0, 25, 50]) == [(0, 25, "0-24"), (25, 50, "25-49"), (50, None, "50+")]


def test_dataset_card_front_matter_names_the_data_files_and_license():
    cfg = load_config(LOCAL_CONF)
    stats = {
        "rows": 3,
        "shards": 1,
        "counts": {"rows_in": 4, "removed_low_score": 1, "rows_out": 3, "path": "/x"},
        "scores": {"5": 3},
        "response_words": {"0-24": 3},
    }
    lineage = {
        "run_id": "r1",
        "mlflow_run_id": "m1",
        "model": "some/model",
        "templates": {"score": "score_v1 abc"},
        "fingerprints": {"score": "f00"},
        "table_versions": {"passages": 7},
        "config": {"chunk": {"max_tokens": 512}},
    }
    card = export.dataset_card("t", stats, lineage, cfg, "r1")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "odc-by"
    assert meta["configs"][0] == {
        "config_name": "default",
        "data_files": [{"split": "train", "path": "r1/data/*.parquet"}],
    }
    assert len(meta["configs"]) == 1  # `datasets` loads every config of a folder with one loader
    for text in (
        "| removed_low_score | 1 |",
        "`passages` v7",
        "MLflow run: `m1`",
        "ODC-BY",
        "max_tokens: 512",
    ):
        assert text in card
    assert "/x" not in card  # only counts go in the counts table


def test_dataset_card_carries_the_analyses_and_the_two_sample_figure():
    cfg = load_config(LOCAL_CONF)
    stats = {"rows": 2, "shards": 1, "counts": {}, "scores": {}, "response_words": {}}
    stats["analysis"] = {
        "rows": 2,
        "groups": {"diversity": {"distinct_2": 0.91}, "source_copy": {"mean": 0.62}},
        "two_sample_accuracy": 0.71,
    }
    lineage = {"run_id": "r", "mlflow_run_id": None, "model": "m", "templates": {}, "fingerprints": {},
               "table_versions": {}, "config": {}}  # fmt: skip
    card = export.dataset_card("t", stats, lineage, cfg, "r")
    for text in ("## Analyses", "| distinct_2 | 0.91 |", "### source copy", "**0.71**"):
        assert text in card


def _make_pairs(ctx, n=5):
    texts = [f"Passage {i} says to boil salted water and cook the pasta until tender." for i in range(n)]
    _add_passages(ctx, texts)
    add_documents(ctx, [(f"cc/{i}", text) for i, text in enumerate(texts)])
    run_stage(ctx, "backtranslate", lambda: ScriptedEngine(reply="How do I cook pasta?"))
    run_stage(ctx, "score", lambda: ByContent({}))
    reply = "[RES] Bring salted water to a boil, add the pasta, stir it, and cook until tender. [/RES]"
    run_stage(ctx, "rewrite", lambda: ScriptedEngine(reply=reply))


def test_export_loads_with_datasets_and_renders_through_the_chat_template(make_ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    from transformers import AutoTokenizer

    from backforth_spark.core.model import resolve_model

    ctx = make_ctx("export.shard_rows=2", "export.include_system=true")
    _make_pairs(ctx)
    counts = export_stage.run(ctx)
    path = Path(counts["path"])
    assert counts["rows_out"] == 5 and counts["score_5"] == 5
    # the run's version folder: three shards of at most two rows, in each format
    data = path / ctx.run_id / "data"
    for ext in ("parquet", "json"):
        shards = sorted(data.glob(f"*.{ext}"))
        assert len(shards) == 3 and all(1 <= _rows(f) <= 2 for f in shards), ext
    cache = str(tmp_path / "hf-cache")
    parquet = datasets.load_dataset(str(path), split="train", cache_dir=cache)  # the card's default: parquet
    jsonl = datasets.load_dataset("json", data_files=f"{data}/*.json", split="train", cache_dir=cache)
    assert parquet.num_rows == jsonl.num_rows == 5
    assert parquet.to_list() == jsonl.to_list()
    assert parquet["passage_id"] == sorted(parquet["passage_id"])  # the shards in passage order
    columns = ["doc_key", "id", "messages", "passage_id", "score", "source", "source_copy"]
    assert sorted(parquet.column_names) == columns

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(ctx.cfg.llm))
    row = parquet[0]
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    for message in row["messages"]:
        assert message["content"] in text
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]

    card = (path / "README.md").read_text()
    assert "| rows_out | 5 |" in card and "`responses` v" in card

    # a later export with another layout replaces the old one whole: its own version, no stale shards
    later = make_ctx("export.style=alpaca", "export.formats=[jsonl]")  # same tables
    again = export_stage.run(later)
    assert sorted(p.name for p in path.iterdir()) == sorted(["README.md", later.run_id])
    rows = exported_rows(again["path"])
    assert {tuple(sorted(r)) for r in rows} == {
        ("doc_key", "id", "input", "instruction", "output", "passage_id", "score", "source", "source_copy")
    }
    loaded = datasets.load_dataset(again["path"], split="train", cache_dir=cache)
    assert loaded.num_rows == 5 and loaded[0]["input"] == ""


def _rows(shard: Path) -> int:
    if shard.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(shard).num_rows
    return sum(1 for _ in shard.open())


class Killed(BaseException):
    """A kill: no `except Exception` catches it."""


def test_an_export_killed_before_its_card_leaves_the_last_export_whole_and_the_next_cleans_up(
    spark, tmp_path, monkeypatch
):
    cfg = ExportConfig(formats=["jsonl"])
    out = str(tmp_path / "pairs")
    rows = lambda n: spark.createDataFrame([(f"p{i}",) for i in range(n)], "passage_id string")  # noqa: E731
    jsonl = load_config(LOCAL_CONF, ["export.formats=[jsonl]"])
    card = lambda version: export.dataset_card("t", STATS, LINEAGE, jsonl, version)  # noqa: E731
    export_stage.write_dataset(rows(2), 2, out, "v1", card("v1"), cfg)

    real_write = export_stage.storage.write_text

    def killed_before_the_card(uri, text):
        raise Killed

    monkeypatch.setattr(export_stage.storage, "write_text", killed_before_the_card)
    with pytest.raises(Killed):  # its data files written, its card never
        export_stage.write_dataset(rows(3), 3, out, "v2", card("v2"), cfg)
    monkeypatch.setattr(export_stage.storage, "write_text", real_write)
    assert (tmp_path / "pairs" / "v2" / "data").exists()
    # a reader still opens the last export, whole
    assert export.current_files(out)[0] == "v1" and [r["passage_id"] for r in exported_rows(out)] == [
        "p0",
        "p1",
    ]

    export_stage.write_dataset(rows(3), 3, out, "v3", card("v3"), cfg)
    assert [r["passage_id"] for r in exported_rows(out)] == ["p0", "p1", "p2"]
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == ["README.md", "v3"]  # v1 and v2 gone


STATS = {"rows": 0, "shards": 1, "counts": {}, "scores": {}, "response_words": {}}
LINEAGE = {"run_id": "r", "mlflow_run_id": None, "model": "m", "templates": {}, "fingerprints": {},
           "table_versions": {}, "config": {}}  # fmt: skip
