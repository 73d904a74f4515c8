"""Build (or reuse) the SparkSession, with Delta Lake configured for local and standalone runs."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from pyspark.sql import SparkSession

from backforth_spark.core.config import SparkConfig
from backforth_spark.core.generation import Executors

log = logging.getLogger(__name__)

DRIVER_JAVA_OPTIONS = "spark.driver.extraJavaOptions"
# settings of conf/local.yaml that suit one small machine only: left out on any other master
LOCAL_ONLY = {
    "spark.databricks.delta.snapshotPartitions",  # one partition rebuilds a small table's state fastest
    "spark.sql.sources.parallelPartitionDiscovery.parallelism",  # few tasks list (and VACUUM) few files
}


def get_spark(cfg: SparkConfig) -> SparkSession:
    """The active session if there is one (Databricks, spark-submit), a Spark Connect session when
    SPARK_REMOTE names a server, else a new local or cluster session from `cfg`."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return supported(active)
    if os.environ.get("SPARK_REMOTE"):
        return supported(connect_session(cfg))
    # Python workers must run the project's interpreter, not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.app_name)
    # spark-submit's --master wins: a config written for local runs must not pull a submitted job
    # off its cluster
    if cfg.master and _submitted_master() is None:
        builder = builder.master(cfg.master)
    master = _submitted_master() or cfg.master or "local[*]"  # pyspark's default
    conf = conf_for_master(cfg, master)
    if cfg.class_archive and _launches_jvm():
        conf[DRIVER_JAVA_OPTIONS] = with_class_archive(conf.get(DRIVER_JAVA_OPTIONS, ""), cfg.class_archive)
    for key, value in conf.items():
        builder = builder.config(key, value)
    if cfg.configure_delta:
        builder = builder.config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension").config(
            "spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog"
        )
        if cfg.delta_jars and _launches_jvm():
            own = [jar for jar in cfg.conf.get("spark.jars", "").split(",") if jar]
            builder = builder.config("spark.jars", ",".join([*delta_jar_files(cfg.delta_jars), *own]))
        else:
            # imported here: a runtime that ships Delta (configure_delta false) needs no delta-spark wheel
            from delta import configure_spark_with_delta_pip

            builder = configure_spark_with_delta_pip(builder)
    session = builder.getOrCreate()
    _accumulator_errors_to_the_log(session)
    return supported(session)


# Spark lines the pipeline is built and tested for: 4.0 (Databricks Runtime 17.3 LTS, checked by
# `make lowest-spark`) to 4.2 (the embedded default's pin)
SUPPORTED_SPARK = ((4, 0), (4, 2))


class UnsupportedSpark(ValueError):
    """The session's Spark is outside SUPPORTED_SPARK."""


def supported(spark: SparkSession) -> SparkSession:
    """`spark`, once its Spark version is known to be in SUPPORTED_SPARK; else UnsupportedSpark, one line
    naming both versions (the CLI exits 2 with it, before any work)."""
    version = spark.version
    line = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_SPARK
    if len(line) < 2 or not low <= line <= high:
        raise UnsupportedSpark(
            f"Spark {version} is not supported: backforth-spark runs on Spark {low[0]}.{low[1]} to "
            f"{high[0]}.{high[1]} (Databricks Runtime 17.3 LTS to 19)"
        )
    return spark


def connect_session(cfg: SparkConfig) -> SparkSession:
    """A Spark Connect session to the server SPARK_REMOTE names. A client starts no JVM: the server
    has its own master, jars, memory and Delta, so of `cfg` only the SQL settings, which a Connect
    session may change for itself, are applied (one the server refuses is logged and skipped)."""
    session = SparkSession.builder.getOrCreate()
    for key, value in cfg.conf.items():
        if key.startswith("spark.sql.") and key != "spark.sql.extensions":
            try:
                session.conf.set(key, value)
            except Exception as exc:  # a static setting: the server's own value stands
                log.warning("%s=%s not applied to the Spark Connect session: %s", key, value, error_text(exc))
    return session


def is_connect(spark) -> bool:
    """Whether `spark` is a Spark Connect session (Databricks standard access mode and serverless,
    `SPARK_REMOTE`, `spark.api.mode=connect`): it has no SparkContext, accumulators or JVM gateway."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def spark_thread(spark, target, name: str, args: tuple = ()):
    """A daemon thread whose Spark jobs keep the caller's job tags and properties (pyspark's
    InheritableThread, which on Spark Connect must be handed the session)."""
    from pyspark import InheritableThread

    session = {"session": spark} if spark is not None and is_connect(spark) else {}
    return InheritableThread(target=target, args=args, name=name, daemon=True, **session)


def master(spark) -> str | None:
    """The session's master URL (`local[2]`, `spark://...`, `yarn`), or None where the server does not
    say (some Connect servers keep it to themselves)."""
    if not is_connect(spark):
        return spark.sparkContext.master
    try:
        return spark.conf.get("spark.master", None)
    except Exception:  # a server that refuses to show it
        return None


def is_local_master(spark) -> bool:
    """Whether the session runs in local mode (one JVM for driver and executors). An unknown master
    counts as a cluster: the safe side for checkpoints and resource profiles."""
    return (master(spark) or "").startswith("local")


def default_parallelism(spark) -> int:
    """How many tasks the session runs at once by default: the SparkContext's answer on a classic
    session; on Spark Connect `spark.default.parallelism`, else local[N]'s N, else
    `spark.sql.shuffle.partitions` (what the server's SQL plans use)."""
    if not is_connect(spark):
        return spark.sparkContext.defaultParallelism
    for read in (
        lambda: spark.conf.get("spark.default.parallelism", None),
        lambda: _local_threads(master(spark) or ""),
        lambda: spark.conf.get("spark.sql.shuffle.partitions", None),
    ):
        try:
            value = read()
        except Exception:
            continue
        if value is not None and str(value).isdigit() and int(value) > 0:
            return int(value)
    return 2


def _local_threads(master_url: str) -> int | None:
    """N of `local[N]` (or of `local[N,F]`); None for `local[*]` and any other master."""
    if master_url == "local":
        return 1
    inner = master_url.removeprefix("local[").partition("]")[0].partition(",")[0]
    return int(inner) if master_url.startswith("local[") and inner.isdigit() else None


def _accumulator_errors_to_the_log(spark: SparkSession) -> None:
    """Send the accumulator server's connection errors to the log, not the console. PySpark serves
    accumulator updates from a socket server thread whose error handler prints a traceback to stderr;
    when the JVM dies (of an out-of-memory error, say) that connection ends mid-read and the console
    would show an EOFError traceback above the run's own one-line reason."""
    if is_connect(spark):
        return
    server = getattr(spark.sparkContext, "_accumulatorServer", None)
    if server is not None:
        server.handle_error = lambda _request, address: log.warning(
            "accumulator connection from %s ended abnormally (the JVM stopped?)", address, exc_info=True
        )


def conf_for_master(cfg: SparkConfig, master: str) -> dict[str, str]:
    """The session settings of `cfg` for `master`: on any master but a local one, without those that
    suit one machine only (LOCAL_ONLY), each left out with a warning."""
    conf = dict(cfg.conf)
    if not master.startswith("local"):
        for key in sorted(LOCAL_ONLY & conf.keys()):
            log.warning("%s=%s suits one machine only; the %s master runs without it", key, conf[key], master)
            del conf[key]
    return conf


def delta_jar_files(folder: str) -> list[str]:
    """The jars in `folder` (spark.delta_jars), or a ValueError that says how to fill it."""
    jars = sorted(str(p.resolve()) for p in Path(os.path.expanduser(folder)).glob("*.jar"))
    if not jars:
        raise ValueError(
            f"spark.delta_jars={folder!r} holds no jars: run `make setup` (scripts/fetch_delta_jars.py "
            "fills it) or set spark.delta_jars=null to resolve them from Maven at start"
        )
    return jars


def with_class_archive(java_options: str, archive: str) -> str:
    """`java_options` plus the flag that maps the class-data archive `archive` (spark.class_archive);
    unchanged, with a warning, when the file is missing (the JVM then loads its classes itself)."""
    path = Path(os.path.expanduser(archive)).resolve()
    if not path.is_file():
        log.warning(
            "no JVM class archive at %s (`make setup` builds it): Spark starts a few seconds slower", path
        )
        return java_options
    return f"{java_options} -XX:SharedArchiveFile={path}".strip()


def _launches_jvm() -> bool:
    """True when this process starts its own JVM; False under spark-submit, whose flags gave the jars."""
    return "PYSPARK_GATEWAY_PORT" not in os.environ


def _submitted_master() -> str | None:
    """The master spark-submit was given, or None when this process starts its own JVM."""
    # spark-submit starts the JVM first and hands Python its gateway through this variable; only then
    # is there a launcher conf to read (asking otherwise would start a JVM before Delta's jars are set)
    if _launches_jvm():
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()
    return SparkConf().get("spark.master", None)


# the settings that bound a run's memory, read at its start for the sentence a shortage ends with
MEMORY_SETTINGS = (
    "spark.master",
    "spark.driver.memory",
    "spark.executor.memory",
    "spark.executor.memoryOverhead",
    "spark.executor.pyspark.memory",
)


def executors(spark) -> Executors | None:
    """What one executor offers a task, from the session's conf; None in local mode (one JVM, no task
    profiles). A key the conf does not hold is unknown (Databricks sets no spark.executor.cores)."""
    if is_local_master(spark):
        return None

    def read(key: str) -> float | None:
        try:
            value = spark.conf.get(key, None)
        except Exception:  # a Connect server that refuses to show it
            return None
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    cores = read("spark.executor.cores")
    return Executors(int(cores) if cores is not None else None, read("spark.executor.resource.gpu.amount"))


def memory_settings(spark: SparkSession) -> dict[str, str]:
    """The session's values of MEMORY_SETTINGS (those it sets)."""
    out = {}
    for key in MEMORY_SETTINGS:
        value = spark.conf.get(key, None)
        if value is not None:
            out[key] = value
    return out


# what a call into a dying JVM returns: the connection is gone, or the JVM answered while its shutdown
# hook was stopping Spark (a job cancelled "because SparkContext was shut down")
_DYING_JVM = (
    "Answer from Java side is empty",
    "Error while sending or receiving",
    "because SparkContext was shut down",
)


def error_text(exc: BaseException) -> str:
    """`str(exc)`, also for a Java error whose JVM is gone: py4j asks the JVM for its text, and a dead
    JVM makes that ask fail."""
    try:
        return str(exc)
    except Exception:
        return f"{type(exc).__name__} (its text is lost with the JVM that raised it)"


def lost_jvm(exc: BaseException) -> bool:
    """Whether `exc` says the driver's JVM is gone or going (it died under a call)."""
    from py4j.protocol import Py4JNetworkError

    text = error_text(exc)
    return isinstance(exc, Py4JNetworkError | ConnectionError) or any(sign in text for sign in _DYING_JVM)


def jvm_stopping(spark: SparkSession, exc: BaseException) -> bool:
    """Whether the driver's JVM is gone or on its way out after `exc`: the connection is lost, or the
    SparkContext is stopped (Spark's handler for a fatal error stops it while the JVM exits, and calls
    meanwhile fail with whatever half-stopped Spark raises)."""
    if lost_jvm(exc):
        return True
    if is_connect(spark):
        return False  # the server's JVM is not this process's: a lost connection was caught above
    jsc = getattr(spark.sparkContext, "_jsc", None)
    if jsc is None:
        return False
    try:
        return bool(jsc.sc().isStopped())
    except Exception:  # no answer: the JVM is gone
        return True


def launched_jvm_exit(wait_s: float = 10.0) -> int | None:
    """The exit code of the JVM this process launched, once it has exited (waiting up to `wait_s` for
    it to finish dying); None while it runs, or when this process did not launch it (spark-submit,
    Spark Connect)."""
    from pyspark import SparkContext

    proc = getattr(SparkContext._gateway, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return None


@contextlib.contextmanager
def tagged(spark, tag: str) -> Iterator[None]:
    """The Spark jobs started inside carry `tag` (Spark UI, event log). Tags, not job groups: Spark
    Connect has no SparkContext to set a group on."""
    spark.addTag(tag)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a JVM that died under the work cannot be told
            spark.removeTag(tag)
