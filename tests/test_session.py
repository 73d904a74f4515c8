from __future__ import annotations

import pytest

from backforth_spark.session import delta_jar_files
from tests.conftest import REPO


def test_a_local_session_takes_the_delta_jars_from_the_setup_folder_not_the_resolver(spark):
    conf = spark.sparkContext.getConf()
    jars = conf.get("spark.jars").split(",")
    assert any("delta-spark_4.2_2.13-4.4.0.jar" in jar for jar in jars)
    assert all(str((REPO / ".tools" / "delta-jars").resolve()) in jar for jar in jars)
    assert conf.get("spark.jars.packages", None) is None
    # Delta's classes load from those jars: the session can build a Delta table
    assert spark.sql("SELECT 1 AS x").count() == 1
    assert spark._jvm.io.delta.tables.DeltaTable is not None


def test_the_local_driver_jvm_runs_with_c1_only(spark):
    runtime = spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
    assert "-XX:TieredStopAtLevel=1" in list(runtime.getInputArguments())


def test_an_empty_delta_jars_folder_is_an_error_that_says_how_to_fill_it(tmp_path):
    (tmp_path / "notes.txt").write_text("no jars here")
    with pytest.raises(ValueError, match=r"holds no jars: run `make setup`"):
        delta_jar_files(str(tmp_path))


def test_delta_jars_are_every_jar_in_the_folder_as_absolute_paths(tmp_path):
    for name in ("b.jar", "a.jar", "readme.md"):
        (tmp_path / name).write_text("")
    assert delta_jar_files(str(tmp_path)) == [str(tmp_path / "a.jar"), str(tmp_path / "b.jar")]
