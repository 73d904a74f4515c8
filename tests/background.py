"""Work the suite starts in a thread and a test waits for later (the cluster run, the follow-ups of the
shared real run): the tests that need none of it run meanwhile, on the cores it leaves idle."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any


class Background:
    """`target(*args)` in a daemon thread, started now; `result()` waits for its value (or raises what it
    raised, in the test that waits). With `nice`, the thread and every process it starts run at that
    niceness: on Linux it is per thread, and a child inherits its parent thread's."""

    def __init__(self, name: str, target: Callable[..., Any], *args: Any, nice: int = 0) -> None:
        self._outcome: Any = None
        self._failed = False
        self._nice = nice
        self._thread = threading.Thread(target=self._run, args=(target, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, target: Callable[..., Any], args: tuple) -> None:
        if self._nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        try:
            self._outcome = target(*args)
        except BaseException as exc:  # handed to the test that waits
            self._outcome, self._failed = exc, True

    def result(self, timeout: float = 1800) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name} did not finish in {timeout} s")
        if self._failed:
            raise self._outcome
        return self._outcome

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
