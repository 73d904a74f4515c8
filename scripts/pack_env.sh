#!/usr/bin/env bash
# Packs the project's runtime environment for spark-submit --archives: a relocatable venv (uv's
# --relocatable: its scripts and entry points find their interpreter relative to themselves) with the
# locked runtime dependencies (the `cpu` extra by default; EXTRA=gpu for CUDA nodes) and the project,
# no dev or benchmark tools, as dist/backforth-env.zip. The venv links to this machine's Python 3.11: the
# executors need one at the same path (as with venv-pack).
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRA=${EXTRA:-cpu}
UV=.tools/venv/bin/uv
VENV=.tools/pack-venv
OUT=dist/backforth-env.zip

rm -rf "$VENV"
"$UV" venv --quiet --relocatable --python "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" "$VENV"
"$UV" export --quiet --frozen --no-dev --extra "$EXTRA" --no-hashes --no-emit-project -o "$VENV/requirements.txt"
"$UV" pip install --quiet --python "$VENV/bin/python" -r "$VENV/requirements.txt"
"$UV" pip install --quiet --python "$VENV/bin/python" --no-deps .
# Spark 4.2 refuses to unpack an archive holding a link to a path outside it, and the venv's interpreter
# is one (to the base Python). A copy of the base interpreter instead: with the venv's pyvenv.cfg beside
# it, it finds the base's standard library at the `home` that file names, as `python -m venv --copies`.
for link in "$VENV"/bin/python*; do
  if [ -L "$link" ] && [[ "$(readlink "$link")" == /* ]]; then
    cp --remove-destination "$(readlink -f "$link")" "$link"
  fi
done
mkdir -p dist
# A zip, stored uncompressed (a Python environment compresses slowly and little). Not a tar: Spark 4.2
# unpacks a tar through Hadoop 3.5's Java untar, which drops the files' modes, and the executors then
# cannot run ./env/bin/python ("error=13, Permission denied"); its unzip keeps them. Entries are named
# by the venv's top-level names, not "./", which that untar also refused ("would create entry outside").
rm -f "$OUT.partial"
(cd "$VENV" && ls -A | zip -q -r -0 -y "$OLDPWD/$OUT.partial" -@)
mv "$OUT.partial" "$OUT"
echo "pack-env: $OUT ($(du -h "$OUT" | cut -f1))"
