"""One engine per GPU on a host, whichever Python worker holds it.

Spark keeps several Python workers per executor (one per concurrent task of any earlier stage) and gives
a task to whichever idle worker comes first, so consecutive LLM tasks of one stage land on different
workers. Each worker keeps the engine it built (udfs/generation.py), so without a claim a second worker
builds a second engine on a device whose memory the first, now idle, still holds: vLLM then refuses to
start (it finds less free memory than gpu_memory_utilization asks for) and the task fails.

A worker that builds an engine on GPUs first claims each device: an exclusive `flock` on a file per
device under the host's temp folder (the kernel drops it when the holder dies, so a killed worker never
strands a device). A worker that finds a device claimed leaves a request beside the lock and waits; the
holder's watcher thread sees it, and once the holder is between tasks it closes its engine and lets go.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

POLL_S = 0.2


def claim_folder() -> Path:
    """Where the host's claims live: shared by every Python worker of every Spark application of this
    user on the host (two applications on one GPU contend for it just the same)."""
    folder = Path(tempfile.gettempdir()) / f"backforth-gpu-claims-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


class DeviceClaim:
    """An exclusive claim on the devices `addresses` of this host; `acquire` waits for an idle holder
    to let go, `start_watching` lets this holder do the same for others."""

    def __init__(self, addresses: list[str], folder: Path | None = None):
        self.addresses = sorted(addresses)  # one order for everyone: two claimants never deadlock
        self.folder = folder or claim_folder()
        self._fds: list[int] = []
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    def _lock(self, address: str) -> Path:
        return self.folder / f"gpu-{address}.lock"

    def _request(self, address: str) -> Path:
        return self.folder / f"gpu-{address}.wanted"

    def acquire(self, timeout_s: float, on_wait: Callable[[str], None] | None = None) -> None:
        """Claim every device, asking each holder to let go; TimeoutError after `timeout_s` (a holder
        that stays inside a task that long)."""
        deadline = time.monotonic() + timeout_s
        for address in self.addresses:
            fd = os.open(self._lock(address), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited and on_wait is not None:
                        on_wait(address)
                    waited = True
                    # written again each time: another claimant that got the device meanwhile removed it
                    self._request(address).write_text(str(os.getpid()))
                    if time.monotonic() > deadline:
                        os.close(fd)
                        self.release()
                        raise TimeoutError(
                            f"GPU {address} stayed claimed by another Python worker for {timeout_s:.0f} s "
                            "(llm.device_wait_s)"
                        ) from None
                    time.sleep(POLL_S)
            self._fds.append(fd)
            if waited:
                self._request(address).unlink(missing_ok=True)

    def wanted(self) -> bool:
        """True when a live process waits for one of these devices."""
        for address in self.addresses:
            try:
                pid = int(self._request(address).read_text() or 0)
            except (OSError, ValueError):
                continue
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:  # a claimant that died waiting: nobody needs the device
                self._request(address).unlink(missing_ok=True)
                continue
            except PermissionError:
                pass
            return True
        return False

    def start_watching(self, idle: threading.Lock, let_go: Callable[[], None]) -> None:
        """Watch for requests from another worker; when one comes and `idle` can be taken (this worker is
        between tasks), call `let_go` (which must close the engine and `release` this claim)."""

        def watch() -> None:
            while not self._stop.wait(POLL_S):
                if self.wanted() and idle.acquire(blocking=False):
                    try:
                        if not self._stop.is_set():
                            let_go()
                    finally:
                        idle.release()
                    return

        self._watcher = threading.Thread(target=watch, name="gpu-claim-watcher", daemon=True)
        self._watcher.start()

    def release(self) -> None:
        """Let go of every device this claim holds."""
        self._stop.set()
        while self._fds:
            fd = self._fds.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
