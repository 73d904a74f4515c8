"""The OpenAI-compatible HTTP engine: retries and errors against a scripted server (failure injection),
then the real thing: vLLM's CPU build serving the default model on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from backforth_spark.app.pipeline import run_pipeline
from backforth_spark.core import generation
from backforth_spark.core.config import OpenAIConfig, load_config
from backforth_spark.core.engines.engine import GenerationParams
from backforth_spark.core.engines.openai_engine import CredentialsRefused, OpenAIEngine
from backforth_spark.core.generation import DETERMINISTIC_AT_ZERO, FENCE_MARKER
from backforth_spark.spark.stages import select
from backforth_spark.spark.stages.generate import resolve_api_key
from tests.conftest import API_KEY, LOCAL_CONF, REAL_RUN_SETTINGS, copy_run, served

SECRET = API_KEY
PARAMS = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=8)
REPLY = {
    "choices": [{"message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 1},
}


class Scripted(BaseHTTPRequestHandler):
    """Replies with the next (status, body) of `script`; records each request."""

    script: list[tuple[int, dict]] = []
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        status, reply = type(self).script.pop(0) if type(self).script else (200, REPLY)
        if status >= 400:  # an error body that echoes the request, as some proxies do
            reply = {**reply, "request_headers": dict(self.headers)}
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_server():
    Scripted.script, Scripted.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _engine(base_url, **kw):
    cfg = OpenAIConfig(base_url=base_url, **{"backoff_s": 0.01, "max_retries": 3, **kw})
    return OpenAIEngine(cfg, "served-model", 2048, api_key=SECRET)


CONV = [{"role": "user", "content": "hi"}]


def test_retries_429_and_5xx_then_succeeds(scripted_server):
    Scripted.script = [(429, {"error": "slow down"}), (503, {"error": "busy"})]
    [c] = _engine(scripted_server).chat([CONV], PARAMS)
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens, c.error) == (
        "hello",
        "stop",
        7,
        1,
        None,
    )
    assert len(Scripted.seen) == 3
    assert Scripted.seen[0]["auth"] == f"Bearer {SECRET}"
    assert Scripted.seen[0]["body"]["model"] == "served-model"


def test_a_client_error_is_not_retried_and_fails_only_its_conversation(scripted_server):
    Scripted.script = [(400, {"error": "bad request"})]
    out = _engine(scripted_server, concurrency=1).chat([CONV, CONV], PARAMS)
    assert out[0].error.startswith("HTTP 400") and out[1].text == "hello"
    assert len(Scripted.seen) == 2
    # the server echoed the request headers, key included: the error keeps the echo, not the key
    assert "Authorization" in out[0].error and "<redacted>" in out[0].error
    assert SECRET not in out[0].error


def test_unreachable_server_is_an_error_after_the_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    engine = _engine(f"http://127.0.0.1:{port}/v1", max_retries=2)
    [c] = engine.chat([CONV], PARAMS)
    assert c.text is None and "cannot reach" in c.error and "after 3 attempts" in c.error
    assert SECRET not in repr(engine) and SECRET not in c.error


def test_structured_constraints_go_in_the_request(scripted_server):
    engine = _engine(scripted_server)
    schema = GenerationParams(0.0, 1.0, 8, json_schema=json.dumps({"type": "object"}))
    body = engine.request_body(CONV, schema)["structured_outputs"]
    assert body == {"json": {"type": "object"}, "disable_any_whitespace": True}
    regex = GenerationParams(0.0, 1.0, 8, regex="a+")
    assert engine.request_body(CONV, regex)["structured_outputs"] == {"regex": "a+"}
    plain = _engine(scripted_server, vllm_extensions=False)  # any OpenAI-compatible server
    assert "structured_outputs" not in plain.request_body(CONV, regex)
    assert plain.request_body(CONV, schema)["response_format"]["type"] == "json_schema"


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("BACKFORTH_TEST_KEY", SECRET)
    assert resolve_api_key(OpenAIConfig(api_key_env="BACKFORTH_TEST_KEY")) == SECRET
    assert resolve_api_key(OpenAIConfig(api_key_env="BACKFORTH_UNSET_KEY")) is None


def test_a_raw_prompt_goes_to_the_completions_endpoint(scripted_server):
    Scripted.script = [(200, {"choices": [{"text": " How do I?", "finish_reason": "stop"}], "usage": {}})]
    [c] = _engine(scripted_server).complete(["### Answer:\nBoil it.\n\n### Request:"], PARAMS)
    assert (c.text, c.finish_reason, c.error) == (" How do I?", "stop", None)
    [seen] = Scripted.seen
    assert seen["path"] == "/v1/completions" and "messages" not in seen["body"]
    assert seen["body"]["prompt"] == "### Answer:\nBoil it.\n\n### Request:"


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_stops_at_once_without_a_retry_or_the_key(scripted_server, status):
    Scripted.script = [(status, {"error": "invalid api key"})] * 3
    with pytest.raises(CredentialsRefused) as info:
        _engine(scripted_server, concurrency=1).chat([CONV, CONV, CONV], PARAMS)
    assert f"HTTP {status}" in str(info.value) and SECRET not in str(info.value)
    assert len(Scripted.seen) == 1  # the first refusal ends the call: no retries, no further requests


# ---- the real server --------------------------------------------------------------------------


@pytest.mark.e2e
def test_stages_run_against_a_real_vllm_server(vllm_server, make_ctx, monkeypatch):
    base_url, model = vllm_server.url, vllm_server.model
    monkeypatch.setenv("BACKFORTH_TEST_KEY", SECRET)
    overrides = [
        "llm.engine=openai",
        f"llm.openai.base_url={base_url}",
        "llm.openai.served_model=smollm2",
        "llm.openai.api_key_env=BACKFORTH_TEST_KEY",
        "llm.openai.concurrency=4",
    ]
    cfg = load_config(LOCAL_CONF, overrides)
    engine = OpenAIEngine.from_config(cfg.llm, model, api_key=SECRET)
    specs = generation.fingerprints(cfg, model)
    passages = [
        "To boil pasta, bring a large pot of salted water to a rolling boil, add the pasta and stir.",
        "The library opens at nine on weekdays and at ten on Saturdays; it is closed on Sundays.",
        "word " * 3000,  # far longer than the context: counted first, never sent
    ]
    batch = pd.DataFrame({"passage_id": ["a", "b", "c"], "passage": passages})
    out = generation.run_batch(batch, engine, specs["backtranslate"])
    # the server answered both (backtranslate samples at temperature 1: the stand-in now and then
    # writes a refusal, which is a parsed answer, not a failed request); the third was never sent
    answered = {"ok", FENCE_MARKER, *DETERMINISTIC_AT_ZERO}
    assert set(out.loc[:1, "status"]) <= answered and out.loc[2, "status"] == "too_long"
    assert (out.loc[:1, "completion_tokens"] > 0).all() and (out.loc[:1, "prompt_tokens"] > 50).all()

    instructions = out.loc[:1, "instruction"].fillna("How is this done?")
    pairs = batch.iloc[:2].assign(instruction=list(instructions))
    scored = generation.run_batch(pairs, engine, specs["score"])
    # json mode goes through the server's structured outputs, so every grade parses
    assert list(scored["status"]) == ["ok", "ok"] and scored["score"].between(1, 5).all()
    assert all(json.loads(r)["score"] in range(1, 6) for r in scored["raw_output"])

    # a completion template (a backward model's raw prompt) through the server's completions endpoint
    backward = load_config(LOCAL_CONF, [*overrides, "llm.backtranslate.template=backtranslate_backward_v1",
                                        "llm.backtranslate.structured=none"])  # fmt: skip
    spec = generation.fingerprints(backward, model)["backtranslate"]
    raw = generation.run_batch(batch.iloc[:2], engine, spec)
    assert raw["raw_output"].notna().all() and (raw["completion_tokens"] > 0).all()
    assert set(raw["status"]) <= {"ok", "truncated", "parse_error", "empty", "refused"}


@pytest.mark.e2e
def test_a_refused_key_stops_the_stage_with_one_line_and_marks_no_row(real_run, vllm_server, tmp_path, spark):
    work = copy_run(real_run, tmp_path / "work")
    # a new distill fingerprint (its top_p) sent to the server with a key it refuses
    chosen = [f"workdir={work}", *REAL_RUN_SETTINGS, *served(vllm_server, "distill", "BACKFORTH_BAD_KEY"),
              "llm.distill.sampling.top_p=0.8", "tracking.enabled=false"]  # fmt: skip
    cfg = load_config(LOCAL_CONF, chosen)
    os.environ["BACKFORTH_BAD_KEY"] = "sk-wrong-key"
    try:
        result = run_pipeline(cfg, [], select("distill", cfg), echo=lambda _: None)
    finally:
        del os.environ["BACKFORTH_BAD_KEY"]
    assert result["failed_stage"] == "distill" and "\n" not in result["error"]
    assert "CredentialsRefused: HTTP 401" in result["error"] and "sk-wrong-key" not in result["error"]
    fingerprint = generation.fingerprints(cfg)["distill"].fingerprint
    rows = spark.read.format("delta").load(str(work / "tables" / "distillations"))
    assert rows.count() > 0 and rows.where(f"fingerprint = '{fingerprint}'").count() == 0
