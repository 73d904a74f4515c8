#!/usr/bin/env bash
# Packs the project's runtime environment for spark-submit --archives: a relocatable venv (uv's
# --relocatable: its scripts and entry points find their interpreter relative to themselves) with the
# locked runtime dependencies (the `cpu` extra by default; EXTRA=gpu for CUDA nodes) and the project,
# no dev or benchmark tools, as dist/backforth-env.tar. The venv links to this machine's Python 3.11: the
# executors need one at the same path (as with venv-pack).
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRA=${EXTRA:-cpu}
UV=.tools/venv/bin/uv
VENV=.tools/pack-venv
OUT=dist/backforth-env.tar

rm -rf "$VENV"
"$UV" venv --quiet --relocatable --python "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" "$VENV"
"$UV" export --quiet --frozen --no-dev --extra "$EXTRA" --no-hashes --no-emit-project -o "$VENV/requirements.txt"
"$UV" pip install --quiet --python "$VENV/bin/python" -r "$VENV/requirements.txt"
"$UV" pip install --quiet --python "$VENV/bin/python" --no-deps .
mkdir -p dist
# uncompressed: a Python environment compresses slowly and little (wheels' shared objects), and Spark
# unpacks a .tar as it does a .tar.gz
tar -cf "$OUT.partial" -C "$VENV" .
mv "$OUT.partial" "$OUT"
echo "pack-env: $OUT ($(du -h "$OUT" | cut -f1))"
