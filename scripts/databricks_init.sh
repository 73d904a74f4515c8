#!/usr/bin/env bash
# Databricks cluster init script: installs the GPU stack (vLLM and the torch and CUDA wheels it pins)
# from a wheelhouse on a Unity Catalog Volume, with no package index, into the cluster's Python.
# Copy it beside the wheels: databricks.yml runs ${var.wheelhouse}/databricks_init.sh on every node.
# Fill the wheelhouse once, on a machine of the runtime's Python (3.12) and platform:
#   pip download vllm==0.32.0 -d /Volumes/<catalog>/<schema>/wheels
set -euo pipefail
WHEELHOUSE="${BACKFORTH_WHEELHOUSE:?set BACKFORTH_WHEELHOUSE to the Volume folder of the wheels}"
/databricks/python/bin/pip install --no-index --find-links "$WHEELHOUSE" "vllm==0.32.0"
