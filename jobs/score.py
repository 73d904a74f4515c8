"""spark-submit entry point for the `score` stage; takes the same flags as `backforth run`.

spark-submit [spark flags] jobs/score.py --config conf/local.yaml --workdir ./.backforth
"""

from backforth_spark.app.cli import job

if __name__ == "__main__":
    job("score")
