"""Throughput of an LLM stage through Spark against vLLM's `LLM.chat` called directly.

    make bench-llm N=256     # or: .venv/bin/python benchmarks/llm_stage.py --prompts 256 [--config ...]

The same N distinct backtranslation prompts (passages of the Dolma sample chunked to `chunk.max_tokens`,
then word-rotated copies of them up to N) go through
  (a) direct: `vllm.LLM(...)` built with the stage's engine arguments, then one `LLM.chat` over all N;
  (b) stage:  our `backtranslate` stage in Spark (`generate.run`), reading the N passages from Delta and
      MERGEing its rows, with one LLM task per slot (`llm.num_partitions`, default 1 here).
Both clocks include building the engine (importing vLLM and torch, loading the model); the stage's
excludes starting the Spark session, which a pipeline pays once for all its stages. Passages are
tokenised by the parent, so neither side has torch imported before its clock starts. Each side runs
in its own process, after a one-prompt warm-up run, so that neither pays alone for a cold page cache.
Prints output tokens per second of
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
    """N distinct passage-sized texts: every passage of the sample, then copies with their words
    rotated. Distinct, so vLLM's prefix cache cannot reuse one prompt's work for a repeat of it (it
    would, by chance, more or less in either side's order)."""
    from backforth_spark.chunking import OK, chunk_document
    from backforth_spark.model import resolve_model
    from udfs.chunking import HFTokenizer

    tokenizer = HFTokenizer(resolve_model(cfg.llm))
    chunking = cfg.chunk.model_copy(update={"max_passages_per_doc": None})
    texts = [json.loads(line)["text"] for f in sorted(SAMPLE.glob("*.jsonl")) for line in f.open()]
    pool = [p.text for text in texts for p in chunk_document(text, tokenizer, chunking) if p.status == OK]
    out = []
    for i in range(n):
        words, k = pool[i % len(pool)].split(" "), i // len(pool)
        out.append(" ".join(words[k % len(words) :] + words[: k % len(words)]))
    return out


def direct(cfg: Config, texts: list[str]) -> dict:
    from backforth_spark.generation import fingerprints
    from backforth_spark.model import resolve_model
    from backforth_spark.vllm_engine import create_vllm_engine

    model = resolve_model(cfg.llm)
    spec = fingerprints(cfg, model)["backtranslate"]
    convs = [spec.template.render(passage=p) for p in texts]
    # torch and transformers are not imported yet (a Spark worker imports them too, inside the stage)
    assert "torch" not in sys.modules, "the direct side must pay for importing torch, as the stage does"
    started = time.perf_counter()
    engine = create_vllm_engine(cfg.llm, model)
    loaded = time.perf_counter()
    completions = engine.chat(convs, spec.params)
    done = time.perf_counter()
    tokens = sum(c.completion_tokens or 0 for c in completions)
    return {"seconds": done - started, "load_s": loaded - started, "tokens": tokens}


def stage(cfg: Config, texts: list[str]) -> dict:
    from pyspark.sql import functions as F

    from backforth_spark import schemas
    from backforth_spark.generation import BACKTRANSLATE
    from backforth_spark.pipeline import context_for
    from backforth_spark.stages import generate
    from backforth_spark.tables import struct

    ctx = context_for(cfg, "bench")
    ctx.spark.sparkContext.setLogLevel("ERROR")
    tables = ctx.tables
    rows = [(f"p{i:06d}", f"bench/{i}", 0, p, 0, "ok", False, None) for i, p in enumerate(texts)]
    df = ctx.spark.createDataFrame(rows, struct(schemas.PASSAGES_COLUMNS))
    tables.merge_insert_new(
        schemas.PASSAGES,
        df.select("*", F.lit("bench").alias("run_id"), F.current_timestamp().alias("written_at")),
        ["passage_id"],
    )  # fmt: skip
    started = time.perf_counter()
    counts = generate.run(ctx, BACKTRANSLATE)
    seconds = time.perf_counter() - started
    out = tables.read(BACKTRANSLATE.table).agg(F.sum("completion_tokens"), F.max("latency_s")).first()
    phases = {k: counts[k] for k in ("plan_s", "generate_s", "merge_s")}
    return {
        "seconds": seconds,
        "tokens": int(out[0] or 0),
        "chat_s": round(out[1] or 0.0, 1),  # the longest engine.chat call of a task
        "generated": counts["generated"],
        **phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--config", default=str(REPO / "conf" / "local.yaml"))
    parser.add_argument("--set", action="append", default=[], help="dotted config override")
    parser.add_argument("--only", choices=["direct", "stage"], help=argparse.SUPPRESS)
    parser.add_argument("--passages", help=argparse.SUPPRESS)
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    if args.only:
        texts = json.loads(Path(args.passages).read_text())
        print(json.dumps((direct if args.only == "direct" else stage)(cfg, texts[: args.prompts])))
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
        # A throwaway direct run on one prompt first: whichever side ran first would otherwise also
        # pay for reading vLLM, torch and the model into the page cache.
        runs = [
            ("warm-up", "direct", 1),
            ("direct", "direct", args.prompts),
            ("stage", "stage", args.prompts),
        ]
        for name, which, n in runs:
            cmd = [sys.executable, __file__, "--only", which, "--prompts", str(n), "--passages", str(texts)]
            cmd += ["--config", args.config]
            cmd += [x for o in overrides for x in ("--set", o)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} run failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    d, s = results["direct"], results["stage"]
    d_rate, s_rate = d["tokens"] / d["seconds"], s["tokens"] / s["seconds"]
    print(
        f"direct LLM.chat: {d['seconds']:7.1f} s  {d['tokens']} tokens  {d_rate:7.1f} tok/s  "
        f"(engine load {d['load_s']:.1f} s)"
    )
    print(
        f"our stage:       {s['seconds']:7.1f} s  {s['tokens']} tokens  {s_rate:7.1f} tok/s  "
        f"({s['generated']} rows; plan {s['plan_s']} s, generate {s['generate_s']} s "
        f"of which engine.chat {s['chat_s']} s, merge {s['merge_s']} s)"
    )
    ratio = s_rate / d_rate
    print(f"ratio stage/direct: {ratio:.2f}")
    rates = f"direct_tok_s={d_rate:.1f} stage_tok_s={s_rate:.1f}"
    print(f"RESULT n_prompts={args.prompts} {rates} ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
