"""The production configuration on the real vLLM CPU engine: the schema's defaults (`_v3` templates, the
judge's JSON, a free-decoded rewrite whose budget follows its passage, n-gram speculation on the one
engine the stages share), with only the model and the engine's sizes changed for this machine; and the
backward model's completion template, once. Through `generation.run_batch`, what each Spark task runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from backforth_spark.core import generation
from backforth_spark.core.config import load_config
from backforth_spark.core.model import resolve_model
from tests.conftest import DOLMA_SAMPLE

pytestmark = [
    pytest.mark.e2e,
    # vLLM's n-gram proposer and its grammar backend, on their first use: their own deprecations
    pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:max_rollback_tokens is deprecated:DeprecationWarning"),
]

# the default model and what this machine holds; everything else is the schema's
MACHINE = ("llm.model=embedded", "llm.cpu_kvcache_gib=0.25", "llm.enforce_eager=true", "llm.cpu_threads=2")
PASSAGES = 2
KNOWN = {"ok", "parse_error", "truncated", "empty", "refused", "fence_marker", "too_long"}


def _passages() -> pd.DataFrame:
    """The first PASSAGES sample documents, each cut to its first 80 words (a short passage keeps the
    free rewrite's budget, 1.5 tokens a passage token, small)."""
    path = sorted(DOLMA_SAMPLE.glob("*.jsonl"))[0]
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()[:PASSAGES]]
    return pd.DataFrame(
        {
            "passage_id": [f"p{i}" for i in range(PASSAGES)],
            "passage": [" ".join(t.split()[:80]) for t in texts],
        }
    )


@pytest.fixture(scope="module")
def production(monkeypatch_module):
    """(config, specs, engine, metrics): one engine built from the config score runs with (the stages
    share it), its statistics on so that its speculation counters can be read."""
    from backforth_spark.core.engines import vllm_engine

    cfg = load_config(None, list(MACHINE))
    llm = cfg.llm.for_stage("score")
    model = resolve_model(llm)
    args = vllm_engine.vllm_engine_args
    # vLLM keeps its counters only with its statistics on (off by default in vllm.LLM)
    monkeypatch_module.setattr(
        vllm_engine, "vllm_engine_args", lambda *a, **k: {**args(*a, **k), "disable_log_stats": False}
    )
    engine = vllm_engine.create_vllm_engine(llm, model)
    yield cfg, generation.fingerprints(cfg, model), engine
    engine.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _counter(engine, name: str) -> float:
    return sum(m.value for m in engine._llm.get_metrics() if m.name == name)


def test_the_production_stages_run_on_one_speculating_engine_within_their_budgets(production):
    cfg, specs, engine = production
    assert {cfg.llm.for_stage(s).engine_identity() for s in ("backtranslate", "score", "rewrite")} == {
        cfg.llm.for_stage("score").engine_identity()
    }
    passages = _passages()
    passages["passage_tokens"] = engine.count_prompt_tokens(
        [[{"role": "user", "content": p}] for p in passages["passage"]]
    )
    instructions = generation.run_batch(passages, engine, specs["backtranslate"])
    assert set(instructions["status"]) <= KNOWN
    # the judge and the rewrite answer the pairs, whatever the small model's instruction came to
    pairs = passages.assign(instruction=instructions["instruction"].fillna("Explain this text.").tolist())
    scores = generation.run_batch(pairs, engine, specs["score"])
    assert set(scores["status"]) <= KNOWN
    assert all(1 <= s <= 5 for s in scores.loc[scores["status"] == "ok", "score"])
    accepted_before = _counter(engine, "vllm:spec_decode_num_accepted_tokens")
    responses = generation.run_batch(pairs.assign(score=5), engine, specs["rewrite"])
    assert set(responses["status"]) <= KNOWN
    # each rewrite's budget follows its passage (1.5 tokens a token + 64, under the 2,048 cap)
    for row, tokens in zip(responses.itertuples(), passages["passage_tokens"], strict=True):
        budget = min(2048, -(-3 * tokens // 2) + 64)
        assert json.loads(row.sampling)["max_tokens"] == budget
        assert pd.isna(row.completion_tokens) or row.completion_tokens <= budget
    # the rewrite copies from its prompt: drafted tokens were accepted
    assert _counter(engine, "vllm:spec_decode_num_accepted_tokens") > accepted_before


def test_the_backward_models_completion_template_runs_on_the_real_engine(production):
    cfg, _, engine = production
    backward = load_config(None, [*MACHINE, "llm.backtranslate.template=backtranslate_backward_v1"])
    spec = generation.fingerprints(backward, engine.model)["backtranslate"]
    assert spec.template.kind == "completion"
    out = generation.run_batch(_passages(), engine, spec)  # through engine.complete: raw text, no chat
    assert set(out["status"]) <= KNOWN and (out["completion_tokens"].fillna(0) > 0).all()
