"""spark-submit entry point for the `ground` stage; takes the same flags as `backforth run`.

spark-submit [spark flags] jobs/ground.py --config conf/local.yaml --workdir ./.backforth
"""

from backforth_spark.app.cli import job

if __name__ == "__main__":
    job("ground")
