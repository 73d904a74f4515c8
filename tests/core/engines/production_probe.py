"""The production configuration's LLM stages on the real vLLM CPU engine, in a process of their own (as
a Spark Python worker builds its engine: vLLM's CPU build rebinds kernels across every loaded module,
and the test session has too many foreign ones). Prints one JSON object for
tests/core/engines/test_vllm_engine.py to assert on.

    python -m tests.core.engines.production_probe <dolma.jsonl> <n passages> <overrides...>
"""

from __future__ import annotations

import json
import sys

import pandas as pd

from backforth_spark.core import generation
from backforth_spark.core.config import load_config
from backforth_spark.core.engines import vllm_engine
from backforth_spark.core.model import resolve_model


def _passages(path: str, n: int) -> pd.DataFrame:
    """The first `n` documents of `path`, each cut to its first 80 words (a short passage keeps the free
    rewrite's budget, 1.5 tokens a passage token, small)."""
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f.read().splitlines()[:n]]
    return pd.DataFrame(
        {"passage_id": [f"p{i}" for i in range(n)], "passage": [" ".join(t.split()[:80]) for t in texts]}
    )


def _accepted(engine) -> float:
    return sum(m.value for m in engine._llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


def main(path: str, n: int, overrides: list[str]) -> dict:
    cfg = load_config(None, overrides)
    llm = cfg.llm.for_stage("score")
    model = resolve_model(llm)
    base = vllm_engine.vllm_engine_args
    # vLLM keeps its counters only with its statistics on (off by default in vllm.LLM)
    vllm_engine.vllm_engine_args = lambda *a, **k: {**base(*a, **k), "disable_log_stats": False}
    engine = vllm_engine.create_vllm_engine(llm, model)
    specs = generation.fingerprints(cfg, model)
    passages = _passages(path, n)
    passages["passage_tokens"] = engine.count_prompt_tokens(list(passages["passage"]))  # raw text: its tokens
    instructions = generation.run_batch(passages, engine, specs["backtranslate"])
    # the judge and the rewrite answer the pairs, whatever the small model's instructions came to
    pairs = passages.assign(instruction=instructions["instruction"].fillna("Explain this text.").tolist())
    scores = generation.run_batch(pairs, engine, specs["score"])
    accepted_before = _accepted(engine)
    responses = generation.run_batch(pairs.assign(score=5), engine, specs["rewrite"])
    accepted = _accepted(engine) - accepted_before
    backward = load_config(None, [*overrides, "llm.backtranslate.template=backtranslate_backward_v1"])
    completion_spec = generation.fingerprints(backward, model)["backtranslate"]
    completions = generation.run_batch(passages.drop(columns="passage_tokens"), engine, completion_spec)
    engine.close()

    def rows(df: pd.DataFrame, *columns: str) -> list[dict]:
        return json.loads(df[["status", *columns]].to_json(orient="records"))

    return {
        "engine_identities": len(
            {cfg.llm.for_stage(s).engine_identity() for s in ("backtranslate", "score", "rewrite")}
        ),
        "speculative_tokens": llm.speculative_ngram_tokens,
        "passage_tokens": passages["passage_tokens"].tolist(),
        "backtranslate": rows(instructions),
        "score": rows(scores, "score"),
        "rewrite": rows(responses, "sampling", "completion_tokens"),
        "accepted_draft_tokens": accepted,
        "completion_template": completion_spec.template.kind,
        "completion": rows(completions, "completion_tokens"),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])))
