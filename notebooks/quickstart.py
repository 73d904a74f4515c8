# Databricks notebook source
# MAGIC %md
# MAGIC # backforth-spark quickstart
# MAGIC Runs the back-and-forth pipeline on the cluster's Spark session. Install the project wheel (with the
# MAGIC `gpu` extra on GPU clusters) as a cluster or job library first. Set the widgets, then run all.

# COMMAND ----------

dbutils.widgets.text("input", "/Volumes/main/default/dolma/documents", "Dolma files")
dbutils.widgets.text("workdir", "/Volumes/main/default/backforth", "Work folder")
dbutils.widgets.text("model", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "Model")

# COMMAND ----------

from backforth_spark.config import load_config
from backforth_spark.pipeline import STAGES, run_pipeline

cfg = load_config(
    None,
    [
        f"workdir={dbutils.widgets.get('workdir')}",
        f"llm.model={dbutils.widgets.get('model')}",
        "spark.configure_delta=false",  # Databricks ships Delta Lake
        "tracking.tracking_uri=databricks",
    ],
)
summary = run_pipeline(cfg, [dbutils.widgets.get("input")], list(STAGES))
summary

# COMMAND ----------

# MAGIC %md ## The kept pairs

# COMMAND ----------

display(spark.read.format("delta").load(summary["tables"]["responses"]).where("status = 'ok'"))
