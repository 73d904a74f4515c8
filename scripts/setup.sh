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
"$UV" sync --frozen --extra cpu --extra convert --quiet

echo "setup: Delta jars (Spark's resolver output: .tools/delta-jars.log)"
if ! .venv/bin/python scripts/fetch_delta_jars.py > .tools/delta-jars.log 2>&1; then
  tail -40 .tools/delta-jars.log
  exit 1
fi

echo "setup: default model"
.venv/bin/backforth model pull --config conf/local.yaml
