"""spark-submit entry point for the whole pipeline (or `--stages a,b`); the flags of `backforth run`.

spark-submit [spark flags] jobs/pipeline.py --config conf/local.yaml --input PATH --workdir ./.backforth
"""

from backforth_spark.app.cli import job

if __name__ == "__main__":
    job(None)
