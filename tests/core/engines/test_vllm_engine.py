"""The production configuration on the real vLLM CPU engine: the schema's defaults (`_v3` templates, the
judge's JSON, a free-decoded rewrite whose budget follows its passage, n-gram speculation on the one
engine the stages share), with only the model and the engine's sizes changed for this machine; and the
backward model's completion template, once. Through `generation.run_batch`, what each Spark task runs,
in a process of its own (tests/core/engines/production_probe.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import DOLMA_SAMPLE, REPO

pytestmark = pytest.mark.e2e

# the default model and what this machine holds; everything else is the schema's
MACHINE = ("llm.model=embedded", "llm.cpu_kvcache_gib=0.25", "llm.enforce_eager=true", "llm.cpu_threads=2")
PASSAGES = 2
KNOWN = {"ok", "parse_error", "truncated", "empty", "refused", "fence_marker", "too_long"}


@pytest.fixture(scope="module")
def probe() -> dict:
    sample = sorted(DOLMA_SAMPLE.glob("*.jsonl"))[0]
    cmd = [sys.executable, "-m", "tests.core.engines.production_probe", str(sample), str(PASSAGES), *MACHINE]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_production_stages_share_one_engine_that_speculates(probe):
    assert probe["engine_identities"] == 1 and probe["speculative_tokens"] == 4
    # the rewrite copies from its prompt: vLLM's counters show drafted tokens it accepted
    assert probe["accepted_draft_tokens"] > 0


def test_every_production_stage_gives_each_row_a_known_status(probe):
    for stage in ("backtranslate", "score", "rewrite"):
        assert len(probe[stage]) == PASSAGES and {r["status"] for r in probe[stage]} <= KNOWN, stage
    assert all(1 <= r["score"] <= 5 for r in probe["score"] if r["status"] == "ok")


def test_each_rewrite_keeps_to_a_budget_that_follows_its_passage(probe):
    for row, tokens in zip(probe["rewrite"], probe["passage_tokens"], strict=True):
        budget = min(2048, math.ceil(1.5 * tokens) + 64)  # the schema: 1.5 a passage token + 64, cap 2048
        assert json.loads(row["sampling"])["max_tokens"] == budget
        assert row["completion_tokens"] is None or row["completion_tokens"] <= budget


def test_the_backward_models_completion_template_runs_on_the_real_engine(probe):
    assert probe["completion_template"] == "completion"  # raw text through engine.complete, no chat
    rows = probe["completion"]
    assert len(rows) == PASSAGES and {r["status"] for r in rows} <= KNOWN
    assert all((r["completion_tokens"] or 0) > 0 for r in rows)
