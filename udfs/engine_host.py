"""One engine per assigned GPU set on a node, in a process of its own that serves every Python worker.

Why not inside the Python worker: Spark hands a task to whichever idle Python worker of its executor comes
first, and CUDA reads `CUDA_VISIBLE_DEVICES` once per process, so a worker whose engine sits on GPU 0
cannot serve a task Spark assigned GPU 2; and Spark stops idle Python workers (PythonWorkerFactory's
fixed one-minute timeout, Spark 4.2), which would take a loaded 70B model with them. So an LLM task that
was assigned GPUs talks to the *engine host* of exactly those addresses: a process started by the first
task that needs it, in a session of its own with `CUDA_VISIBLE_DEVICES` set to them, which loads the model
once and then answers every later task of any worker of the executor over a Unix socket. It stops when
its executor's JVM is gone, when no request came for `llm.engine_idle_s`, or when a task asks for other
engine settings (another model) on overlapping GPUs: the process exits, so every byte it held, GPU memory
included, is free before the next engine loads.

Files per host, in `llm.engine_host_dir` (default: a 0700 folder of this user under the node's temp
folder), named by its GPU addresses (`key`, e.g. "2" or "4-5-6-7"):
    host-<key>.lock  an flock the host holds for its whole life: held means alive (the kernel drops it
                     when the process dies, however it dies)
    host-<key>.json  its pid, owner (the executor's pid), engine identity, state (loading, ready),
                     socket and authentication key
    host-<key>.sock  the socket; host-<key>.log its log
and `hosts.lock`, held by a task while it looks at the hosts and starts one, so two tasks never start
the same host.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import logging
import os
import pickle
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Client, Listener
from pathlib import Path

from backforth_spark.core.engines.engine import (
    Completion,
    Conversation,
    Engine,
    FatalEngineError,
    GenerationParams,
    Prompt,
)

log = logging.getLogger(__name__)

POLL_S = 0.2
# what an engine host answers: the Engine protocol's calls (close is the host's own business)
CALLS = frozenset({"count_prompt_tokens", "chat", "complete"})


def default_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"backforth-engines-{os.getuid()}"


def host_key(devices: Sequence[str]) -> str:
    return "-".join(sorted(devices, key=lambda d: (len(d), d)))


def executor_pid() -> int:
    """The executor this Python worker serves: its nearest ancestor that is not a Python process (the
    executor's JVM; in local mode the driver's). A host outlives workers, never its executor."""
    pid = os.getppid()
    try:
        while pid > 1:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "java":
                return pid
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):  # no /proc (not Linux): the worker's parent
        pass
    return os.getppid()


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux), or it just went
        return True


# ---- the host's files ----------------------------------------------------------------------------


class _Files:
    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        self.lock = folder / f"host-{key}.lock"
        self.info = folder / f"host-{key}.json"
        self.socket = folder / f"host-{key}.sock"
        self.log = folder / f"host-{key}.log"

    def read_info(self) -> dict | None:
        try:
            return json.loads(self.info.read_text())
        except (OSError, ValueError):
            return None

    def write_info(self, info: dict) -> None:
        tmp = self.info.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the auth key
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.info)

    def held(self) -> bool:
        """Whether a live host holds this key's lock."""
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock this probe took
        return False

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _folder(path: str | Path | None) -> Path:
    folder = Path(path).expanduser() if path else default_folder()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def _hosts_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder / "hosts.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---- the host process ----------------------------------------------------------------------------


class _Host:
    """Answers clients, one thread per connection, one engine call at a time."""

    def __init__(self, engine: Engine, listener: Listener) -> None:
        self.engine, self.listener = engine, listener
        self.engine_lock = threading.Lock()
        self.stopping = threading.Event()
        self.last_used = time.monotonic()

    def idle_for(self) -> float:
        if self.engine_lock.locked():
            return 0.0
        return time.monotonic() - self.last_used

    def accept_forever(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except Exception:  # a client that failed authentication, or the listener closed
                if self.stopping.is_set():
                    return
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn) -> None:
        with conn:
            while True:
                try:
                    op, *args = conn.recv()
                except (EOFError, OSError):
                    return
                with self.engine_lock:
                    reply = self._call(op, args)
                    self.last_used = time.monotonic()
                try:
                    conn.send(reply)
                except OSError:
                    return

    def _call(self, op: str, args: list) -> tuple:
        if op == "stop":
            self.stopping.set()
            return ("ok", None)
        if op not in CALLS:
            return ("error", f"unknown engine call {op!r}")
        try:
            return ("ok", getattr(self.engine, op)(*args))
        except FatalEngineError as exc:
            return ("fatal", str(exc))
        except Exception as exc:  # the worker isolates the rows; the host stays up
            return ("error", f"{type(exc).__name__}: {exc}")


def serve(
    files: _Files, owner: int, idle_s: float, identity: str, devices: str, build: Callable[[], Engine]
) -> str:
    """Be the engine host of `files.key` until its owner dies, it idles `idle_s`, or a client asks it to
    stop; returns why it stopped. Raises when another live host holds the key."""
    lock_fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the starter made sure no host holds it
    authkey = secrets.token_bytes(32)
    info = {
        "pid": os.getpid(), "owner": owner, "identity": identity, "devices": devices,
        "socket": str(files.socket), "authkey": authkey.hex(), "state": "loading",
    }  # fmt: skip
    files.write_info(info)
    log.info("engine host on GPU(s) %s: loading", devices)
    engine = build()
    files.socket.unlink(missing_ok=True)
    listener = Listener(str(files.socket), family="AF_UNIX", authkey=authkey)
    host = _Host(engine, listener)
    threading.Thread(target=host.accept_forever, name="accept", daemon=True).start()
    files.write_info({**info, "state": "ready", "model": engine.model, "max_model_len": engine.max_model_len})
    log.info("engine host on GPU(s) %s: ready", devices)
    reason = "asked to stop"
    while not host.stopping.wait(POLL_S):
        if not _alive(owner):
            reason = f"its executor (pid {owner}) is gone"
            break
        if host.idle_for() > idle_s:
            reason = f"idle for {idle_s:.0f} s (llm.engine_idle_s)"
            break
    host.stopping.set()
    with host.engine_lock:  # a call in flight ends first
        files.info.unlink(missing_ok=True)
        files.socket.unlink(missing_ok=True)
        log.info("engine host on GPU(s) %s: stopping, %s", devices, reason)
        engine.close()
    return reason


def _build_engine(request: dict) -> Engine:
    """The engine a host serves: vLLM in this process, or `request["factory"]` ("module:function",
    called with the LLM config and the model: a test double that records the devices it was given)."""
    cfg, model = request["cfg"], request["model"]
    if request.get("factory"):
        module, _, function = request["factory"].partition(":")
        return getattr(importlib.import_module(module), function)(cfg, model)
    from backforth_spark.core.engines.vllm_engine import create_vllm_engine

    return create_vllm_engine(cfg, model, request["hub"].fetch(model))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="an engine host (started by an LLM task, not by hand)")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--owner", type=int, required=True)
    parser.add_argument("--idle-s", type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s")
    # the build request (config, model, the Hub with its token) comes on stdin: never in argv or a file
    request = pickle.load(sys.stdin.buffer)
    files = _Files(Path(args.folder), args.key)
    serve(
        files, args.owner, args.idle_s, request["identity"], request["devices"],
        lambda: _build_engine(request),
    )  # fmt: skip
    # vLLM may leave threads behind; the process's exit is what frees its memory
    logging.shutdown()
    os._exit(0)


# ---- the client side: what a Python worker's task uses ------------------------------------------


class HostedEngine:
    """The Engine protocol, answered by the engine host of this task's GPUs. `close` closes the
    connection only: the host keeps the model for the next task."""

    def __init__(self, conn, model: str, max_model_len: int, devices: str) -> None:
        self._conn = conn
        self.model, self.max_model_len, self.devices = model, max_model_len, devices

    def _call(self, op: str, *args):
        self._conn.send((op, *args))
        kind, value = self._conn.recv()
        if kind == "fatal":
            raise FatalEngineError(value)
        if kind == "error":
            raise RuntimeError(f"engine host on GPU(s) {self.devices}: {value}")
        return value

    def count_prompt_tokens(self, prompts: Sequence[Prompt]) -> list[int]:
        return self._call("count_prompt_tokens", list(prompts))

    def chat(
        self, conversations: Sequence[Conversation], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[Completion]:
        return self._call("chat", list(conversations), params)

    def complete(
        self, prompts: Sequence[str], params: GenerationParams | Sequence[GenerationParams]
    ) -> list[Completion]:
        return self._call("complete", list(prompts), params)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()


# hosts this worker started: polled so an exited one is reaped, not left a zombie
_STARTED: list[subprocess.Popen] = []


def hosted_engine(
    devices: Sequence[str],
    identity: str,
    request: dict,
    folder: str | Path | None,
    wait_s: float,
    idle_s: float,
    on_load: Callable[[], None] | None = None,
    fresh: bool = False,
    env: dict[str, str] | None = None,
    owner: int | None = None,
) -> HostedEngine:
    """A connection to the engine host of `devices` built from `identity`: the running one, or one
    started now (`on_load` is then called) once any host of other settings on these devices is gone.
    `request`: what the host builds its engine from (see _build_engine). `fresh`: stop a running host
    of this identity too (its engine failed every prompt). `env`: joins the host's environment.
    `owner`: the process whose end ends the host (default: this worker's executor)."""
    for proc in _STARTED[:]:
        if proc.poll() is not None:
            _STARTED.remove(proc)
    base = _folder(folder)
    key = host_key(devices)
    files = _Files(base, key)
    owner = owner if owner is not None else executor_pid()
    # a host serves the executor that started it: another application's executor on these GPUs
    # (they are the same GPUs) replaces it like another model would
    wanted = json.dumps({"engine": identity, "owner": owner})
    with _hosts_lock(base):
        for other in _overlapping(base, devices):
            info = other.read_info()
            same = other.key == key and info is not None and info.get("identity") == wanted
            if other.held() and (fresh or not same):
                _stop(other, info, wait_s)
        info = files.read_info()
        if not (info is not None and info.get("identity") == wanted and files.held()):
            proc = _start(files, owner, idle_s, {**request, "identity": wanted, "devices": key}, env)
            info = _wait(files, lambda i: i.get("pid") == proc.pid, wait_s, "start", proc)
            if on_load is not None:
                on_load()
    pid = info["pid"]
    ready = lambda i: i.get("pid") == pid and i.get("state") == "ready"  # noqa: E731
    info = _wait(files, ready, wait_s, "load its engine")
    conn = Client(info["socket"], family="AF_UNIX", authkey=bytes.fromhex(info["authkey"]))
    return HostedEngine(conn, info["model"], info["max_model_len"], key)


def _overlapping(folder: Path, devices: Sequence[str]) -> list[_Files]:
    """Every host whose files are in `folder` and whose GPUs include one of `devices`."""
    wanted = set(devices)
    found = []
    for path in folder.glob("host-*.lock"):
        key = path.name.removeprefix("host-").removesuffix(".lock")
        if wanted & set(key.split("-")):
            found.append(_Files(folder, key))
    return found


def _start(files: _Files, owner: int, idle_s: float, request: dict, env: dict[str, str] | None):
    """Start the host of `files.key`: a process in a session of its own (Spark's kill of a Python worker
    does not reach it), its GPUs the only ones CUDA shows it."""
    host_env = {
        **os.environ,
        **(env or {}),
        "CUDA_VISIBLE_DEVICES": request["devices"].replace("-", ","),
        # the worker's import path: the application's --py-files and the repo, as this worker has them
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    cmd = [
        sys.executable, "-m", "udfs.engine_host", "--folder", str(files.folder), "--key", files.key,
        "--owner", str(owner), "--idle-s", str(idle_s),
    ]  # fmt: skip
    with open(files.log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=host_env,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    _STARTED.append(proc)
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # a host that died at once: _wait reports its log
        proc.stdin.write(pickle.dumps(request))
        proc.stdin.close()
    return proc


def _wait(
    files: _Files,
    done: Callable[[dict], bool],
    wait_s: float,
    what: str,
    proc: subprocess.Popen | None = None,
) -> dict:
    """The host's info once `done(info)`; raises with the host's log when it exits first (`proc`, the
    host this worker just started, else the host's lock) or `wait_s` passes."""
    deadline = time.monotonic() + wait_s
    while True:
        info = files.read_info()
        if info is not None and done(info):
            return info
        # (a host just started holds no lock yet: its process tells; probing the lock then would race it)
        gone = proc.poll() is not None if proc is not None else not files.held()
        if gone or time.monotonic() > deadline:
            state = "exited" if gone else f"did not {what} within {wait_s:.0f} s (llm.engine_wait_s)"
            tail = files.log_tail()
            raise RuntimeError(f"the engine host on GPU(s) {files.key} {state}; its log ends:\n{tail}")
        time.sleep(POLL_S)


def _stop(files: _Files, info: dict | None, wait_s: float) -> None:
    """Ask a host to stop (an engine call in flight ends first) and wait until its process is gone; a
    host still loading, or one that does not stop within `wait_s`, is killed with its session."""
    if info is not None and info.get("state") == "ready":
        try:
            with Client(info["socket"], family="AF_UNIX", authkey=bytes.fromhex(info["authkey"])) as conn:
                conn.send(("stop",))
                conn.recv()
        except (OSError, EOFError, ValueError) as exc:
            log.warning("engine host on GPU(s) %s did not take a stop request: %s", files.key, exc)
    deadline = time.monotonic() + (wait_s if info is None or info.get("state") == "ready" else 0)
    while files.held() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if files.held():
        if info is None:
            raise RuntimeError(f"the engine host on GPU(s) {files.key} did not stop within {wait_s:.0f} s")
        log.warning("killing the engine host on GPU(s) %s (pid %s)", files.key, info.get("pid"))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(info["pid"], signal.SIGKILL)  # its session: vLLM's own processes too
        while files.held():
            time.sleep(POLL_S)


if __name__ == "__main__":
    main()
