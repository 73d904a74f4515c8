"""What ran out when a run runs out of memory: the one sentence a person reads instead of a traceback.

Pure text work: the driver hands in the failure's text (Spark's wrapper around an executor's or a Python
worker's error), whether the master is local, and the exit code of the JVM when it died. Spark's own
signs, by where the memory ran out:
- a JVM heap: `java.lang.OutOfMemoryError`; Spark's handler for it ends the JVM with exit code 52
  (SparkExitCode.OOM), so a local run's JVM (driver and executors in one) dies and the driver only sees
  a lost connection, and a cluster's executor is lost with that code;
- a cluster manager's memory limit on an executor's container (heap, off-heap and Python workers
  together): YARN's "Container killed by YARN for exceeding memory limits", Kubernetes' `OOMKilled`,
  or exit code 137 (SIGKILL);
- a Python worker: Python's own `MemoryError` (under `spark.executor.pyspark.memory`, an address-space
  limit on each worker, that is where allocations fail).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

JVM_OOM_EXIT = 52  # SparkExitCode.OOM

# Spark's defaults, for a setting the run did not set
DEFAULTS = {"spark.driver.memory": "1g", "spark.executor.memory": "1g"}

_JVM_OOM = "java.lang.OutOfMemoryError"
_CONTAINER = re.compile(
    r"Container killed by YARN for exceeding (physical )?memory limits|OOMKilled|exit(ed with)? code:? 137"
)
_EXECUTOR_OOM_EXIT = re.compile(r"ExecutorLostFailure.*?exit(ed with)? code:? 52", re.DOTALL)
_PYTHON_OOM = re.compile(r"^\s*MemoryError\b", re.MULTILINE)
_IN_A_TASK = ("Job aborted due to stage failure", "TaskSetManager", "Lost task", "ExecutorLostFailure")


@dataclass(frozen=True)
class MemoryShortage:
    """What ran out (`what`), the setting whose value bounds it, and what else helps."""

    what: str
    setting: str
    also: str

    def sentence(self, settings: Mapping[str, str]) -> str:
        value = settings.get(self.setting) or DEFAULTS.get(self.setting, "unset")
        return (
            f"ran out of memory: {self.what} ({self.setting}={value}); raise it "
            f"(--set spark.conf.{self.setting}=...) or {self.also}; the logs have the details"
        )


SMALLER_PARTITIONS = "give each task less (spark.sql.adaptive.advisoryPartitionSizeInBytes)"
SMALLER_BATCHES = (
    "hand it smaller batches (spark.sql.execution.arrow.maxRecordsPerBatch, "
    "spark.sql.execution.arrow.maxBytesPerBatch)"
)


def memory_shortage(error: str, *, local: bool, jvm_exit: int | None = None) -> MemoryShortage | None:
    """What ran out of memory, judged from a failure's text and the exit code of a JVM that died
    (None while it lives); None when the failure is not a shortage of memory."""
    if _PYTHON_OOM.search(error):
        setting = "spark.executor.pyspark.memory"
        return MemoryShortage("a Python worker's memory", setting, SMALLER_BATCHES)
    if local and (jvm_exit == JVM_OOM_EXIT or _JVM_OOM in error):
        # one JVM is the driver and the executors: its heap is spark.driver.memory
        what = "the JVM heap (local mode: the driver and its executors share it)"
        return MemoryShortage(what, "spark.driver.memory", SMALLER_PARTITIONS)
    if _CONTAINER.search(error):
        what = "an executor's container (heap, off-heap and Python workers together)"
        return MemoryShortage(what, "spark.executor.memoryOverhead", SMALLER_PARTITIONS)
    if _EXECUTOR_OOM_EXIT.search(error) or (_JVM_OOM in error and any(s in error for s in _IN_A_TASK)):
        return MemoryShortage("an executor's JVM heap", "spark.executor.memory", SMALLER_PARTITIONS)
    if jvm_exit == JVM_OOM_EXIT or _JVM_OOM in error:
        less = "collect less to the driver (the stage's limits, docs/ARCHITECTURE.md)"
        return MemoryShortage("the driver's JVM heap", "spark.driver.memory", less)
    return None
