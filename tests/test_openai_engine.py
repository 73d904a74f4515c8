"""The OpenAI-compatible HTTP engine: retries and errors against a scripted server (failure injection),
then the real thing: vLLM's CPU build serving the default model on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from backforth_spark import generation
from backforth_spark.config import OpenAIConfig, load_config
from backforth_spark.engine import GenerationParams
from backforth_spark.model import resolve_model
from backforth_spark.openai_engine import OpenAIEngine
from backforth_spark.stages.generate import resolve_api_key
from tests.conftest import LOCAL_CONF

SECRET = "sk-test-do-not-log-0123456789"
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


# ---- the real server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`vllm serve` (CPU build) with the default model on 127.0.0.1, requiring an API key."""
    model = resolve_model(load_config(LOCAL_CONF).llm)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": SECRET}
    # the module, not the `vllm serve` script: that asks for the distribution "vllm", and the CPU
    # build is installed as "vllm-cpu"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager",
        "--served-model-name", "smollm2",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            proc.kill()
            pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
        yield base + "/v1", model
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.e2e
def test_stages_run_against_a_real_vllm_server(vllm_server, make_ctx, monkeypatch):
    base_url, model = vllm_server
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
    assert list(out["status"])[:2] == ["ok", "ok"] and out.loc[2, "status"] == "too_long"
    assert (out.loc[:1, "completion_tokens"] > 0).all() and (out.loc[:1, "prompt_tokens"] > 50).all()

    scored = generation.run_batch(
        batch.iloc[:2].assign(instruction=list(out.loc[:1, "instruction"])), engine, specs["score"]
    )
    # json mode goes through the server's structured outputs, so every grade parses
    assert list(scored["status"]) == ["ok", "ok"] and scored["score"].between(1, 5).all()
    assert all(json.loads(r)["score"] in range(1, 6) for r in scored["raw_output"])

    # the same through Spark: the stage resolves the key on the driver and ships it to the workers
    ctx = make_ctx(*overrides)
    from tests.test_generate import INSTRUCTIONS, _add_passages, run_stage

    _add_passages(ctx, passages[:2])
    counts = run_stage(ctx, "backtranslate", None)
    assert (counts["generated"], counts["rows_out"]) == (2, 2)
    rows = ctx.tables.read(INSTRUCTIONS).collect()
    assert {r["model"] for r in rows} == {model} and all(SECRET not in str(r.asDict()) for r in rows)
