"""spark-submit entry point for the `ingest` stage; takes the same flags as `backforth run`.

spark-submit [spark flags] jobs/ingest.py --config conf/local.yaml --workdir ./.backforth --input PATH
"""

from backforth_spark.app.cli import job

if __name__ == "__main__":
    job("ingest")
