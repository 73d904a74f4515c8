from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from backforth_spark.core.config import load_config
from backforth_spark.spark.session import conf_for_master, delta_jar_files, with_class_archive
from tests.conftest import LOCAL_CONF, REPO


def test_a_local_session_takes_the_delta_jars_from_the_setup_folder_not_the_resolver(spark, tmp_path):
    conf = spark.sparkContext.getConf()
    jars = conf.get("spark.jars").split(",")
    assert any("delta-spark_4.2_2.13-4.4.0.jar" in jar for jar in jars)
    assert all(str((REPO / ".tools" / "delta-jars").resolve()) in jar for jar in jars)
    assert conf.get("spark.jars.packages", None) is None
    # Delta's classes load from those jars: the session writes and reads a Delta table
    spark.range(3).write.format("delta").save(str(tmp_path / "t"))
    assert (tmp_path / "t" / "_delta_log").is_dir()
    assert spark.read.format("delta").load(str(tmp_path / "t")).count() == 3


def test_the_suites_session_options_reach_the_jvm(spark):
    # tests/conftest.py adds the serial collector to the driver's options
    arguments = list(spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    assert "-XX:+UseSerialGC" in arguments
    # and keeps both JIT compilers: the short-lived JVMs' C1-only option (SPARK_SUBMIT_OPTS) is not its
    assert not any("TieredStopAtLevel" in argument for argument in arguments)


def test_the_local_config_keeps_the_jvms_default_jit():
    # C1 alone (TieredStopAtLevel=1) has a 48 MB code cache that a long run fills, after which the JVM
    # stops compiling: no JIT setting in the embedded default
    spark = load_config(LOCAL_CONF).spark
    options = [v for k, v in {**spark.conf, **spark.long_lived_conf}.items() if "JavaOptions" in k]
    assert not any("TieredStopAtLevel" in option for option in options)


def test_a_long_lived_process_lays_its_settings_over_the_others():
    spark = load_config(
        LOCAL_CONF,
        ["spark.long_lived_conf.spark.driver.extraJavaOptions=-XX:+UseSerialGC",
         "spark.conf.spark.driver.extraJavaOptions=-Xss4m"],
    ).spark  # fmt: skip
    long_lived = spark.long_lived().conf
    assert long_lived["spark.driver.extraJavaOptions"] == "-XX:+UseSerialGC"
    assert {k: v for k, v in long_lived.items() if k != "spark.driver.extraJavaOptions"} == {
        k: v for k, v in spark.conf.items() if k != "spark.driver.extraJavaOptions"
    }


def test_an_empty_delta_jars_folder_is_an_error_that_says_how_to_fill_it(tmp_path):
    (tmp_path / "notes.txt").write_text("no jars here")
    with pytest.raises(ValueError, match=r"holds no jars: run `make setup`"):
        delta_jar_files(str(tmp_path))


def test_delta_jars_are_every_jar_in_the_folder_as_absolute_paths(tmp_path):
    for name in ("b.jar", "a.jar", "readme.md"):
        (tmp_path / name).write_text("")
    assert delta_jar_files(str(tmp_path)) == [str(tmp_path / "a.jar"), str(tmp_path / "b.jar")]


def test_the_local_driver_jvm_maps_the_class_archive_that_setup_built(spark):
    archive = (REPO / ".tools" / "spark-classes.jsa").resolve()
    runtime = spark._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
    assert f"-XX:SharedArchiveFile={archive}" in list(runtime.getInputArguments())
    # -Xshare:on turns an archive the JVM would quietly ignore (another JVM build, another class path)
    # into an error: the archive fits this JVM and this session's class path
    classpath = spark._jvm.java.lang.System.getProperty("java.class.path")
    java = Path(spark._jvm.java.lang.System.getProperty("java.home")) / "bin" / "java"
    check = [str(java), "-Xshare:on", f"-XX:SharedArchiveFile={archive}", "-cp", classpath, "-version"]
    done = subprocess.run(check, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_class_archive_flag_is_added_to_the_driver_options_with_an_absolute_path(tmp_path):
    (tmp_path / "classes.jsa").write_bytes(b"archive")
    options = with_class_archive("-XX:TieredStopAtLevel=1", str(tmp_path / "classes.jsa"))
    assert options == f"-XX:TieredStopAtLevel=1 -XX:SharedArchiveFile={tmp_path / 'classes.jsa'}"


def test_a_missing_class_archive_leaves_the_driver_options_as_they_are_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="backforth_spark.spark.session"):
        options = with_class_archive("-XX:TieredStopAtLevel=1", str(tmp_path / "absent.jsa"))
    assert options == "-XX:TieredStopAtLevel=1"
    assert "no JVM class archive" in caplog.text and "make setup" in caplog.text


def test_settings_for_one_machine_are_left_out_with_a_warning_on_a_cluster_master(caplog):
    spark = load_config(LOCAL_CONF).spark
    assert "spark.databricks.delta.snapshotPartitions" in conf_for_master(spark, "local[2]")
    with caplog.at_level(logging.WARNING, logger="backforth_spark.spark.session"):
        on_cluster = conf_for_master(spark, "spark://10.0.0.1:7077")
    assert "spark.databricks.delta.snapshotPartitions" not in on_cluster
    assert on_cluster["spark.driver.memory"] == spark.conf["spark.driver.memory"]  # the rest stays
    assert "snapshotPartitions=1 suits one machine only" in caplog.text


class _Reports:
    """Stands in for a session that reports a Spark version (the check reads nothing else)."""

    def __init__(self, version: str) -> None:
        self.version = version


@pytest.mark.parametrize("version", ["4.0.0", "4.1.1", "4.2.0", "4.2.0-databricks"])
def test_a_spark_in_the_supported_range_is_accepted(version):
    from backforth_spark.spark.session import supported

    session = _Reports(version)
    assert supported(session) is session


@pytest.mark.parametrize("version", ["3.5.2", "4.3.0", "5.0.0"])
def test_a_spark_outside_the_supported_range_is_one_line_naming_both_versions(version):
    from backforth_spark.spark.session import UnsupportedSpark, supported

    with pytest.raises(UnsupportedSpark) as err:
        supported(_Reports(version))
    assert str(err.value).count("\n") == 0
    assert version in str(err.value) and "4.0 to 4.2" in str(err.value)


@pytest.mark.parametrize(
    ("master", "threads"),
    [("local", 1), ("local[3]", 3), ("local[4,2]", 4), ("local[*]", None), ("yarn", None)],
)
def test_the_threads_of_a_local_master(master, threads):
    from backforth_spark.spark.session import _local_threads

    assert _local_threads(master) == threads


def test_a_classic_session_is_not_a_connect_one_and_knows_its_master(spark):
    from backforth_spark.spark.session import default_parallelism, is_connect, is_local_master

    assert not is_connect(spark) and is_local_master(spark)
    assert default_parallelism(spark) == spark.sparkContext.defaultParallelism
