"""Python-worker side of the LLM stages: whole batches to one engine per worker or per GPU set.

Where the engine lives:
- A task Spark assigned GPUs (stage-level scheduling on a cluster) talks to the engine host of exactly
  those GPU addresses (udfs/engine_host.py): a process of the node, started by the first task that needs
  it, that loads the model once and serves every later task of any Python worker of the executor. An
  executor with N GPUs runs N hosts side by side; no task waits on a GPU it was not assigned, and Spark's
  reaping of idle Python workers (a fixed one-minute timeout, Spark 4.2) does not take the model along.
- Without assigned GPUs (local mode, CPU executors) the worker builds the engine itself and holds it:
  Spark reuses Python workers across tasks and stages, so later tasks on that worker reuse the loaded
  model. A worker holds one engine at a time: a stage that runs another model (or other engine
  settings) closes the held engine first. A worker Spark reaps takes its engine with it, and the next
  task on a new worker loads the model again.
- `llm.engine: openai`: a client of a server, built per worker (nothing to load but a tokenizer).
Each stage counts the engines its tasks built or started (`engine_loads`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

import pandas as pd

from backforth_spark.core.config import LLMConfig
from backforth_spark.core.engines.engine import Engine
from backforth_spark.core.engines.openai_engine import OpenAIEngine
from backforth_spark.core.engines.vllm_engine import create_vllm_engine
from backforth_spark.core.generation import ENGINE_ERROR, TOO_LONG, StageSpec, run_batch
from backforth_spark.core.model import Hub
from udfs.engine_host import hosted_engine

log = logging.getLogger(__name__)

# at most one entry: the engine of the last LLM stage this worker ran, by what it was built from
_HELD: dict[tuple, Engine] = {}


def assigned_gpus() -> list[str]:
    """The GPU addresses Spark assigned the running task (empty without stage-level scheduling)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    info = ctx.resources().get("gpu") if ctx is not None else None
    return list(info.addresses) if info is not None else []


def device_label(addresses: list[str]) -> str | None:
    """The devices a task's rows were generated on: its assigned GPUs, else what CUDA shows the worker."""
    return ",".join(addresses) if addresses else os.environ.get("CUDA_VISIBLE_DEVICES") or None


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
    on_load: Callable[[], None] | None = None,
    hub: Hub | None = None,
) -> Engine:
    """The engine for (model, engine settings, key): the one this worker holds, or a new one built after
    the held one is released. `on_load` is called when an engine gets built."""
    key = (model, cfg.engine_identity(), api_key)
    if key not in _HELD:
        release_engine()
        if cfg.cpu_threads and cfg.engine == "vllm":
            # read by OpenMP when torch loads, which happens inside create_engine
            os.environ["OMP_NUM_THREADS"] = str(cfg.cpu_threads)
        _HELD[key] = create_engine(cfg, model, api_key, hub)
        if on_load is not None:
            on_load()
    return _HELD[key]


def engine_on_gpus(
    cfg: LLMConfig,
    model: str,
    gpus: list[str],
    hub: Hub | None,
    on_load: Callable[[], None],
    fresh: bool = False,
    host_factory: str | None = None,
) -> Engine:
    """A connection to the engine host of `gpus` (udfs/engine_host.py) for (model, engine settings):
    the running one, or one started now. `host_factory` ("module:function") builds a test double in
    the host instead of vLLM."""
    request = {"cfg": cfg, "model": model, "hub": hub or Hub(), "factory": host_factory}
    identity = f"{model} {cfg.engine_identity()} {host_factory or ''}"
    env = {"OMP_NUM_THREADS": str(cfg.cpu_threads)} if cfg.cpu_threads else {}
    return hosted_engine(
        gpus, identity, request, cfg.engine_host_dir, cfg.engine_wait_s, cfg.engine_idle_s,
        on_load=on_load, fresh=fresh, env=env,
    )  # fmt: skip


def release_engine() -> None:
    """Close the engine this worker holds, if any (its model and memory go with it)."""
    while _HELD:
        _, engine = _HELD.popitem()
        engine.close()


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
    host_factory: str | None = None,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The mapInPandas function for one stage. `engine_factory` replaces vLLM in the worker, and
    `host_factory` ("module:function") in the engine hosts of GPU tasks (failure injection, recording
    doubles). Its rows are the stage's columns (without lineage), TASK_SECONDS and TASK_ENGINE_LOADS:
    the task's wall time, engine loading included, and the engines it built or started (a held engine
    or a running host reused is not counted)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        started, loads = time.perf_counter(), [0]

        def loaded() -> None:
            loads[0] += 1

        yield from with_task_metrics(generate_all(batches, loaded), started, loads)

    def new_engine(gpus: list[str], fresh: bool, loaded: Callable[[], None]) -> Engine:
        if engine_factory:
            loaded()
            return engine_factory()
        if gpus and cfg.engine == "vllm":
            return engine_on_gpus(cfg, spec.model, gpus, hub, loaded, fresh, host_factory)
        if fresh:
            release_engine()
        return held_engine(cfg, spec.model, api_key, on_load=loaded, hub=hub)

    def generate_all(batches: Iterator[pd.DataFrame], loaded: Callable[[], None]) -> Iterator[pd.DataFrame]:
        gpus = assigned_gpus()
        device = device_label(gpus)
        engine = new_engine(gpus, fresh=False, loaded=loaded)
        hosted = bool(gpus) and cfg.engine == "vllm" and not engine_factory
        try:
            for batch in batches:
                for start in range(0, len(batch), cfg.batch_size):
                    out = run_batch(batch.iloc[start : start + cfg.batch_size], engine, spec, device)
                    yield out
                    sent = out[out["status"] != TOO_LONG]
                    if len(sent) and (sent["status"] == ENGINE_ERROR).all():
                        # every prompt failed, one by one too: the engine itself is likely gone (its
                        # process died, its server went away). Those rows are engine_error, retried on
                        # the next run; the next batch gets a new engine instead of failing the same way.
                        if hosted:
                            engine.close()
                        engine = new_engine(gpus, fresh=True, loaded=loaded)
        finally:
            if hosted:  # the connection only: the host keeps the model for the next task
                engine.close()

    return run
