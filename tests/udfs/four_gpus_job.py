"""The driver of tests/udfs/test_four_gpus.py, in a process of its own (the suite's process has its local
session): two slices of the backtranslate stage's Python function on a standalone cluster whose one
executor offers four GPU addresses and runs four single-GPU tasks at once, engines built by the
recording double inside the engine hosts. Prints the rows as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from backforth_spark.core.config import load_config
from backforth_spark.core.generation import BACKTRANSLATE, fingerprints
from backforth_spark.spark.tables import struct, without_lineage
from tests.conftest import LOCAL_CONF
from udfs.generation import TASK_ENGINE_LOADS, TASK_SECONDS, generate

REPO = Path(__file__).resolve().parents[2]
FACTORY = "tests.udfs.recording_host:build"
GPUS = 4


def main(master: str, discovery_script: str, hosts: str) -> None:
    spark = (
        SparkSession.builder.master(master)
        .config("spark.executor.cores", str(GPUS))
        .config("spark.executor.memory", "1g")
        .config("spark.executor.resource.gpu.amount", str(GPUS))
        .config("spark.executor.resource.gpu.discoveryScript", discovery_script)
        .config("spark.task.resource.gpu.amount", "1")
        .config("spark.executorEnv.PYTHONPATH", str(REPO))  # the workers import tests/ for the double
        .getOrCreate()
    )
    cfg = load_config(LOCAL_CONF, [f"llm.engine_host_dir={hosts}"])
    spec = fingerprints(cfg, "double")[BACKTRANSLATE.name]
    worker = generate(spec, cfg.llm.for_stage(BACKTRANSLATE.name), host_factory=FACTORY)
    schema = without_lineage(struct(BACKTRANSLATE.columns))
    schema = schema.add(TASK_SECONDS, "double").add(TASK_ENGINE_LOADS, "long")
    passages = spark.createDataFrame(
        [(f"p{i}", f"Passage number {i} explains how a thing works.") for i in range(4 * GPUS)],
        "passage_id string, passage string",
    )
    slices = []
    for _ in range(2):
        rows = passages.repartition(GPUS).mapInPandas(worker, schema).collect()
        keep = ("passage_id", "device", "instruction", TASK_ENGINE_LOADS)
        slices.append([{k: r[k] for k in keep} for r in rows])
    spark.stop()
    print(json.dumps(slices))


if __name__ == "__main__":
    main(*sys.argv[1:])
