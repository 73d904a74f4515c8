"""LLM stages with engine doubles: failure injection only. The real engine runs in test_e2e.py."""

import logging
import re
import sys
from dataclasses import replace

import pandas as pd
import pytest
from pyspark import cloudpickle
from pyspark.sql import functions as F

from backforth_spark.core import generation
from backforth_spark.core import schemas as t
from backforth_spark.core.config import load_config
from backforth_spark.core.engines.engine import Completion
from backforth_spark.core.generation import LLM_TASKS
from backforth_spark.spark.stages import generate
from backforth_spark.spark.tables import struct
from tests.conftest import LOCAL_CONF, exported_rows

TASKS = {task.name: task for task in LLM_TASKS}
INSTRUCTIONS = TASKS["backtranslate"].table


def run_stage(ctx, stage, engine):
    """Run LLM stage `stage` with `engine` (a zero-argument factory) in place of the configured one."""
    return generate.run(replace(ctx, engine_factory=engine), TASKS[stage])


# The doubles below are shipped to Spark's Python workers by value (the workers cannot import tests/).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ScriptedEngine:
    """Answers every conversation with `reply`; raises for prompts containing `fail_on`."""

    model = "double"

    def __init__(self, reply="How do I cook pasta?", fail_on=None, max_model_len=2048):
        self.reply, self.fail_on, self.max_model_len = reply, fail_on, max_model_len
        self.calls = []

    def count_prompt_tokens(self, conversations):
        return [len(c[-1]["content"].split()) for c in conversations]

    def chat(self, conversations, params):
        self.calls.append(len(conversations))
        if self.fail_on and any(self.fail_on in c[-1]["content"] for c in conversations):
            raise RuntimeError("engine fell over")
        return [Completion(self.reply, "stop", 10, 5) for _ in conversations]

    def complete(self, prompts, params):
        self.raw_prompts = list(prompts)
        return [Completion(self.reply, "stop", 10, 5) for _ in prompts]

    def close(self):
        self.closed = True


def _spec(stage):
    return generation.fingerprints(load_config(LOCAL_CONF), "double")[stage]


def _batch(*passages):
    return pd.DataFrame({"passage_id": [f"p{i}" for i in range(len(passages))], "passage": list(passages)})


def test_one_bad_prompt_fails_alone_and_the_rest_are_parsed():
    engine = ScriptedEngine(fail_on="BOOM")
    out = generation.run_batch(_batch("fine text", "BOOM text", "more text"), engine, _spec("backtranslate"))
    assert list(out["status"]) == ["ok", "engine_error", "ok"]
    assert "engine fell over" in out.loc[1, "error"]
    assert list(out["instruction"])[0] == "How do I cook pasta?"
    assert engine.calls == [3, 1, 1, 1]  # one batch call, then one by one to isolate the failure


def test_garbage_output_is_a_parse_error_with_the_raw_text_kept():
    batch = _batch("text").assign(instruction="Q?")
    out = generation.run_batch(batch, ScriptedEngine(reply="zzz no grade"), _spec("score"))
    row = out.iloc[0]
    assert (row["status"], row["raw_output"], row["instruction"]) == ("parse_error", "zzz no grade", "Q?")
    assert pd.isna(row["score"])


def test_a_prompt_too_long_for_the_context_is_never_sent():
    engine = ScriptedEngine(max_model_len=200)
    spec = _spec("backtranslate")  # reserves 96 output tokens; the template is ~75 words
    long_passage = "word " * 200
    out = generation.run_batch(_batch("short", long_passage), engine, spec)
    assert list(out["status"]) == ["ok", "too_long"]
    assert engine.calls == [1]
    assert "at most" in out.loc[1, "error"]


def test_fingerprint_changes_with_template_model_and_upstream():
    cfg = load_config(LOCAL_CONF)
    base = generation.fingerprints(cfg, "m")
    other_model = generation.fingerprints(cfg, "m2")
    assert base["backtranslate"].fingerprint != other_model["backtranslate"].fingerprint
    cfg2 = load_config(LOCAL_CONF, ["llm.score.sampling.max_tokens=100"])
    changed = generation.fingerprints(cfg2, "m")
    assert changed["backtranslate"].fingerprint == base["backtranslate"].fingerprint
    assert changed["score"].fingerprint != base["score"].fingerprint
    # the change flows downstream: rewrite depends on the score stage
    assert changed["rewrite"].fingerprint != base["rewrite"].fingerprint


def _add_passages(ctx, texts):
    rows = [(f"p{i}", f"cc/{i}", 0, text, 5, "ok", False, None) for i, text in enumerate(texts)]
    df = ctx.spark.createDataFrame(rows, struct(t.PASSAGES_COLUMNS))
    df = df.select("*", F.lit(ctx.run_id).alias("run_id"), F.current_timestamp().alias("written_at"))
    ctx.tables.merge_insert_new(t.PASSAGES, df, ["passage_id"])


def test_rerun_retries_only_failed_rows_and_never_duplicates(make_ctx):
    ctx = make_ctx("llm.max_attempts=2", "llm.num_partitions=2")
    _add_passages(ctx, ["good one", "BOOM one", "good two", "BOOM two"])

    first = run_stage(ctx, "backtranslate", lambda: ScriptedEngine(fail_on="BOOM"))
    assert (first["generated"], first["status_ok"], first["status_engine_error"]) == (4, 2, 2)

    second = run_stage(ctx, "backtranslate", lambda: ScriptedEngine(fail_on="BOOM two"))
    assert second["generated"] == 2  # only the failed rows went back to the engine
    rows = {r["passage_id"]: r for r in ctx.tables.read(INSTRUCTIONS).collect()}
    assert len(rows) == 4
    assert (rows["p1"]["status"], rows["p1"]["attempts"]) == ("ok", 2)
    assert (rows["p3"]["status"], rows["p3"]["attempts"]) == ("engine_error", 2)
    assert rows["p0"]["attempts"] == 1

    # p3 has used its max_attempts: a third run has nothing left to do
    third = run_stage(ctx, "backtranslate", lambda: ScriptedEngine())
    assert third["generated"] == 0
    assert ctx.tables.read(INSTRUCTIONS).count() == 4

    from backforth_spark.app.status import format_status, status

    report = status(ctx)
    bt = report["llm_stages"]["backtranslate"]
    assert (bt["done"], bt["pending"], bt["failed"], bt["out_of_attempts"]) == (3, 0, {"engine_error": 1}, 1)
    assert report["llm_stages"]["score"]["pending"] == 3  # the three instructions wait for their judge
    assert report["tables"][INSTRUCTIONS]["rows"] == 4 and report["last_run"]["run_id"] == ctx.run_id
    # grounding and the distillation baseline are off in this config: they owe nothing, and say so
    off = {name: info["pending"] for name, info in report["llm_stages"].items() if not info["enabled"]}
    assert off == {"ground": 0, "distill": 0}
    table = {line.split()[0]: line.split()[1:3] for line in format_status(report).splitlines() if line}
    assert table["backtranslate"] == ["3", "0"] and table["ground"] == ["0", "off"]
    assert "judged by the config given" in format_status(report)

    from backforth_spark.app.pipeline import plan
    from backforth_spark.spark.stages import select

    dry = plan(ctx.cfg, [], select("backtranslate,score", ctx.cfg))
    assert dry["would_generate"] == {"backtranslate": 0, "score": 3} and dry["input_files"] is None


def test_a_stage_cut_into_slices_logs_its_progress_and_counts_tokens(make_ctx, caplog):
    ctx = make_ctx("llm.commit_rows=2")
    _add_passages(ctx, ["one", "two", "three", "four", "five"])
    with caplog.at_level(logging.INFO, logger="backforth_spark.spark.stages.generate"):
        counts = run_stage(ctx, "backtranslate", lambda: ScriptedEngine())
    assert counts["commits"] == 3 and counts["generated"] == 5
    progress = [r.getMessage() for r in caplog.records if "rows committed" in r.getMessage()]
    assert len(progress) == 3 and progress[-1].startswith("backtranslate: 5/5 rows committed")
    assert "output tokens/s" in progress[0]
    # the double reports 10 prompt and 5 completion tokens per row
    assert (counts["tokens_in"], counts["tokens_out"], counts["failure_rate"]) == (50, 25, 0.0)
    # the tasks' own wall time is summed; local mode gives tasks no GPU, so no accelerator time
    assert counts["engine_task_s"] > 0 and (counts["accelerator_s"], counts["tokens_per_accelerator_s"]) == (
        0,
        0,
    )
    # the double is built afresh by each slice's one task (llm.num_partitions=1): three engine loads
    assert counts["engine_loads"] == 3


def test_commit_slices_are_key_ranges_each_read_from_its_own_folder_and_merged_within_it(make_ctx):
    ctx = make_ctx("llm.commit_rows=2")
    _add_passages(ctx, [f"passage number {i}" for i in range(7)])
    assert run_stage(ctx, "backtranslate", lambda: ScriptedEngine())["commits"] == 4
    laid = ctx.spark.read.format("delta").load(ctx.tables.staging_path("backtranslate_slices"))
    by_slice = laid.groupBy("_slice").agg(F.min("passage_id"), F.max("passage_id"), F.count("*"))
    ranges = sorted((r[0], r[1], r[2], r[3]) for r in by_slice.collect())
    assert [r[0] for r in ranges] == [0, 1, 2, 3] and sum(r[3] for r in ranges) == 7
    for before, after in zip(ranges, ranges[1:], strict=False):  # contiguous key ranges, one a slice
        assert before[2] < after[1]
    for k, *_ in ranges:  # a slice's rows are in its own folder, and its filter reads that one only
        files = laid.where(F.col("_slice") == k).inputFiles()
        assert files and all(f"/_slice={k}/" in f for f in files), files
    # the first slice created the table; each later slice's MERGE was confined to its own key range
    history = ctx.spark.sql(f"DESCRIBE HISTORY {ctx.tables.sql_name(INSTRUCTIONS)}")
    merges = [r["operationParameters"]["predicate"] for r in history.where("operation = 'MERGE'").collect()]
    confined = {tuple(re.search(r">= (\w+)\) AND .*<= (\w+)\)", m).groups()) for m in merges}
    assert confined == {(lo, hi) for _, lo, hi, _ in ranges[1:]}
    rows = ctx.tables.read(INSTRUCTIONS)
    assert rows.count() == rows.select("passage_id").distinct().count() == 7


def test_score_stage_reads_only_ok_instructions_of_the_current_fingerprint(make_ctx):
    ctx = make_ctx()
    _add_passages(ctx, ["alpha text", "beta text"])
    run_stage(ctx, "backtranslate", lambda: ScriptedEngine(fail_on="beta"))
    counts = run_stage(ctx, "score", lambda: ScriptedEngine(reply="Reason: ok\nScore: 4"))
    assert (counts["rows_in"], counts["generated"], counts["score_4"]) == (1, 1, 1)


def test_rewrite_takes_only_pairs_at_or_above_the_threshold(make_ctx):
    ctx = make_ctx("curate.min_score=5")
    _add_passages(ctx, ["alpha text"])
    run_stage(ctx, "backtranslate", lambda: ScriptedEngine())
    run_stage(ctx, "score", lambda: ScriptedEngine(reply="Reason: ok\nScore: 4"))
    rewrite = lambda: ScriptedEngine(reply="[RES] An answer. [/RES]")  # noqa: E731
    assert run_stage(ctx, "rewrite", rewrite)["rows_out"] == 0  # the pair scored 4 is below 5
    at_four = make_ctx("curate.min_score=4")  # the same tables, the threshold lowered
    assert run_stage(at_four, "rewrite", rewrite)["rows_out"] == 1


class ByContent(ScriptedEngine):
    """Replies with the first reply whose key appears in the prompt (else the default)."""

    def __init__(self, replies, default="Reason: fine\nScore: 5"):
        super().__init__(reply=default)
        self.replies = replies

    def chat(self, conversations, params):
        out = []
        for c in conversations:
            text = c[-1]["content"]
            out.append(next((r for k, r in self.replies.items() if k in text), self.reply))
        return [Completion(r, "stop", 10, 5) for r in out]


def _exported(dataset_dir):
    return exported_rows(dataset_dir)


def test_curation_policies_and_distillation_baseline_count_what_they_remove(make_ctx):
    from backforth_spark.spark.stages import export
    from tests.conftest import add_documents

    ctx = make_ctx("curate.min_score=4", "curate.grounding=true", "curate.distillation_baseline=true")
    texts = {
        "good": "Boil salted water, add the pasta, stir, and cook it until it is tender.",
        "short": "A passage whose rewrite comes out far too short to be useful.",
        "echo": "A passage whose rewrite only repeats the question that was asked.",
        "loose": "A passage whose rewrite adds facts that the source never states.",
        "weak": "A passage the judge does not like at all.",
    }
    _add_passages(ctx, list(texts.values()))
    add_documents(ctx, [(f"cc/{i}", text) for i, text in enumerate(texts.values())])
    question = "How do I cook pasta properly at home?"
    run_stage(ctx, "backtranslate", lambda: ScriptedEngine(reply=question))
    judge = {"at all": "Reason: off-topic\nScore: 2"}
    assert run_stage(ctx, "score", lambda: ByContent(judge))["rows_out"] == 5
    rewrites = {
        "far too short": "[RES] Too short. [/RES]",
        "only repeats": "[RES] How do I cook pasta properly at home? [/RES]",
        "never states": "[RES] Pasta was invented in 1492 by a sailor who cooked it at sea daily. [/RES]",
    }
    default = "[RES] Bring salted water to a boil, add the pasta, stir it, and cook until tender. [/RES]"
    rw = run_stage(ctx, "rewrite", lambda: ByContent(rewrites, default=default))
    assert rw["rows_in"] == 4  # the score-2 pair was not rewritten
    grounding = {"invented in 1492": "Reason: adds a date\nScore: 1"}  # the stand-in's two-line form
    run_stage(ctx, "ground", lambda: ByContent(grounding, "Reason: ok\nScore: 5"))
    distilled = run_stage(ctx, "distill", lambda: ScriptedEngine(reply="Use a big pot."))
    assert distilled["rows_out"] == 4

    counts = export.run(ctx)
    assert counts["removed_low_score"] == 1
    assert counts["removed_short_response"] == 1
    assert counts["removed_repeats_instruction"] == 1
    assert counts["removed_ungrounded"] == 1
    assert counts["rows_out"] == 1 and counts["rows_in"] == 4
    assert counts["keep_rate"] == round(1 / 5, 4)  # of the five judged pairs, one is exported
    [pair] = _exported(counts["path"])
    assert pair["messages"][1]["content"].startswith("Bring salted water")
    baseline = _exported(counts["baseline_path"])
    assert counts["baseline_pairs"] == len(baseline) == 4
    assert {b["messages"][1]["content"] for b in baseline} == {"Use a big pot."}


def test_distill_prompt_is_the_instruction_alone():
    spec = _spec("distill")
    assert spec.template.render(instruction="Why is the sky blue?") == [
        {"role": "user", "content": "Why is the sky blue?"}
    ]


class Recording(ScriptedEngine):
    """Answers with a reply built from the prompt by `answer`, and keeps the parameters of each request."""

    def __init__(self, answer, finish="stop", max_model_len=2048):
        super().__init__(max_model_len=max_model_len)
        self.answer, self.finish, self.params = answer, finish, []

    def chat(self, conversations, params):
        each = [params] * len(conversations) if not isinstance(params, list) else params
        self.params.extend(each)
        return [Completion(self.answer(c[-1]["content"]), self.finish, 10, 5) for c in conversations]


def test_a_rewrite_budget_follows_its_passage_under_the_cap():
    cfg = load_config(None)  # the schema defaults: what a real model runs with
    spec = generation.fingerprints(cfg, "double")["rewrite"]
    engine = Recording(lambda prompt: "[RES] An answer. [/RES]")
    batch = _batch("short passage", "a longer passage").assign(
        instruction="Q?", score=5, passage_tokens=[100, 1000]
    )
    generation.run_batch(batch, engine, spec)
    # 1.5 tokens per passage token + 64, at most sampling.max_tokens (2048)
    assert [p.max_tokens for p in engine.params] == [214, 1564]
    assert all(p.regex is None for p in engine.params)  # a real model decodes freely


def test_an_output_that_hits_its_budget_is_truncated_not_ok():
    spec = _spec("distill")  # the whole output is the answer
    engine = Recording(lambda prompt: "A long answer that was still going", finish="length")
    out = generation.run_batch(pd.DataFrame({"passage_id": ["p0"], "instruction": ["Q?"]}), engine, spec)
    assert (out.loc[0, "status"], out.loc[0, "response"]) == ("truncated", None)
    assert "budget" in out.loc[0, "error"]


def test_a_verbatim_rewrite_of_a_full_size_passage_full_of_brackets_and_code_comes_back_whole():
    """conf/databricks.yaml's sizes (1,024-token passages, a 4,096-token context), the embedded model's
    tokenizer standing in for Llama's."""
    from backforth_spark.core.curate import response_issue
    from backforth_spark.core.model import resolve_model
    from tests.conftest import REPO
    from udfs.chunking import tokenizer_for

    cfg = load_config(REPO / "conf" / "databricks.yaml", ["llm.model=embedded"])
    generation.check_config(cfg)
    model = resolve_model(cfg.llm)
    tokenizer = tokenizer_for(model)
    words = [
        "kettle",
        "river",
        "ledger",
        "violin",
        "harbor",
        "meadow",
        "lantern",
        "cipher",
        "orbit",
        "quartz",
    ]

    def unit(i: int) -> str:
        w = words[i % 10] + words[(i * 7 + 3) % 10]
        return (
            f"Step {i}: see [the {w} notes](#part-{i}) and cite [{i}]. In Python: `{w} = f(a[{i}], "
            f'{{"k{i}": [{i}, {i + 1}]}})`; in maths: [{i}, {w}) and {{x | x > {i}}}. He said "don\'t" '
            f"-- '{w}' [RES] and [/RES] tags in text.\n"
        )

    passage, i = unit(0), 1
    while tokenizer.count(passage + unit(i)) <= cfg.chunk.max_tokens:
        passage, i = passage + unit(i), i + 1
    n = tokenizer.count(passage)
    assert cfg.chunk.max_tokens - 100 < n <= cfg.chunk.max_tokens  # a passage of full size
    spec = generation.fingerprints(cfg, model)["rewrite"]
    engine = Recording(lambda prompt: "[RES]\n" + passage + "\n[/RES]", max_model_len=cfg.llm.max_model_len)
    engine.count_prompt_tokens = lambda convs: [
        len(tokenizer.backend.encode(c[-1]["content"]).ids) + 32 for c in convs
    ]
    batch = pd.DataFrame(
        {"passage_id": ["p"], "passage": [passage], "passage_tokens": [n], "instruction": ["Explain this."],
         "score": [5]}
    )  # fmt: skip
    out = generation.run_batch(batch, engine, spec)
    [params] = engine.params
    assert tokenizer.count("[RES]\n" + passage + "\n[/RES]") <= params.max_tokens  # the copy fits its budget
    assert params.regex is None  # no pattern forbids a character the copy needs
    assert out.loc[0, "status"] == "ok" and out.loc[0, "response"] == passage.strip()
    assert response_issue("Explain this.", out.loc[0, "response"], cfg.curate, passage) is None


def test_a_failure_at_temperature_0_is_not_paid_for_again(make_ctx):
    ctx = make_ctx("llm.max_attempts=3")
    _add_passages(ctx, ["alpha text", "beta text"])
    run_stage(ctx, "backtranslate", lambda: ScriptedEngine())
    garbage = lambda: ScriptedEngine(reply="no grade at all")  # noqa: E731
    first = run_stage(ctx, "score", garbage)  # the judge runs at temperature 0 in conf/local.yaml
    assert (first["generated"], first["status_parse_error"]) == (2, 2)
    again = run_stage(ctx, "score", lambda: ScriptedEngine(reply='{"reason": "ok", "score": 4}'))
    assert again["generated"] == 0  # the same prompt and sampling would give the same text


def test_a_failure_at_temperature_above_0_is_sampled_again_and_reported(make_ctx):
    ctx = make_ctx("llm.max_attempts=3")  # backtranslation samples at temperature 1.0 in conf/local.yaml
    _add_passages(ctx, ["alpha text", "beta text"])
    first = run_stage(ctx, "backtranslate", lambda: ScriptedEngine(reply="   "))
    assert first["status_empty"] == 2
    again = run_stage(ctx, "backtranslate", lambda: ScriptedEngine())
    assert (again["generated"], again["retried_empty"], again["rows_out"]) == (2, 2, 2)


def test_penalties_and_stops_reach_the_request_and_the_fingerprint():
    from backforth_spark.core.config import OpenAIConfig
    from backforth_spark.core.engines.openai_engine import OpenAIEngine

    base = generation.fingerprints(load_config(None), "m")["rewrite"]
    tuned = generation.fingerprints(
        load_config(
            None, ["llm.rewrite.sampling.repetition_penalty=1.2", "llm.rewrite.sampling.stop=['###']"]
        ),
        "m",
    )["rewrite"]
    assert tuned.fingerprint != base.fingerprint
    assert "repetition_penalty" not in base.params.as_json()  # defaults leave old fingerprints as they were
    body = OpenAIEngine(OpenAIConfig(), "m", 2048).request_body(
        [{"role": "user", "content": "x"}], tuned.params
    )
    assert (body["repetition_penalty"], body["stop"]) == (1.2, ["###"])


# ---- a model per stage, completion templates, engines held one at a time ------------------------------


def test_a_completion_template_sends_its_raw_prompt_through_complete():
    cfg = load_config(LOCAL_CONF, ["llm.backtranslate.template=backtranslate_backward_v1"])
    spec = generation.fingerprints(cfg, "double")["backtranslate"]
    engine = ScriptedEngine(reply="How do I boil pasta?")  # the stop string ends it there
    engine.count_prompt_tokens = lambda prompts: [len(p.split()) for p in prompts]
    out = generation.run_batch(_batch("Boil water, add pasta."), engine, spec)
    assert engine.calls == []  # never through the chat template
    assert engine.raw_prompts == [
        "Below is an answer written by an assistant. Write the request it answers.\n\n"
        "### Answer:\nBoil water, add pasta.\n\n### Request:"
    ]
    assert (out.loc[0, "status"], out.loc[0, "instruction"]) == ("ok", "How do I boil pasta?")


def test_each_stage_runs_its_own_model_and_the_fingerprints_follow():
    cfg = load_config(
        LOCAL_CONF, ["llm.backtranslate.model=/models/backward", "llm.rewrite.model=/models/big"]
    )
    specs = generation.fingerprints(cfg)
    assert specs["backtranslate"].model == "/models/backward" and specs["rewrite"].model == "/models/big"
    assert specs["score"].model == specs["ground"].model == specs["distill"].model
    assert specs["score"].model.endswith("SmolLM2-135M-Instruct")
    same = generation.fingerprints(load_config(LOCAL_CONF, ["llm.rewrite.model=/models/big"]))
    # a new backtranslation model regenerates its stage and every stage chained after it
    assert all(specs[name].fingerprint != same[name].fingerprint for name in specs)


class Closable:
    built: list = []

    def __init__(self, cfg, model, api_key=None, hub=None):
        self.model, self.closed = model, False
        Closable.built.append(self)

    def close(self):
        self.closed = True


def test_a_worker_holds_one_engine_and_releases_it_for_another_model(monkeypatch):
    from udfs import generation as worker

    monkeypatch.setattr(worker, "create_engine", Closable)
    monkeypatch.setattr(worker, "_HELD", {})
    Closable.built = []
    llm = load_config(LOCAL_CONF, ["llm.backtranslate.model=/models/backward"]).llm
    loads = []

    def held(stage_llm, model):
        return worker.held_engine(stage_llm, model, None, on_load=lambda: loads.append(model))

    back = held(llm.for_stage("backtranslate"), "/models/backward")
    again = held(llm.for_stage("backtranslate"), "/models/backward")
    score = held(llm.for_stage("score"), "/models/default")
    rewrite = held(llm.for_stage("rewrite"), "/models/default")
    assert again is back and rewrite is score  # same model and engine settings: the held engine
    assert back.closed and not score.closed and len(Closable.built) == 2
    assert loads == ["/models/backward", "/models/default"]  # a load is reported only when one is built
    # other engine settings for the same model: another engine, the held one released first
    wide = llm.for_stage("score").model_copy(update={"max_model_len": 4096})
    assert worker.held_engine(wide, "/models/default", None) is not score and score.closed
    worker.release_engine()
    assert all(e.closed for e in Closable.built) and worker._HELD == {}


def test_a_fatal_engine_error_stops_the_batch_and_marks_no_row():
    from backforth_spark.core.engines.engine import FatalEngineError

    class Refusing(ScriptedEngine):
        def chat(self, conversations, params):
            raise FatalEngineError("HTTP 401 from /chat/completions: bad key")

    with pytest.raises(FatalEngineError, match="401"):
        generation.run_batch(_batch("a text", "another"), Refusing(), _spec("backtranslate"))


class DiesOnSecondCall(ScriptedEngine):
    """Answers its first call, then is dead: every later call raises (a crashed engine process)."""

    def chat(self, conversations, params):
        self.calls.append(len(conversations))
        if len(self.calls) > 1:
            raise RuntimeError("EngineDeadError: the engine core process died")
        return [Completion(self.reply, "stop", 10, 5) for _ in conversations]


def test_an_engine_dying_mid_stage_costs_its_batch_and_the_rest_commits(make_ctx):
    ctx = make_ctx("llm.num_partitions=1", "llm.batch_size=2", "llm.max_attempts=2")
    _add_passages(ctx, [f"text {i}" for i in range(6)])
    first = run_stage(ctx, "backtranslate", DiesOnSecondCall)
    # batch 1 answered; batch 2 hit the dead engine (engine_error, each row tried alone too); batch 3
    # went to a new engine
    assert (first["generated"], first["status_ok"], first["status_engine_error"]) == (6, 4, 2)
    second = run_stage(ctx, "backtranslate", ScriptedEngine)
    assert (second["generated"], second["status_ok"]) == (2, 6)
    assert ctx.tables.read(INSTRUCTIONS).count() == 6


def test_a_task_reports_its_seconds_and_engine_loads_on_its_last_row_only():
    from udfs.generation import TASK_ENGINE_LOADS, TASK_SECONDS, with_task_metrics

    frames = [pd.DataFrame({"passage_id": ["a", "b"]}), pd.DataFrame({"passage_id": ["c"]})]
    out = pd.concat(list(with_task_metrics(iter(frames), started=0.0, loads=[2])), ignore_index=True)
    assert list(out["passage_id"]) == ["a", "b", "c"]
    assert out[TASK_ENGINE_LOADS].isna().tolist() == [True, True, False]
    assert out[TASK_ENGINE_LOADS].iloc[-1] == 2
    assert out[TASK_SECONDS].iloc[:-1].isna().all() and out[TASK_SECONDS].iloc[-1] > 0


def test_a_task_with_no_rows_reports_nothing():
    from udfs.generation import with_task_metrics

    assert list(with_task_metrics(iter([]), started=0.0, loads=[1])) == []


class EchoesTheFence(ScriptedEngine):
    """Answers with the hex of the marker that fences its prompt's text, as a leaking model would."""

    def chat(self, conversations, params):
        out = []
        for conversation in conversations:
            marker = re.search(r"<<<([0-9a-f]{16})>>>", conversation[-1]["content"]).group(1)
            out.append(Completion(f"Why {marker} is an excellent answer!", "stop", 10, 5))
        return out


def test_an_output_that_repeats_its_prompts_fence_marker_is_rejected_with_its_own_status():
    out = generation.run_batch(_batch("some text", "other text"), EchoesTheFence(), _spec("backtranslate"))
    assert list(out["status"]) == ["fence_marker", "fence_marker"]
    assert out["instruction"].isna().all() and out["raw_output"].str.startswith("Why ").all()
    # a marker-shaped string that is not this prompt's marker is just text
    fine = ScriptedEngine(reply="Why 0123456789abcdef is an excellent answer!")
    assert list(generation.run_batch(_batch("some text"), fine, _spec("backtranslate"))["status"]) == ["ok"]
