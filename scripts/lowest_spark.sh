#!/usr/bin/env bash
# The lowest supported Spark, proven: a second environment with pyspark and delta-spark at the bottom of
# the supported range (Spark 4.0, Databricks Runtime 17.3 LTS), everything else from the project venv,
# then ingest to export on the demo input with the real engine.
#   make lowest-spark            (after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."

PYSPARK=4.0.0
DELTA=4.0.0   # Delta Lake's line for Spark 4.0
LOW=.tools/lowest-spark
UV="${UV:-.tools/venv/bin/uv}"

if [[ ! -x "$LOW/bin/python" ]]; then
  "$UV" venv --quiet --python "$(.venv/bin/python -c 'import sys; print(sys.executable)')" "$LOW"
fi
"$UV" pip install --quiet --python "$LOW/bin/python" "pyspark[connect]==$PYSPARK" "delta-spark==$DELTA"
# the project and every other package from the project venv, after this environment's own Spark and Delta
site=$("$LOW/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
project_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$PWD" "$project_site" > "$site/zz_project_venv.pth"
"$LOW/bin/python" -c "import pyspark, delta; print('pyspark', pyspark.__version__)"

work="$LOW/work"
rm -rf "$work"
# the Delta jars of this line are resolved from Maven at start (spark.delta_jars=null); the class
# archive was built for the project venv's Spark
"$LOW/bin/python" -m backforth_spark.app.cli run --config conf/local.yaml --input "${DEMO_INPUT:-../shared/data/dolma-sample}" --workdir "$work" \
  --set spark.delta_jars=null --set spark.class_archive=null --set tracking.enabled=false \
  --summary-json "$work/summary.json"
"$LOW/bin/python" - "$work/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
stages = {name: counts.get("rows_out") for name, counts in summary["stages"].items()}
print(f"RESULT spark={summary['spark']['version']} stages={stages} export_pairs={summary['export']['pairs']}")
PY
