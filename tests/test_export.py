"""Export: record styles, shards and the dataset card (pure), and a real export loaded by `datasets` and
rendered through the model's chat template."""

import json
from pathlib import Path

import pytest
import yaml

from backforth_spark import dataset as export
from backforth_spark.config import ExportConfig, load_config
from backforth_spark.stages import export as export_stage
from tests.conftest import LOCAL_CONF, add_documents
from tests.test_generate import ByContent, ScriptedEngine, _add_passages, run_stage

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


def test_chat_record_is_trl_messages_with_lineage():
    rec = export.to_record(ROW, ExportConfig(include_system=True, system_prompt="Be brief."))
    assert rec["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I boil pasta?"},
        {"role": "assistant", "content": "Salt the water, boil it, add pasta."},
    ]
    assert (rec["passage_id"], rec["doc_key"], rec["score"], rec["source_copy"]) == ("p1", "cc/1", 5, 0.75)


def test_alpaca_record_has_instruction_input_output():
    rec = export.to_record(ROW, ExportConfig(style="alpaca"))
    assert (rec["instruction"], rec["input"], rec["output"]) == (ROW["instruction"], "", ROW["response"])
    assert "messages" not in rec


def test_shard_names_follow_the_hub_convention():
    assert export.shard_names(0, 10) == ["train-00000-of-00001"]
    assert export.shard_names(5, 2) == [
        "train-00000-of-00003",
        "train-00001-of-00003",
        "train-00002-of-00003",
    ]


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
    card = export.dataset_card("t", stats, lineage, cfg)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "odc-by"
    assert meta["configs"][0] == {
        "config_name": "default",
        "data_files": [{"split": "train", "path": "data/train-*.parquet"}],
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
    card = export.dataset_card("t", stats, lineage, cfg)
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

    from backforth_spark.model import resolve_model

    ctx = make_ctx("export.shard_rows=2", "export.include_system=true")
    _make_pairs(ctx)
    counts = export_stage.run(ctx)
    path = Path(counts["path"])
    assert counts["rows_out"] == 5 and counts["score_5"] == 5
    assert sorted(p.name for p in (path / "data").iterdir()) == sorted(
        f"train-0000{i}-of-00003.{ext}" for i in range(3) for ext in ("jsonl", "parquet")
    )
    cache = str(tmp_path / "hf-cache")
    parquet = datasets.load_dataset(str(path), split="train", cache_dir=cache)  # the card's default: parquet
    jsonl = datasets.load_dataset("json", data_files=f"{path}/data/*.jsonl", split="train", cache_dir=cache)
    assert parquet.num_rows == jsonl.num_rows == 5
    assert parquet.to_list() == jsonl.to_list()
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

    # a later export with another layout replaces the old one whole: no stale shards
    again = export_stage.run(make_ctx("export.style=alpaca", "export.formats=[jsonl]"))  # same tables
    assert sorted(p.name for p in (Path(again["path"]) / "data").iterdir()) == ["train-00000-of-00001.jsonl"]
    rows = [json.loads(x) for x in (Path(again["path"]) / "data" / "train-00000-of-00001.jsonl").open()]
    assert {tuple(sorted(r)) for r in rows} == {
        ("doc_key", "id", "input", "instruction", "output", "passage_id", "score", "source", "source_copy")
    }
    loaded = datasets.load_dataset(again["path"], split="train", cache_dir=cache)
    assert loaded.num_rows == 5 and loaded[0]["input"] == ""


class Killed(BaseException):
    """A kill: no `except Exception` catches it."""


def test_a_run_that_died_inside_the_export_swap_leaves_the_last_export_and_a_rerun_completes(
    spark, tmp_path, monkeypatch
):
    import os

    from backforth_spark.config import ExportConfig
    from backforth_spark.stages import export as export_stage

    cfg = ExportConfig(formats=["jsonl"])
    out = tmp_path / "pairs"
    rows = lambda n: spark.createDataFrame([(i,) for i in range(n)], "i int")  # noqa: E731
    export_stage.write_dataset(rows(2), 2, out, lambda r: r, "# v1\n", cfg)

    real_replace, calls = os.replace, []

    def dies_between_the_renames(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old export moved aside, the new one not yet in place
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(export_stage.os, "replace", dies_between_the_renames)
    with pytest.raises(Killed):
        export_stage.write_dataset(rows(3), 3, out, lambda r: r, "# v2\n", cfg)
    monkeypatch.setattr(export_stage.os, "replace", real_replace)
    assert not out.exists()

    export_stage.recover_swap(out)  # what the next export does first
    assert (out / "README.md").read_text() == "# v1\n"
    export_stage.write_dataset(rows(3), 3, out, lambda r: r, "# v2\n", cfg)
    lines = [json.loads(x) for f in sorted(out.glob("data/*.jsonl")) for x in f.open()]
    assert sorted(r["i"] for r in lines) == [0, 1, 2] and (out / "README.md").read_text() == "# v2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]  # no .tmp or .old left
