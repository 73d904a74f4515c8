"""spark-submit entry point for `backforth refresh` (a scheduled job); takes its flags.

spark-submit [spark flags] jobs/refresh.py --config conf/local.yaml --workdir ./.backforth
"""

from backforth_spark.app.cli import job

if __name__ == "__main__":
    job("refresh")
