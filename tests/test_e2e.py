"""The whole pipeline through the CLI, on the real vLLM CPU engine and the default model."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from backforth_spark import tables as t
from tests.conftest import DOLMA_SAMPLE, LOCAL_CONF

pytestmark = pytest.mark.e2e

STATUSES = {"ok", "parse_error", "engine_error", "too_long", "empty", "refused"}


def _corpus(folder):
    """The 10 real Dolma documents, plus a copy of one under a new id, bad lines and a repeated id."""
    folder.mkdir()
    sample = sorted(DOLMA_SAMPLE.glob("*.jsonl"))
    assert sample, f"no Dolma sample at {DOLMA_SAMPLE}"
    for f in sample:
        shutil.copy(f, folder / f.name)
    first = json.loads(sample[0].read_text().splitlines()[0])
    copy = dict(first, id="copy-of-first", text=first["text"].upper() + "  ")
    (folder / "extra.json.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps(copy) + "\n").encode())
    )
    bad = [
        b"{broken json",
        b'{"text": "no id"}',
        b'{"id": "n1", "text": 3}',
        b'{"id": "n2", "text": "\xff"}',
        b'{"id": "n3", "text": ""}',
        json.dumps(first).encode(),
    ]
    (folder / "bad.jsonl.gz").write_bytes(gzip.compress(b"\n".join(bad) + b"\n"))
    return 10 + 1 + len(bad)


def _run(workdir, corpus, summary, *extra, command="run"):
    cmd = [
        sys.executable,
        "-m",
        "backforth_spark.cli",
        command,
        "--config",
        str(LOCAL_CONF),
        "--workdir",
        str(workdir),
        "--summary-json",
        str(summary),
        *extra,
    ]
    if corpus:
        cmd += ["--input", str(corpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(summary.read_text()), proc.stdout


def test_pipeline_end_to_end_on_the_real_engine(tmp_path, spark):
    n_lines = _corpus(tmp_path / "in")
    summary, stdout = _run(tmp_path / "work", tmp_path / "in", tmp_path / "summary.json")
    stages = summary["stages"]
    assert list(stages) == ["ingest", "dedup", "chunk", "backtranslate", "score", "rewrite", "export"]
    assert summary["tracking_error"] is None
    for stage in stages:
        assert f"{stage} " in stdout  # a row count per stage is printed

    ing = stages["ingest"]
    assert ing["lines"] == n_lines
    assert ing["lines"] == ing["documents"] + ing["quarantined"] + ing["repeated_ids"]
    assert (ing["documents"], ing["quarantined"], ing["repeated_ids"]) == (11, 5, 1)
    assert stages["dedup"]["exact_duplicates"] == 1  # the upper-cased copy

    read = lambda name: spark.read.format("delta").load(summary["tables"][name])  # noqa: E731
    assert read(t.DOCUMENTS).count() == 11
    assert read(t.QUARANTINE).count() == 5
    passages = read(t.PASSAGES)
    n_ok = passages.where("status = 'ok'").count()
    assert n_ok == stages["chunk"]["rows_out"] == stages["backtranslate"]["rows_in"] > 0
    assert passages.select("doc_key").distinct().count() == 10  # every representative accounted for

    for name in (t.INSTRUCTIONS, t.SCORES, t.RESPONSES):
        df = read(name)
        assert df.count() == df.select("passage_id", "fingerprint").distinct().count()  # one row per key
        assert {r["status"] for r in df.select("status").distinct().collect()} <= STATUSES
        assert df.where("status <> 'ok' AND error IS NULL").count() == 0  # every failure says why
    assert read(t.INSTRUCTIONS).count() == n_ok
    scored = read(t.SCORES).where("status = 'ok'")
    assert scored.where("score BETWEEN 1 AND 5").count() == scored.count() > 0

    # the judge went through vLLM's JSON structured outputs: every grade parsed
    assert stages["score"]["parse_failure_rate"] == 0.0
    export_dir = Path(summary["export"]["path"])
    pairs = [json.loads(line) for f in sorted(export_dir.glob("data/*.jsonl")) for line in f.open()]
    assert len(list(export_dir.glob("data/*.parquet"))) == 1 and (export_dir / "README.md").exists()
    exp = stages["export"]
    assert len(pairs) == summary["export"]["pairs"] == exp["rows_out"] > 0
    # every rewrite is exported or removed by a named policy
    removed = sum(v for k, v in exp.items() if k.startswith("removed_") and k != "removed_low_score")
    assert exp["rows_out"] + removed == exp["rows_in"] == read(t.RESPONSES).count()
    doc_keys = {r["doc_key"] for r in read(t.DOCUMENTS).collect()}
    for pair in pairs:
        roles = [m["role"] for m in pair["messages"]]
        assert roles == ["user", "assistant"]
        assert all(m["content"].strip() for m in pair["messages"])
        assert pair["doc_key"] in doc_keys

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["chunk.max_tokens"] == "512"
    assert run.data.metrics["ingest.rows_in"] == n_lines
    assert run.data.metrics["export.rows_out"] == len(pairs)
    assert run.data.params["template_hash.score"] and run.data.params["model"].endswith(
        "SmolLM2-135M-Instruct"
    )
    assert run.data.metrics["backtranslate.tokens_out"] > 0
    assert [a.path for a in client.list_artifacts(run.info.run_id, "export/pairs")] == [
        "export/pairs/README.md"
    ]
    artifacts = {
        a.path for d in ("samples", "plots", "prompts") for a in client.list_artifacts(run.info.run_id, d)
    }
    assert {"samples/pairs.json", "plots/scores.png", "plots/response_words.png"} <= artifacts
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {r.info.run_name for r in children} == set(stages)  # a nested run per stage

    # A scheduled refresh after a new file lands: only the new document flows through the stages;
    # nothing done before is generated again (max_attempts=1: failed rows are not retried either).
    ok_before = {name: _ok_rows(read(name)) for name in (t.INSTRUCTIONS, t.SCORES, t.RESPONSES)}
    (tmp_path / "in" / "new.jsonl").write_text(json.dumps(NEW_DOC) + "\n")
    again, _ = _run(
        tmp_path / "work", tmp_path / "in", tmp_path / "summary2.json", "--set", "llm.max_attempts=1",
        command="refresh",
    )  # fmt: skip
    assert again["error"] is None
    assert again["stages"]["ingest"]["documents"] == 1
    assert again["stages"]["ingest"]["repeated_ids"] == ing["documents"] + ing["repeated_ids"]
    new_passages = passages_of(read(t.PASSAGES), "web/new-1")
    assert again["stages"]["backtranslate"]["generated"] == new_passages > 0
    assert again["stages"]["score"]["generated"] <= new_passages
    for name, rows in ok_before.items():
        assert set(rows) <= set(_ok_rows(read(name))), name  # the old successes are untouched
    # ... and a refresh with nothing new does no LLM work and says so
    third, stdout = _run(
        tmp_path / "work", tmp_path / "in", tmp_path / "summary3.json", "--set", "llm.max_attempts=1",
        command="refresh",
    )  # fmt: skip
    assert "no LLM work" in stdout
    for stage in ("backtranslate", "score", "rewrite"):
        assert third["stages"][stage]["generated"] == 0, stage
    assert third["export"]["pairs"] == again["export"]["pairs"]


NEW_DOC = {
    "id": "new-1",
    "source": "web",
    "added": "2024-06-01",
    "text": (
        "Sourdough starter needs regular feeding to stay active. Keep it in a glass jar at room "
        "temperature and feed it once a day with equal weights of flour and water. Discard about half "
        "of the starter before each feeding so the jar does not overflow and the acidity stays in "
        "balance. A healthy starter doubles in size within six to eight hours of a feeding and smells "
        "pleasantly sour. If you bake only once a week, store the starter in the refrigerator and feed "
        "it the day before you plan to mix your dough."
    ),
}


def passages_of(df, doc_key):
    return df.where(f"doc_key = '{doc_key}' AND status = 'ok'").count()


def _ok_rows(df):
    return sorted(
        tuple(r) for r in df.where("status = 'ok'").select("passage_id", "run_id", "raw_output").collect()
    )
