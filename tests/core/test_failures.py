"""Running out of memory is one sentence naming what ran out and the setting to raise (the texts below
are the shapes Spark, YARN, Kubernetes and Python give those failures)."""

from __future__ import annotations

import pytest

from backforth_spark.core.failures import JVM_OOM_EXIT, memory_shortage

TASK_HEAP = (
    "Job aborted due to stage failure: Task 3 in stage 6.0 failed 4 times, most recent failure: Lost task "
    "3.3 in stage 6.0 (TID 40) (10.0.0.7 executor 2): java.lang.OutOfMemoryError: Java heap space\n"
    "\tat java.base/java.nio.HeapByteBuffer.<init>(HeapByteBuffer.java:64)"
)
EXECUTOR_EXIT_52 = (
    "Job aborted due to stage failure: Task 0 in stage 2.0 failed 4 times: ExecutorLostFailure (executor 5 "
    "exited caused by one of the running tasks) Reason: Remote RPC client disassociated. Likely due to "
    "containers exceeding thresholds, or network issues. exited with code 52"
)
YARN_KILL = (
    "Job aborted due to stage failure: ExecutorLostFailure (executor 9 exited caused by one of the running "
    "tasks) Reason: Container killed by YARN for exceeding physical memory limits. 9.1 GB of 9 GB used."
)
K8S_KILL = "ExecutorLostFailure (executor 3 exited caused by one of the running tasks) Reason: OOMKilled"
PYTHON = (
    "An exception was thrown from the Python worker. Please see the stack trace below.\n"
    'Traceback (most recent call last):\n  File "udfs/ingest.py", line 70, in run\n'
    "    rows.append(parsed.as_row())\nMemoryError\n"
)
DRIVER_CALL = (
    "An error occurred while calling o412.collectToPython.\n: java.lang.OutOfMemoryError: Java heap space"
)


@pytest.mark.parametrize(
    ("error", "local", "jvm_exit", "setting", "what"),
    [
        ("Answer from Java side is empty", True, JVM_OOM_EXIT, "spark.driver.memory", "JVM heap"),
        (TASK_HEAP, True, None, "spark.driver.memory", "JVM heap"),
        (TASK_HEAP, False, None, "spark.executor.memory", "executor's JVM heap"),
        (EXECUTOR_EXIT_52, False, None, "spark.executor.memory", "executor's JVM heap"),
        (YARN_KILL, False, None, "spark.executor.memoryOverhead", "container"),
        (K8S_KILL, False, None, "spark.executor.memoryOverhead", "container"),
        (PYTHON, True, None, "spark.executor.pyspark.memory", "Python worker"),
        (PYTHON, False, None, "spark.executor.pyspark.memory", "Python worker"),
        (DRIVER_CALL, False, None, "spark.driver.memory", "driver's JVM heap"),
        ("Answer from Java side is empty", False, JVM_OOM_EXIT, "spark.driver.memory", "driver's JVM heap"),
    ],
)
def test_each_kind_of_shortage_names_what_ran_out_and_its_setting(error, local, jvm_exit, setting, what):
    shortage = memory_shortage(error, local=local, jvm_exit=jvm_exit)
    assert shortage is not None and shortage.setting == setting and what in shortage.what


@pytest.mark.parametrize(
    ("error", "jvm_exit"),
    [
        ("Answer from Java side is empty", 1),  # the JVM died of something else
        ("ValueError: chunk.max_tokens must be positive", None),
        ("TABLE_OR_VIEW_NOT_FOUND: memory_table", None),  # a word is not a shortage
        ("PythonException: KeyError: 'MemoryErrorCount'", None),
    ],
)
def test_other_failures_are_not_called_a_shortage(error, jvm_exit):
    assert memory_shortage(error, local=True, jvm_exit=jvm_exit) is None


def test_the_sentence_is_one_line_with_the_value_and_the_override_to_raise_it():
    shortage = memory_shortage(TASK_HEAP, local=False)
    line = shortage.sentence({"spark.executor.memory": "6g"})
    assert "\n" not in line
    assert "spark.executor.memory=6g" in line and "--set spark.conf.spark.executor.memory=" in line


def test_an_unset_heap_is_named_with_sparks_default():
    line = memory_shortage(TASK_HEAP, local=True).sentence({})
    assert "spark.driver.memory=1g" in line
