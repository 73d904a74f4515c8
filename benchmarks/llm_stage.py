"""Throughput of an LLM stage through Spark against vLLM's `LLM.chat` called directly.

    make bench-llm N=256     # or: .venv/bin/python benchmarks/llm_stage.py --prompts 256 [--config ...]

The same N backtranslation prompts (passages of the Dolma sample, chunked to `chunk.max_tokens`, repeated
to N) go through
  (a) direct: `vllm.LLM(...)` built with the stage's engine arguments, then one `LLM.chat` over all N;
  (b) stage:  our `backtranslate` stage in Spark (`generate.run`), reading the N passages from Delta and
      MERGEing its rows, with one LLM task per slot (`llm.num_partitions`, default 1 here).
Both include building the engine; both use the config's model and sampling. Each runs in its own
process so that one's engine does not hold memory during the other. Prints output tokens per second of
both and the ratio; nothing in it is CPU-specific, so it runs unchanged on a GPU machine. Last line:
RESULT n_prompts=... direct_tok_s=... stage_tok_s=... ratio=...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "dolma-sample"
sys.path.insert(0, str(REPO))

from backforth_spark.config import Config, load_config  # noqa: E402


def passages(cfg: Config, n: int) -> list[str]:
    from backforth_spark.chunk import OK, chunk_document
    from backforth_spark.model import resolve_model
    from udfs.chunking import HFTokenizer

    tokenizer = HFTokenizer(resolve_model(cfg.llm))
    texts = [json.loads(line)["text"] for f in sorted(SAMPLE.glob("*.jsonl")) for line in f.open()]
    pool = [p.text for text in texts for p in chunk_document(text, tokenizer, cfg.chunk) if p.status == OK]
    return [pool[i % len(pool)] for i in range(n)]


def direct(cfg: Config, n: int) -> dict:
    from backforth_spark import generate
    from backforth_spark.engine import create_vllm_engine
    from backforth_spark.model import resolve_model

    model = resolve_model(cfg.llm)
    spec = generate.fingerprints(cfg, model)["backtranslate"]
    convs = [spec.template.render(passage=p) for p in passages(cfg, n)]
    started = time.perf_counter()
    engine = create_vllm_engine(cfg.llm, model)
    loaded = time.perf_counter()
    completions = engine.chat(convs, spec.params)
    done = time.perf_counter()
    tokens = sum(c.completion_tokens or 0 for c in completions)
    return {"seconds": done - started, "load_s": loaded - started, "tokens": tokens}


def stage(cfg: Config, n: int) -> dict:
    from pyspark.sql import functions as F

    from backforth_spark import generate
    from backforth_spark import tables as t
    from backforth_spark.context import StageContext
    from backforth_spark.session import get_spark

    spark = get_spark(cfg.spark)
    spark.sparkContext.setLogLevel("ERROR")
    tables = t.Tables(spark, cfg.workdir_path / "tables")
    rows = [(f"p{i:06d}", f"bench/{i}", 0, p, 0, "ok", False, None) for i, p in enumerate(passages(cfg, n))]
    df = spark.createDataFrame(rows, t.without_lineage(t.PASSAGES_SCHEMA))
    tables.merge_insert_new(
        t.PASSAGES, df.select("*", F.lit("bench").alias("run_id"), F.current_timestamp().alias("written_at")),
        ["passage_id"],
    )  # fmt: skip
    started = time.perf_counter()
    counts = generate.run(StageContext(spark, cfg, tables, "bench"), "backtranslate")
    seconds = time.perf_counter() - started
    tokens = tables.read(t.INSTRUCTIONS).agg(F.sum("completion_tokens")).first()[0] or 0
    return {"seconds": seconds, "tokens": int(tokens), "generated": counts["generated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--config", default=str(REPO / "conf" / "local.yaml"))
    parser.add_argument("--set", action="append", default=[], help="dotted config override")
    parser.add_argument("--only", choices=["direct", "stage"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only:
        cfg = load_config(args.config, args.set)
        print(json.dumps((direct if args.only == "direct" else stage)(cfg, args.prompts)))
        return

    with tempfile.TemporaryDirectory(prefix="backforth-bench-llm-") as work:
        # one LLM task, given every core (as the direct call has them)
        cores = os.cpu_count() or 1
        overrides = ["llm.num_partitions=1", f"llm.cpu_threads={cores}", "tracking.enabled=false"]
        overrides += [*args.set, f"workdir={work}"]
        results = {}
        for which in ("direct", "stage"):
            cmd = [sys.executable, __file__, "--only", which, "--prompts", str(args.prompts)]
            cmd += ["--config", args.config]
            cmd += [x for o in overrides for x in ("--set", o)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{which} run failed:\n{out.stderr[-3000:]}")
            results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    d, s = results["direct"], results["stage"]
    d_rate, s_rate = d["tokens"] / d["seconds"], s["tokens"] / s["seconds"]
    print(
        f"direct LLM.chat: {d['seconds']:7.1f} s  {d['tokens']} tokens  {d_rate:7.1f} tok/s  "
        f"(engine load {d['load_s']:.1f} s)"
    )
    print(
        f"our stage:       {s['seconds']:7.1f} s  {s['tokens']} tokens  {s_rate:7.1f} tok/s  "
        f"({s['generated']} rows)"
    )
    ratio = s_rate / d_rate
    print(f"ratio stage/direct: {ratio:.2f}")
    rates = f"direct_tok_s={d_rate:.1f} stage_tok_s={s_rate:.1f}"
    print(f"RESULT n_prompts={args.prompts} {rates} ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
