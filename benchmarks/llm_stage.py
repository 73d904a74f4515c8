"""Throughput of the three LLM stages through Spark against vLLM's `LLM.chat` called directly.

    make bench-llm N=256        # the production prompts and decoding (Makefile: PRODUCTION_DECODING)
    make bench-llm-local N=256  # conf/local.yaml's decoding
    .venv/bin/python benchmarks/llm_stage.py --prompts 256 [--config ...] [--set ...]

N distinct passages (the Dolma sample chunked to `chunk.max_tokens`, then word-rotated copies up to N)
go through
  (a) stage:  our backtranslate, score and rewrite stages in Spark (`generate.run`, one after the
      other, as a pipeline runs them), reading from Delta and MERGEing their rows, one LLM task per
      slot (`llm.num_partitions=1` here), each stage with its own engine settings from the config
      (rewrite's n-gram speculative decoding, when set);
  (b) direct: one `vllm.LLM(...)` built with the base engine arguments (no per-stage speedups), then
      one `LLM.chat` per stage over exactly the inputs that stage saw, rendered by the same templates,
      with the same sampling and per-row output budgets.
Both sides run in one process, turn by turn: for each stage the two runs follow each other, the stage
first for backtranslate and rewrite and the direct call first for score, so a host whose speed drifts
over the hour (10-30% within a day on the benchmark machine) shifts both sides of a stage alike
instead of whichever side ran later. The stage's engine lives in a Spark Python worker and the direct
one in the driver; each is idle while the other side runs. The stage side first runs ingest, dedup
and chunk over the Dolma sample (tables of their own, off the clock), as a pipeline run does before
its LLM stages in the same Spark session.
Backtranslate's clocks include building the engine on both sides (importing vLLM and torch, loading
the model); score and rewrite on the direct side are the `LLM.chat` call alone, while the stage side's
include everything the stage does (planning, Delta reads and MERGEs, and, when rewrite's engine
settings differ, closing the held engine and building another). A one-prompt warm-up process runs
first, so neither side pays alone for a cold page cache. Prints output tokens per second of both, per
stage, and the ratios; nothing in it is CPU-specific. Last line:
RESULT n_prompts=... backtranslate=... score=... rewrite=... (ratios stage/direct)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "dolma-sample"
sys.path.insert(0, str(REPO))

from backforth_spark.core.config import Config, load_config  # noqa: E402


def passages(cfg: Config, n: int) -> list[tuple[str, int]]:
    """N distinct passage-sized texts: every passage of the sample, then copies with their words
    rotated. Distinct, so vLLM's prefix cache cannot reuse one prompt's work for a repeat of it (it
    would, by chance, more or less in either side's order)."""
    from backforth_spark.core.chunking import OK, chunk_document
    from backforth_spark.core.model import resolve_model
    from udfs.chunking import HFTokenizer

    tokenizer = HFTokenizer(resolve_model(cfg.llm))
    chunking = cfg.chunk.model_copy(update={"max_passages_per_doc": None})
    texts = [json.loads(line)["text"] for f in sorted(SAMPLE.glob("*.jsonl")) for line in f.open()]
    pool = [p.text for text in texts for p in chunk_document(text, tokenizer, chunking) if p.status == OK]
    out = []
    for i in range(n):
        words, k = pool[i % len(pool)].split(" "), i // len(pool)
        text = " ".join(words[k % len(words) :] + words[: k % len(words)])
        out.append((text, tokenizer.count(text)))  # rewrite's output budget follows the passage's size
    return out


STAGES = ("backtranslate", "score", "rewrite")


class Direct:
    """The direct side: one engine with the base settings, built at its first call (on the clock of
    that call, as the stage side builds its own inside its first stage)."""

    def __init__(self, cfg: Config) -> None:
        from backforth_spark.core.generation import fingerprints
        from backforth_spark.core.model import resolve_model

        self.cfg, self.model = cfg, resolve_model(cfg.llm)
        self.specs = fingerprints(cfg, self.model)
        self.engine = None
        self.load_s = 0.0

    def run(self, name: str, records: list[dict]) -> dict:
        """One `LLM.chat` over the inputs stage `name` saw."""
        from backforth_spark.core.engines.vllm_engine import create_vllm_engine
        from backforth_spark.core.generation import _within_budget

        started = time.perf_counter()
        if self.engine is None:
            # the stage imports torch in its Python worker; the direct side must pay for it here too
            assert "torch" not in sys.modules, "torch was imported before the direct side's first call"
            self.engine = create_vllm_engine(self.cfg.llm, self.model)
            self.load_s = time.perf_counter() - started
        spec = self.specs[name]
        fields = spec.template.data_fields
        convs = [spec.template.render(**{f: str(r[f]) for f in fields}) for r in records]
        params = [_within_budget(spec.params, spec.max_tokens(r.get("passage_tokens"))) for r in records]
        completions = self.engine.chat(convs, params)
        seconds = time.perf_counter() - started
        tokens = sum(c.completion_tokens or 0 for c in completions)
        return {"seconds": seconds, "tokens": tokens, "prompts": len(convs)}


@contextlib.contextmanager
def python_workers_kept(spark, every_s: float = 20.0):
    """Spark stops its idle Python workers, and with them the engine the stage's worker holds, after a
    minute in which no Python task ended; while the direct side runs, a one-row Python task every
    `every_s` seconds keeps them, as stages that run back to back in a pipeline do."""
    stop = threading.Event()

    def ping() -> None:
        while not stop.wait(every_s):
            spark.range(1, numPartitions=1).mapInPandas(lambda batches: batches, "id long").collect()

    thread = threading.Thread(target=ping, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def both(cfg: Config, texts: list[tuple[str, int]]) -> dict:
    """The three stages in Spark, one after the other, each followed or preceded by the direct call on
    the inputs it saw."""
    from pyspark.sql import functions as F

    from backforth_spark.app.pipeline import context_for
    from backforth_spark.core import schemas
    from backforth_spark.core.generation import LLM_TASKS
    from backforth_spark.spark.stages import STAGES as PIPELINE
    from backforth_spark.spark.stages import generate
    from backforth_spark.spark.stages.generate import current_specs, stage_inputs
    from backforth_spark.spark.tables import struct

    # As in a pipeline run, the LLM stages follow ingest, dedup and chunk in the same Spark session:
    # run those three over the Dolma sample first, into tables of their own, off the clock. Without
    # it the first stage alone pays the JVM's warm-up of Delta's and Spark's code paths and the
    # Python workers' start (measured with an instant engine: 9.5 s of Spark work cold, 3 s warm).
    # Chunking reads the tokenizer with the Rust library alone: no torch or vLLM gets imported.
    # One idle Python worker kept: the one the last LLM task released, which holds the engine. Spark
    # hands idle workers out first in, first out, so without the bound a worker the pipeline-before
    # stages left (kept alive by the pings during the direct turns) would take the next stage's task
    # and build a second engine.
    conf = {**cfg.spark.conf, "spark.python.factory.idleWorkerMaxPoolSize": "1"}
    cfg = cfg.model_copy(update={"spark": cfg.spark.model_copy(update={"conf": conf})})
    before = cfg.model_copy(update={"workdir": str(Path(cfg.workdir) / "pipeline-before")})
    first = context_for(before, "bench-before", [str(SAMPLE)], PIPELINE[:3])
    first.spark.sparkContext.setLogLevel("ERROR")
    for earlier in PIPELINE[:3]:
        earlier.run(first)
    assert "torch" not in sys.modules and "vllm" not in sys.modules
    ctx = context_for(cfg, "bench")
    tables = ctx.tables
    rows = [(f"p{i:06d}", f"bench/{i}", 0, p, n, "ok", False, None) for i, (p, n) in enumerate(texts)]
    df = ctx.spark.createDataFrame(rows, struct(schemas.PASSAGES_COLUMNS))
    tables.merge_insert_new(
        schemas.PASSAGES,
        df.select("*", F.lit("bench").alias("run_id"), F.current_timestamp().alias("written_at")),
        ["passage_id"],
    )  # fmt: skip
    by_name = {t.name: t for t in LLM_TASKS}
    direct = Direct(cfg)
    out: dict = {"stage": {}, "direct": {}}
    for turn, name in enumerate(STAGES):
        task = by_name[name]
        # what the stage will see, recorded before either clock starts (the direct side replays it)
        seen = stage_inputs(ctx, task, current_specs(ctx)).toPandas()
        records = json.loads(seen.to_json(orient="records"))
        for side in ("stage", "direct") if turn % 2 == 0 else ("direct", "stage"):
            if side == "direct":
                with python_workers_kept(ctx.spark):
                    out["direct"][name] = direct.run(name, records)
                continue
            started = time.perf_counter()
            counts = generate.run(ctx, task)
            seconds = time.perf_counter() - started
            agg = tables.read(task.table).agg(F.sum("completion_tokens"), F.max("latency_s")).first()
            out["stage"][name] = {
                "seconds": seconds,
                "tokens": int(agg[0] or 0),
                "prompts": counts["generated"],
                "chat_s": round(agg[1] or 0.0, 1),  # the longest engine call of a task
                **{k: counts[k] for k in ("plan_s", "generate_s", "merge_s", "engine_loads")},
            }
    out["direct"]["load_s"] = direct.load_s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--config", default=str(REPO / "conf" / "local.yaml"))
    parser.add_argument("--set", action="append", default=[], help="dotted config override")
    parser.add_argument("--only", choices=["both", "warm-up"], help=argparse.SUPPRESS)
    parser.add_argument("--passages", help=argparse.SUPPRESS)
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    if args.only == "both":
        texts = json.loads(Path(args.passages).read_text())[: args.prompts]
        print(json.dumps(both(cfg, texts)))
        return
    if args.only == "warm-up":  # read vLLM, torch and the model into the page cache
        from backforth_spark.core.engines.vllm_engine import create_vllm_engine
        from backforth_spark.core.model import resolve_model

        create_vllm_engine(cfg.llm, resolve_model(cfg.llm))
        print("{}")
        return

    with tempfile.TemporaryDirectory(prefix="backforth-bench-llm-") as work:
        # one LLM task, given every core (as the direct call has them)
        cores = os.cpu_count() or 1
        overrides = ["llm.num_partitions=1", f"llm.cpu_threads={cores}", "tracking.enabled=false"]
        overrides += [*args.set, f"workdir={work}"]
        # computed here, once: tokenising them imports transformers and torch, which neither side may
        # have loaded before its clock starts
        texts = Path(work) / "passages.json"
        texts.write_text(json.dumps(passages(cfg, args.prompts)))
        results = {}
        for name in ("warm-up", "both"):
            cmd = [sys.executable, __file__, "--only", name, "--prompts", str(args.prompts)]
            cmd += ["--passages", str(texts), "--config", args.config]
            cmd += [x for o in overrides for x in ("--set", o)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} run failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    d, s = results["both"]["direct"], results["both"]["stage"]
    print(f"direct: engine load {d['load_s']:.1f} s (counted in backtranslate)")
    ratios = {}
    for name in STAGES:
        dr, sr = d[name]["tokens"] / d[name]["seconds"], s[name]["tokens"] / s[name]["seconds"]
        ratios[name] = sr / dr
        print(
            f"{name:<13} direct {d[name]['seconds']:7.1f} s {d[name]['tokens']:7d} tok {dr:7.1f} tok/s | "
            f"stage {s[name]['seconds']:7.1f} s {s[name]['tokens']:7d} tok {sr:7.1f} tok/s "
            f"(plan {s[name]['plan_s']} s, generate {s[name]['generate_s']} s, merge {s[name]['merge_s']} s, "
            f"engine loads {s[name]['engine_loads']}) "
            f"| ratio {ratios[name]:.2f}"
        )
    shown = " ".join(f"{name}={ratio:.2f}" for name, ratio in ratios.items())
    print(f"RESULT n_prompts={args.prompts} {shown}")


if __name__ == "__main__":
    main()
