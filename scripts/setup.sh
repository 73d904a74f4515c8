#!/usr/bin/env bash
# Installs everything the pipeline and its tests need, idempotently:
#   uv (pinned) -> the project venv from uv.lock -> the Delta jars -> the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
TOOLS=.tools
UV="$TOOLS/venv/bin/uv"

if [[ ! -x "$UV" ]] || [[ "$("$UV" --version | cut -d' ' -f2)" != "$UV_VERSION" ]]; then
  echo "setup: installing uv $UV_VERSION into $TOOLS/"
  python3.11 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet "uv==$UV_VERSION"
fi

echo "setup: syncing .venv from uv.lock"
# --compile-bytecode: every Spark Python worker is a fresh interpreter that imports pandas, pyarrow and
# the project; without .pyc files (uv writes none by default, and PYTHONDONTWRITEBYTECODE=1 keeps Python
# from writing them) each one compiles those sources again (pandas: 0.9 s -> 0.3 s to import).
# Up-to-date .pyc files are kept, so a repeated sync costs seconds.
"$UV" sync --frozen --extra local --extra cpu --extra convert --compile-bytecode --quiet
.venv/bin/python -m compileall -q -j 0 backforth_spark udfs

echo "setup: Delta jars (Spark's resolver output: .tools/delta-jars.log)"
if ! .venv/bin/python scripts/fetch_delta_jars.py > .tools/delta-jars.log 2>&1; then
  tail -40 .tools/delta-jars.log
  exit 1
fi

echo "setup: the s3a connector's jars (Spark's resolver output: .tools/s3a-jars.log)"
# for the suite's object-store test bed and local runs on an s3a:// workdir; 680 MB, fetched once
if [[ ! -f .tools/s3a-jars/PACKAGE ]] || ! grep -q "$(basename .venv/lib/python3*/site-packages/pyspark/jars/hadoop-client-api-*.jar .jar | sed 's/hadoop-client-api-//')" .tools/s3a-jars/PACKAGE; then
  if ! .venv/bin/python scripts/fetch_s3a_jars.py > .tools/s3a-jars.log 2>&1; then
    tail -40 .tools/s3a-jars.log
    exit 1
  fi
fi

echo "setup: default model"
.venv/bin/backforth model pull --config conf/local.yaml

echo "setup: JVM class archive (scripts/build_class_archive.py; its output: .tools/class-archive.log)"
# after the model: the archive's workload runs the pipeline through chunk, which needs the tokenizer
if ! .venv/bin/python scripts/build_class_archive.py > .tools/class-archive.log 2>&1; then
  grep -v '\[cds\]' .tools/class-archive.log | tail -40
  exit 1
fi
tail -1 .tools/class-archive.log
