# Databricks notebook source
# MAGIC %md
# MAGIC # Run one stage
# MAGIC Runs a single stage of the pipeline (what `jobs/<stage>.py` runs under spark-submit) and shows its
# MAGIC counts and output table. Stages are incremental: each does only what it still owes.

# COMMAND ----------

from backforth_spark.spark.stages import STAGES

dbutils.widgets.text("config", "../conf/databricks.yaml", "Config file")
dbutils.widgets.text("catalog_schema", "main.backforth", "Tables (catalog.schema)")
dbutils.widgets.dropdown("stage", "ingest", [st.name for st in STAGES], "Stage")
dbutils.widgets.text("input", "/Volumes/main/backforth/dolma", "Dolma files (ingest only)")

# COMMAND ----------

from backforth_spark.app.pipeline import run_pipeline
from backforth_spark.core.config import load_config
from backforth_spark.spark.stages import select

stage = dbutils.widgets.get("stage")
cfg = load_config(
    dbutils.widgets.get("config"), [f"tables.catalog_schema={dbutils.widgets.get('catalog_schema')}"]
)
summary = run_pipeline(cfg, [dbutils.widgets.get("input")], select(stage, cfg))
assert summary["error"] is None, summary["error"]
summary["stages"][stage]

# COMMAND ----------

# MAGIC %md ## Its output table

# COMMAND ----------

record = next(st for st in STAGES if st.name == stage)
for table in record.writes:
    display(spark.table(summary["tables"][table]))
