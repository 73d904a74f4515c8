"""Build the driver JVM's class-data archive (HotSpot AppCDS) for local runs: conf/local.yaml's
spark.class_archive, .tools/spark-classes.jsa.

A fresh local run spends seconds loading and verifying the same classes (Spark SQL, Delta, Hadoop) on
every start. A dynamic archive written at the exit of a JVM that ran the pipeline lets later JVMs map
those classes ready-made. The archive is written by a representative workload: ingest, dedup and chunk
over a small generated corpus, then a refresh with one new file (MERGE paths), in local mode.

An archive only fits the JVM build and the class path it was written with (the JVM ignores one that
does not, and says so); the stamp file beside it names both, and a changed stamp rebuilds it. A
truncated archive can crash the JVM that maps it, so it is written under a temporary name and renamed
into place only once the writing JVM has exited.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pyspark
from pyspark import SparkContext
from pyspark.sql import SparkSession

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backforth_spark.app.pipeline import run_pipeline  # noqa: E402
from backforth_spark.core.config import load_config  # noqa: E402
from backforth_spark.spark.stages import select  # noqa: E402

CONFIG = REPO / "conf" / "local.yaml"
WORDS = str.split(
    "river stone garden window morning letter market engine harbor signal winter forest bridge "
    "candle orbit meadow copper lantern valley thunder pocket silver island ladder canyon feather "
    "quarry ribbon saddle timber velvet walnut yellow zephyr anchor basket cactus dragon"
)


def stamp(delta_jars: str | None) -> str:
    """What the archive depends on: the JVM build and the jars it was written with (the JVM checks
    each class-path jar's size and modification time)."""
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=True).stderr.strip()
    folders = [Path(pyspark.__file__).parent / "jars", *([Path(delta_jars)] if delta_jars else [])]
    files = [p for folder in folders for p in sorted(folder.glob("*.jar"))]
    jars = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    digest = hashlib.sha256(json.dumps(jars).encode()).hexdigest()
    return json.dumps({"java": java, "pyspark": pyspark.__version__, "jars": len(jars), "sha256": digest})


def write_corpus(path: Path, n: int, rng: random.Random, prefix: str, old: list[str]) -> list[str]:
    """A Dolma file of `n` documents: new texts, exact copies and near copies of earlier ones."""
    texts = []
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for i in range(n):
            if old and i % 5 == 0:
                text = rng.choice(old)
            elif old and i % 5 == 1:
                words = rng.choice(old).split()
                words[rng.randrange(len(words))] = rng.choice(WORDS)
                text = " ".join(words)
            else:
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(300, 900)))
            texts.append(text)
            doc = {"id": f"{prefix}-{i}", "text": text, "source": "archive", "metadata": {}}
            out.write(json.dumps(doc) + "\n")
    return texts


def workload(archive_partial: Path) -> None:
    """The pipeline's local path through chunk, twice, in a JVM that writes its classes at exit."""
    cfg0 = load_config(CONFIG, [])
    options = cfg0.spark.conf.get("spark.driver.extraJavaOptions", "")
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="backforth-cds-") as tmp:
        inputs = Path(tmp) / "input"
        inputs.mkdir()
        overrides = [
            f"workdir={tmp}/work",
            "tracking.enabled=false",
            "spark.class_archive=null",  # a JVM that writes an archive must not map one
            f"spark.conf.spark.driver.extraJavaOptions={options} -XX:ArchiveClassesAtExit={archive_partial}",
        ]
        cfg = load_config(CONFIG, overrides)
        stages = select("ingest,dedup,chunk", cfg)
        old = write_corpus(inputs / "a.jsonl.gz", 40, rng, "a", [])
        for n in (1, 2):
            if n == 2:  # a refresh: one new file, MERGEs into tables that exist
                write_corpus(inputs / "b.jsonl.gz", 20, rng, "b", old)
            summary = run_pipeline(cfg, [str(inputs)], stages, echo=lambda _: None)
            if summary["error"]:
                raise RuntimeError(f"the archive's workload failed: {summary['error']}")
        # the archive is written as the JVM exits: stop Spark, close the gateway's stdin (the JVM
        # exits on end of input) and wait for the process
        proc = SparkContext._gateway.proc
        SparkSession.getActiveSession().stop()
        proc.stdin.close()
        proc.wait(timeout=600)


def main() -> int:
    cfg = load_config(CONFIG, [])
    if not cfg.spark.class_archive:
        print("spark.class_archive is not set in conf/local.yaml: nothing to build")
        return 0
    archive = (REPO / cfg.spark.class_archive).resolve()
    stamp_file = archive.with_name(archive.name + ".stamp")
    wanted = stamp(cfg.spark.delta_jars and str(REPO / cfg.spark.delta_jars))
    if archive.exists() and stamp_file.exists() and stamp_file.read_text() == wanted:
        print(f"{archive} is up to date")
        return 0
    partial = archive.with_name(archive.name + ".partial")
    partial.unlink(missing_ok=True)
    archive.unlink(missing_ok=True)
    stamp_file.unlink(missing_ok=True)
    workload(partial)
    if not partial.exists() or partial.stat().st_size == 0:
        print(f"the JVM wrote no archive at {partial}", file=sys.stderr)
        return 1
    partial.rename(archive)
    stamp_file.write_text(wanted)
    print(f"{archive}: {archive.stat().st_size // 2**20} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
