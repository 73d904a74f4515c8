"""Zip the project's code (backforth_spark/ with its prompt templates, udfs/) for spark-submit --py-files.

    .venv/bin/python scripts/build_pyfiles.py [dist/backforth_spark.zip]

Executors still need the dependencies (pyspark, pandas, vllm, ...) in their Python; the zip ships only
this project's code, so a cluster runs exactly the version that was submitted.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("backforth_spark", "udfs")


def build(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in PACKAGES:
            for path in sorted((REPO / package).rglob("*")):
                if path.is_file() and path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                    zf.write(path, path.relative_to(REPO).as_posix())
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "dist" / "backforth_spark.zip"))
