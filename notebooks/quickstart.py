# Databricks notebook source
# MAGIC %md
# MAGIC # backforth-spark quickstart
# MAGIC Runs the whole back-and-forth pipeline on this cluster's Spark session, with Unity Catalog tables.
# MAGIC Install the project wheel (and `vllm` on GPU clusters) as a cluster or job library first; the
# MAGIC bundle (`databricks.yml`) does both. Set the widgets, then run all.

# COMMAND ----------

dbutils.widgets.text("config", "../conf/databricks.yaml", "Config file")
dbutils.widgets.text("catalog_schema", "main.backforth", "Tables (catalog.schema)")
dbutils.widgets.text("input", "/Volumes/main/backforth/dolma", "Dolma files")
dbutils.widgets.text("model", "meta-llama/Llama-3.1-8B-Instruct", "Model")

# COMMAND ----------

from backforth_spark.app.pipeline import run_pipeline
from backforth_spark.core.config import load_config
from backforth_spark.spark.stages import select

cfg = load_config(
    dbutils.widgets.get("config"),
    [
        f"tables.catalog_schema={dbutils.widgets.get('catalog_schema')}",
        f"llm.model={dbutils.widgets.get('model')}",
    ],
)
summary = run_pipeline(cfg, [dbutils.widgets.get("input")], select(None, cfg))
assert summary["error"] is None, summary["error"]
summary["stages"]

# COMMAND ----------

# MAGIC %md ## The exported pairs
# MAGIC The export folder loads with `datasets.load_dataset(path)`; its `README.md` is the dataset card.

# COMMAND ----------

from backforth_spark.core.dataset import current_files

print(summary["export"])
version, files = current_files(summary["export"]["path"])  # the files the export's card names
if not files:
    print("no pair was exported: summary['stages'] says where each row went")
elif files[0].endswith(".parquet"):
    display(spark.read.parquet(*files))
else:
    display(spark.read.json(*files))
