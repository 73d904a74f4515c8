"""An engine double built inside an engine host (udfs/engine_host.py, `host_factory`): it records the
process and the GPUs it was given, and answers every prompt with one line naming them.

The model name steers it: "slow-<s>" loads for s seconds; "broken" fails to load; one ending in
"closes-slowly" takes 2 s to close. A prompt holding "BOOM" fails; one holding "FATAL" fails fatally."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from backforth_spark.core.engines.engine import Completion, FatalEngineError
from udfs.engine_host import _alive


def records(folder: Path) -> list[dict]:
    """What every double built in `folder`'s hosts recorded, oldest first."""
    found = [json.loads(p.read_text()) for p in Path(folder).glob("built-*.json")]
    return sorted(found, key=lambda r: r["at"])


def build(cfg, model: str):
    if model == "broken":
        raise OSError("no weights at /models/broken")
    if model.startswith("slow-"):
        time.sleep(float(model.removeprefix("slow-")))
    folder = Path(cfg.engine_host_dir)
    # the hosts alive when this one loaded (a host of other settings must be gone by then)
    alive = [r["pid"] for r in records(folder) if _alive(r["pid"])]
    record = {
        "pid": os.getpid(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "model": model,
        "at": time.time(), "alive_at_load": alive,
    }  # fmt: skip
    (folder / f"built-{os.getpid()}.json").write_text(json.dumps(record))
    return RecordingEngine(model, record["devices"], cfg.max_model_len)


class RecordingEngine:
    def __init__(self, model: str, devices: str | None, max_model_len: int) -> None:
        self.model, self.devices, self.max_model_len = model, devices, max_model_len

    def count_prompt_tokens(self, prompts):
        return [len(str(p).split()) for p in prompts]

    def _answer(self, prompts) -> list[Completion]:
        text = " ".join(str(p) for p in prompts)
        if "FATAL" in text:
            raise FatalEngineError("the server refused the key")
        if "BOOM" in text:
            raise RuntimeError("engine fell over")
        reply = f"What runs on GPU {self.devices} in process {os.getpid()}?"
        return [Completion(reply, "stop", 10, 8) for _ in prompts]

    def chat(self, conversations, params):
        return self._answer(conversations)

    def complete(self, prompts, params):
        return self._answer(prompts)

    def close(self) -> None:
        if self.model.endswith("closes-slowly"):  # as a large model's engine takes time to shut down
            time.sleep(2)
