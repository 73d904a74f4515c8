# Databricks notebook source
# MAGIC %md
# MAGIC # Explore results
# MAGIC What the tables hold, what each LLM stage has done and owes, the judge's scores, and the pairs.

# COMMAND ----------

dbutils.widgets.text("config", "../conf/databricks.yaml", "Config file")
dbutils.widgets.text("catalog_schema", "main.backforth", "Tables (catalog.schema)")

# COMMAND ----------

from pyspark.sql import functions as F

from backforth_spark import generate
from backforth_spark import tables as t
from backforth_spark.config import load_config
from backforth_spark.context import StageContext
from backforth_spark.model import resolve_model
from backforth_spark.session import get_spark
from backforth_spark.status import format_status, status

cfg = load_config(
    dbutils.widgets.get("config"), [f"tables.catalog_schema={dbutils.widgets.get('catalog_schema')}"]
)
tables = t.Tables.from_config(get_spark(cfg.spark), cfg)
print(format_status(status(StageContext(tables.spark, cfg, tables, "notebook"))))

# COMMAND ----------

# MAGIC %md ## Scores of the current judge, and why rows failed

# COMMAND ----------

specs = generate.fingerprints(cfg, resolve_model(cfg.llm))
scores = tables.read(t.SCORES).where(F.col("fingerprint") == specs["score"].fingerprint)
display(scores.groupBy("status", "score").count().orderBy("status", "score"))
display(scores.where("status <> 'ok'").select("passage_id", "status", "error", "raw_output"))

# COMMAND ----------

# MAGIC %md ## Pairs: instruction, score, rewrite and source passage

# COMMAND ----------

pairs = (
    tables.read(t.RESPONSES)
    .where((F.col("fingerprint") == specs["rewrite"].fingerprint) & (F.col("status") == "ok"))
    .join(tables.read(t.PASSAGES).select("passage_id", F.col("text").alias("passage")), "passage_id")
    .select("passage_id", "score", "instruction", "response", "passage")
)
display(pairs)
