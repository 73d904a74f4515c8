# Databricks notebook source
# MAGIC %md
# MAGIC # Explore results
# MAGIC What the tables hold, what each LLM stage has done and owes, the judge's scores, and the pairs.

# COMMAND ----------

dbutils.widgets.text("config", "../conf/databricks.yaml", "Config file")
dbutils.widgets.text("catalog_schema", "main.backforth", "Tables (catalog.schema)")

# COMMAND ----------

from pyspark.sql import functions as F

from backforth_spark.app.pipeline import context_for
from backforth_spark.app.status import format_status, status
from backforth_spark.core import schemas
from backforth_spark.core.config import load_config
from backforth_spark.core.generation import REWRITE, SCORE
from backforth_spark.spark.stages.generate import current_specs

cfg = load_config(
    dbutils.widgets.get("config"), [f"tables.catalog_schema={dbutils.widgets.get('catalog_schema')}"]
)
ctx = context_for(cfg, "notebook")
tables = ctx.tables
print(format_status(status(ctx)))

# COMMAND ----------

# MAGIC %md ## Scores of the current judge, and why rows failed

# COMMAND ----------

specs = current_specs(ctx)
scores = tables.read(SCORE.table).where(F.col("fingerprint") == specs["score"].fingerprint)
display(scores.groupBy("status", "score").count().orderBy("status", "score"))
display(scores.where("status <> 'ok'").select("passage_id", "status", "error", "raw_output"))

# COMMAND ----------

# MAGIC %md ## Pairs: instruction, score, rewrite and source passage

# COMMAND ----------

pairs = (
    tables.read(REWRITE.table)
    .where((F.col("fingerprint") == specs["rewrite"].fingerprint) & (F.col("status") == "ok"))
    .join(tables.read(schemas.PASSAGES).select("passage_id", F.col("text").alias("passage")), "passage_id")
    .select("passage_id", "score", "instruction", "response", "passage")
)
display(pairs)
