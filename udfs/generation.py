"""Python-worker side of the LLM stages: one engine per worker, whole batches to it.

Engine lifecycle: the first task a Python worker runs for an LLM stage pins the worker to the GPU(s)
Spark assigned that task (`CUDA_VISIBLE_DEVICES`, set before vLLM or torch is imported), then builds
the engine and holds it. Spark reuses Python workers across tasks and stages, so later tasks on that
worker reuse the loaded model instead of loading it again. A worker holds one engine at a time: a stage
that runs another model (or other engine settings) closes the held engine first, freeing its memory.
Spark stops every idle Python worker of an executor once none of them has finished a task for
a minute (PythonWorkerFactory's fixed idle timeout, Spark 4.2), and the held engine goes with it: a gap
of more than a minute in which no task of the executor ends (a long MERGE between stages, a wait for another
executor's straggler) costs the next task a load. Each stage counts its loads (`engine_loads`).
An in-process engine on GPUs also claims its devices host-wide (udfs/device_claim.py): a worker that
gets a task for a device another, idle worker's engine holds asks it to close that engine first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import pandas as pd

from backforth_spark.core.config import LLMConfig
from backforth_spark.core.engines.engine import Engine
from backforth_spark.core.engines.openai_engine import OpenAIEngine
from backforth_spark.core.engines.vllm_engine import create_vllm_engine
from backforth_spark.core.generation import ENGINE_ERROR, TOO_LONG, StageSpec, run_batch
from backforth_spark.core.model import Hub
from udfs.device_claim import DeviceClaim

log = logging.getLogger(__name__)

# at most one entry: the engine of the last LLM stage this worker ran, by what it was built from
_HELD: dict[tuple, Engine] = {}
# the devices CUDA was pinned to: CUDA reads the variable once, so a worker never moves
_PINNED: list[str] = []
# the host-wide claim on the devices of the held engine (in-process vLLM on GPUs only)
_CLAIMS: list[DeviceClaim] = []
# held while a task of this worker runs: the claim's watcher closes the engine only between tasks
_IN_TASK = threading.Lock()


def assigned_gpus() -> list[str]:
    """The GPU addresses Spark assigned the running task (empty without stage-level scheduling)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    info = ctx.resources().get("gpu") if ctx is not None else None
    return list(info.addresses) if info is not None else []


def pin_gpus(addresses: list[str]) -> str | None:
    """Make only `addresses` visible to CUDA in this worker; returns the device label for the rows.

    A worker that already holds an engine on other devices keeps it: CUDA reads the variable once, at
    initialisation, so it cannot move. Spark hands a reused worker tasks of the same resource profile.
    """
    if not addresses:
        return os.environ.get("CUDA_VISIBLE_DEVICES") or None
    label = ",".join(addresses)
    if not _PINNED:
        os.environ["CUDA_VISIBLE_DEVICES"] = label
        _PINNED.append(label)
    return os.environ.get("CUDA_VISIBLE_DEVICES", label)


def create_engine(cfg: LLMConfig, model: str, api_key: str | None = None, hub: Hub | None = None) -> Engine:
    """The engine the config asks for: in-process vLLM, or a client of an OpenAI-compatible server
    (`api_key` is for the latter, resolved on the driver). A Hub model is fetched through `hub` first
    (its tokenizer alone for a server's client)."""
    hub = hub or Hub()
    if cfg.engine == "openai":
        return OpenAIEngine.from_config(cfg, model, api_key, hub.fetch(model, weights=False))
    return create_vllm_engine(cfg, model, hub.fetch(model))


def held_engine(
    cfg: LLMConfig,
    model: str,
    api_key: str | None,
    devices: list[str] | None = None,
    on_load: Callable[[], None] | None = None,
    hub: Hub | None = None,
) -> Engine:
    """The engine for (model, engine settings, key): the one this worker holds, or a new one built after
    the held one is released. `devices`: the GPUs this worker is pinned to, claimed before an in-process
    engine is built on them. `on_load` is called when an engine gets built."""
    key = (model, cfg.engine_identity(), api_key)
    if key not in _HELD:
        release_engine()
        if cfg.engine == "vllm" and devices:
            claim = DeviceClaim(devices)
            claim.acquire(cfg.device_wait_s, on_wait=lambda gpu: log.warning(WAITING, gpu))
            _CLAIMS.append(claim)
        if cfg.cpu_threads and cfg.engine == "vllm":
            # read by OpenMP when torch loads, which happens inside create_engine
            os.environ["OMP_NUM_THREADS"] = str(cfg.cpu_threads)
        try:
            _HELD[key] = create_engine(cfg, model, api_key, hub)
        except BaseException:
            release_engine()
            raise
        for claim in _CLAIMS:
            claim.start_watching(_IN_TASK, _let_go)
        if on_load is not None:
            on_load()
    return _HELD[key]


WAITING = "GPU %s holds another Python worker's engine: asking it to close it once idle"


def _let_go() -> None:
    log.warning("closing this worker's engine: another Python worker needs its GPU")
    release_engine()


def release_engine() -> None:
    """Close the engine this worker holds, if any (its model and GPU memory go with it), then let go of
    its devices."""
    while _HELD:
        _, engine = _HELD.popitem()
        engine.close()
    while _CLAIMS:
        _CLAIMS.pop().release()


def one_task(outputs: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """`outputs` with this worker marked busy, so a device claim's watcher waits for the task to end.
    Module level: the stage's closure is pickled by value, and a lock it referenced would not pickle."""
    with _IN_TASK:
        yield from outputs


# What each task reports about itself, in two columns of its last output row (null on every other
# row): its wall time, engine loading included, and the engines it built. The stage sums them from the
# rows it staged; accumulators would do it too, but Spark Connect has none.
TASK_SECONDS, TASK_ENGINE_LOADS = "_task_s", "_engine_loads"  # double, bigint


def with_task_metrics(frames: Iterator[pd.DataFrame], started: float, loads: list[int]):
    """`frames`, each held back until the next arrives, so the last one can carry the task's metrics
    (TASK_SECONDS, TASK_ENGINE_LOADS) once it is known to be the last. A task that yields no row
    reports nothing."""
    last = None
    for frame in frames:
        if last is not None:
            yield _metrics(last, None, None)
        last = frame
    if last is not None:
        yield _metrics(last, time.perf_counter() - started, loads[0])


def _metrics(frame: pd.DataFrame, seconds: float | None, loads: int | None) -> pd.DataFrame:
    """`frame` with TASK_SECONDS and TASK_ENGINE_LOADS: null, but on its last row `seconds`, `loads`."""
    task_s = pd.array([None] * len(frame), dtype="Float64")
    loaded = pd.array([None] * len(frame), dtype="Int64")
    if len(frame) and seconds is not None:
        task_s[-1], loaded[-1] = seconds, loads
    return frame.assign(**{TASK_SECONDS: task_s, TASK_ENGINE_LOADS: loaded})


def generate(
    spec: StageSpec,
    cfg: LLMConfig,
    engine_factory: Callable[[], Engine] | None = None,
    api_key: str | None = None,
    hub: Hub | None = None,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The mapInPandas function for one stage. `engine_factory` replaces vLLM (failure injection).
    Its rows are the stage's columns (without lineage), TASK_SECONDS and TASK_ENGINE_LOADS: the
    task's wall time, engine loading included, and the engines it built (a held one reused is not
    counted)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        started, loads = time.perf_counter(), [0]

        def loaded() -> None:
            loads[0] += 1

        yield from with_task_metrics(one_task(generate_all(batches, loaded)), started, loads)

    def new_engine(devices: list[str], fresh: bool, loaded: Callable[[], None]) -> Engine:
        if engine_factory:
            loaded()
            return engine_factory()
        if fresh:
            release_engine()
        return held_engine(cfg, spec.model, api_key, devices, on_load=loaded, hub=hub)

    def generate_all(batches: Iterator[pd.DataFrame], loaded: Callable[[], None]) -> Iterator[pd.DataFrame]:
        gpus = assigned_gpus()
        device = pin_gpus(gpus)
        # the GPUs the engine lands on are the pinned ones, which a reused worker keeps
        devices = device.split(",") if gpus and device else []
        engine = new_engine(devices, fresh=False, loaded=loaded)
        for batch in batches:
            for start in range(0, len(batch), cfg.batch_size):
                out = run_batch(batch.iloc[start : start + cfg.batch_size], engine, spec, device)
                yield out
                sent = out[out["status"] != TOO_LONG]
                if len(sent) and (sent["status"] == ENGINE_ERROR).all():
                    # every prompt failed, one by one too: the engine itself is likely gone (its
                    # process died, its server went away). Those rows are engine_error, retried on the
                    # next run; the next batch gets a new engine instead of failing the same way.
                    engine = new_engine(devices, fresh=True, loaded=loaded)

    return run
