"""A model server that redpen owns: a subprocess on a free loopback port, behind a key made for this process.

The laptop teacher (llama.cpp's ``llama-server``) and a GPU engine (``vllm serve``) are both OpenAI-compatible
servers; redpen starts one, waits until it answers its health check, talks to it through the ``openai`` backend,
and stops it. No server outlives redpen: the child is killed by the kernel when redpen dies (``PR_SET_PDEATHSIG``,
so a SIGKILL or a crash of redpen cannot leave it behind), and stopped at exit or on ``stop``.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import BackendError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_STOP_GRACE_S = 10.0  # a server drains its slots on SIGTERM; past this it is killed


@dataclass(frozen=True)
class ServerCommand:
    """How to start one server. ``argv`` and ``env`` values may hold ``{port}`` and ``{api_key}`` placeholders
    (the key is best passed in ``env``: a command line is visible to every user of the machine)."""

    name: str  # for messages: "the teacher (llama-server)"
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    health_path: str = "/health"  # answers 200 once the model is loaded (llama-server and vLLM both have it)
    startup_timeout_s: float = 600.0  # loading a model from a cold disk; the wait ends early if the process exits


class ManagedServer:
    """One running server. ``start`` blocks until it is healthy; ``stop`` ends it (and is safe to call twice)."""

    def __init__(self, command: ServerCommand, log_file: Path) -> None:
        self.command = command
        self.log_file = log_file
        self.api_key = secrets.token_urlsafe(24)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, on_wait: Callable[[float], None] | None = None) -> ManagedServer:
        """Start the server and wait for its health check; ``on_wait(seconds)`` is called while it loads."""
        self.port = free_port()
        values = {"port": str(self.port), "api_key": self.api_key}
        argv = [part.format(**values) for part in self.command.argv]
        env = {**os.environ, **{k: v.format(**values) for k, v in self.command.env.items()}}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s on port %d: %s (log %s)", self.command.name, self.port, " ".join(argv), self.log_file)
        with self.log_file.open("ab") as sink:
            try:
                self._process = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches redpen, which stops the server itself
                    preexec_fn=_die_with_parent,
                )
            except OSError as error:
                raise BackendError(f"cannot start {self.command.name} ({argv[0]}): {error.strerror}") from None
        atexit.register(self.stop)
        self._wait_healthy(on_wait)
        log.info("%s is up at %s", self.command.name, self.base_url)
        return self

    def check(self) -> None:
        """Raise one clear line if the server is not running (it exited, or was never started)."""
        if self._process is None:
            raise BackendError(f"{self.command.name} is not running")
        if self._process.poll() is not None:
            message = self._exit_message()
            self._process = None
            atexit.unregister(self.stop)
            raise BackendError(message)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.info("%s stopped (exit %s)", self.command.name, process.returncode)

    def __enter__(self) -> ManagedServer:
        return self if self._process is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_healthy(self, on_wait: Callable[[float], None] | None) -> None:
        started = time.monotonic()
        url = f"http://127.0.0.1:{self.port}{self.command.health_path}"
        while True:
            self.check()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own loopback server
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            waited = time.monotonic() - started
            if waited > self.command.startup_timeout_s:
                self.stop()
                raise BackendError(
                    f"{self.command.name} did not answer {self.command.health_path} within "
                    f"{self.command.startup_timeout_s:.0f} s; its log: {self.log_file}"
                )
            if on_wait is not None:
                on_wait(waited)
            time.sleep(0.25)

    def _exit_message(self) -> str:
        assert self._process is not None
        code = self._process.returncode
        return f"{self.command.name} exited (code {code}): {last_line(self.log_file)} (its log: {self.log_file})"


def free_port() -> int:
    """A port free on loopback now (the server binds it a moment later; a clash makes it exit, and start says so)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def last_line(path: Path) -> str:
    """The last non-empty line of a log, for a one-line error."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4096))
            lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends SIGKILL when the parent exits, however it exits (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: atexit and stop() still end it on a normal exit
        pass
