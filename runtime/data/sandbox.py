"""Run untrusted programs (model-written code and its tests) one process each, under bubblewrap.

Model-written code is hostile input. Each program runs in its own ``bwrap`` sandbox: every namespace unshared (no
network but an empty loopback, its own PIDs, no further user namespaces), the system folders bound read-only
(``/usr`` and its ``/bin``, ``/lib*`` links, a few files of ``/etc``), an empty size-capped tmpfs as home and working
directory, nothing else of the machine visible, the environment cleared, a new session, and killed with its parent.
Inside, before the program starts, hard rlimits cap CPU time, address space, processes, file size and open files; a
wall-clock timeout kills the whole process group, and output past a cap stops it too.

A program passes only when it exits 0 *and* its last line of output is a marker that is random per run and printed
by the harness after the program's last statement (the tests): a program that calls ``sys.exit(0)`` or
``os._exit(0)`` before the tests end, or prints a guessed marker, fails. The marker lives in the harness, in the
same interpreter as the program, so code that walks the interpreter's frames could find it: the sandbox bounds
what such code can do, the marker stops early exits and forged output.

``Sandbox("none")`` runs the same harness with the same rlimits, environment and a temporary working directory,
but with no namespaces: the program sees the machine. It is for machines without bubblewrap, on explicit request,
and logs a warning whenever it is made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from runtime.errors import ConfigError

log = logging.getLogger(__name__)

SandboxMode = Literal["bwrap", "none"]
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)"
UNSANDBOXED_WARNING = (
    "--sandbox none: model-written programs run UNSANDBOXED, with your user's access to this machine "
    "(only rlimits and a timeout apply)"
)
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The /etc files a Python interpreter reads: the loader cache, the time zone, and Debian's alternatives links.
_ETC = ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives")
_HOME = "/sandbox"
NOBODY = 65534  # the uid and gid programs run as inside the sandbox (and outside it, when redpen runs as root)
_TAIL = 64 * 1024  # bytes of stdout and of stderr kept: the marker is the last line, the error the last lines
_ERROR_LINES = 20  # lines of stderr a failed program's error tail shows
_LINE = 300  # characters of each of those lines (a reply that repeats itself makes one very long line)
_HARNESS_FRAME = re.compile(r'^  File "<string>", line \d+, in (?:<module>|main)$')  # and no source line follows

# Runs inside the sandbox: reads the job from stdin (which then reads as empty), caps itself, runs the program in a
# fresh namespace, and only if it ends normally writes the marker. The program's lines show in tracebacks.
_HARNESS = r"""
import json, linecache, os, resource, sys
def main():
    job = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for name, value in job["limits"].items():
        resource.setrlimit(getattr(resource, name), (value[0], value[1]))
    source = job["program"]
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    namespace = {"__name__": "__program__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "<program>", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.exit(1)
    sys.stdout.flush()
    os.write(1, ("\n" + job["marker"] + "\n").encode())
main()
"""


@dataclass(frozen=True)
class Limits:
    """What one program may use. The values fit benchmark tests (MBPP, HumanEval), which finish in well under 1 s."""

    cpu_s: int = 5  # CPU seconds per process (SIGXCPU); HumanEval's own harness allows 3 s of wall time
    wall_s: float = 15.0  # wall clock for the whole sandbox, startup included, on a loaded 2-core machine
    memory_mb: int = 1024  # address space per process; a Python interpreter needs ~30 MB of it
    processes: int = 16  # processes and threads of the sandbox's user: stops fork bombs
    file_mb: int = 16  # largest file the program may write (in its tmpfs)
    open_files: int = 64
    output_kb: int = 1024  # stdout and stderr, each; past this the program is stopped
    tmpfs_mb: int = 64  # size of the home / working directory

    def rlimits(self) -> dict[str, tuple[int, int]]:
        """Hard rlimits as the harness sets them; CPU gets a 1 s grace so the soft limit's SIGXCPU is what stops it."""
        mib = 2**20
        return {
            "RLIMIT_CPU": (self.cpu_s, self.cpu_s + 1),
            "RLIMIT_AS": (self.memory_mb * mib, self.memory_mb * mib),
            "RLIMIT_NPROC": (self.processes, self.processes),
            "RLIMIT_FSIZE": (self.file_mb * mib, self.file_mb * mib),
            "RLIMIT_NOFILE": (self.open_files, self.open_files),
        }


@dataclass(frozen=True)
class Run:
    """One program's outcome: ``reason`` says why it failed ("passed" when it did), ``error`` is its stderr tail."""

    passed: bool
    reason: str
    error: str
    seconds: float
    returncode: int | None


class Sandbox:
    """Runs programs one process each; ``arun`` runs up to ``workers`` at once (default: the cores) off the loop."""

    def __init__(self, mode: str = "bwrap", limits: Limits | None = None, workers: int | None = None) -> None:
        if mode not in get_args(SandboxMode):
            raise ConfigError(f"unknown --sandbox {mode!r}: choose bwrap or none")
        self.mode = mode
        self.limits = limits or Limits()
        self.workers = workers or len(os.sched_getaffinity(0))
        self.python = _interpreter()
        self._executor: ThreadPoolExecutor | None = None
        self._bwrap: list[str] = []
        # As root, bubblewrap runs as nobody: the kernel does not count root's processes against RLIMIT_NPROC, even
        # mapped into a user namespace, so a fork bomb would only meet the timeout.
        self._as = NOBODY if mode == "bwrap" and os.geteuid() == 0 else None
        if mode == "bwrap":
            self._bwrap = self._bwrap_command()
            self._probe()
        else:
            log.warning(UNSANDBOXED_WARNING)

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "python": self.python, "workers": self.workers, **vars(self.limits)}

    def run(self, program: str) -> Run:
        """Run one program to its end, its timeout or its output cap; never raises for what the program does."""
        marker = secrets.token_hex(16)
        job = json.dumps({"program": program, "marker": marker, "limits": self.limits.rlimits()}).encode()
        workdir = None if self.mode == "bwrap" else tempfile.mkdtemp(prefix="redpen-program-")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                [*self._bwrap, self.python, "-s", "-B", "-c", _HARNESS],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir or "/",
                env=None if self.mode == "bwrap" else _environment(workdir or _HOME),
                start_new_session=True,  # its own process group, killed whole
                user=self._as,
                group=self._as,
                extra_groups=None if self._as is None else [],
            )
            stdout, stderr, stopped = self._communicate(proc, job, started)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        seconds = round(time.monotonic() - started, 3)
        returncode = proc.returncode
        error = _tail(stderr)
        last_line = stdout.rstrip(b"\n").rpartition(b"\n")[2]
        if stopped:
            return Run(False, stopped, error, seconds, returncode)
        if returncode == 0 and last_line == marker.encode():
            return Run(True, "passed", "", seconds, returncode)
        return Run(False, self._reason(returncode, error, last_line == marker.encode()), error, seconds, returncode)

    async def arun(self, program: str) -> Run:
        """:meth:`run` in a worker thread, so the event loop (and the model) keeps going; ``workers`` at once."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="redpen-sandbox")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run, program)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ---- internals -----------------------------------------------------------------------------------------------

    def _communicate(self, proc: subprocess.Popen[bytes], job: bytes, started: float) -> tuple[bytes, bytes, str]:
        """Feed the job, collect the output tails; stop the group on timeout or output cap ("" when neither)."""
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        cap = self.limits.output_kb * 1024
        tails = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b""}
        totals = dict.fromkeys(tails, 0)
        pending = memoryview(job)
        stopped = ""
        stdin = proc.stdin.fileno()
        os.set_blocking(stdin, False)
        with selectors.DefaultSelector() as selector:
            selector.register(stdin, selectors.EVENT_WRITE)
            for fd in tails:
                selector.register(fd, selectors.EVENT_READ)
            while len(selector.get_map()) > 0 and not stopped:
                left = started + self.limits.wall_s - time.monotonic()
                if left <= 0:
                    stopped = f"timed out after {self.limits.wall_s:g} s (wall clock)"
                    break
                ready = selector.select(min(left, 0.2))
                if not ready and proc.poll() is not None:
                    break  # the program ended; whatever it left behind holds the pipes open (--sandbox none)
                for key, _ in ready:
                    fd = key.fd
                    if fd == stdin:
                        try:
                            pending = pending[os.write(fd, pending[:65536]) :]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            selector.unregister(fd)
                            proc.stdin.close()
                        continue
                    data = os.read(fd, 65536)
                    if not data:
                        selector.unregister(fd)
                        continue
                    totals[fd] += len(data)
                    tails[fd] = (tails[fd] + data)[-_TAIL:]
                    if totals[fd] > cap:
                        name = "stdout" if fd == proc.stdout.fileno() else "stderr"
                        stopped = f"output limit: over {self.limits.output_kb} KiB on {name}"
                        break
        _kill_group(proc.pid)  # also what the program left behind once it exited
        proc.wait()
        out, err = tails[proc.stdout.fileno()], tails[proc.stderr.fileno()]
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        return out, err, stopped

    def _reason(self, returncode: int | None, error: str, marker_seen: bool) -> str:
        signum = None
        if returncode is not None and returncode < 0:
            signum = -returncode
        elif self.mode == "bwrap" and returncode is not None and returncode > 128:
            signum = returncode - 128  # bwrap exits 128 + N when its program died of signal N
        if signum == signal.SIGXCPU:
            return f"CPU time limit ({self.limits.cpu_s} s)"
        if signum is not None:
            return f"killed by signal {signal.Signals(signum).name}" if signum in _SIGNALS else f"signal {signum}"
        last = _last_said(error)
        if returncode == 0:
            return "ended with output after the marker" if marker_seen else "exited before the tests finished"
        if last.startswith("bwrap:"):
            return f"sandbox failed: {last}"
        if last:
            return last[:200]
        return f"exit status {returncode}"

    def _bwrap_command(self) -> list[str]:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise ConfigError(
                "code tasks run model-written programs under bubblewrap, and `bwrap` is not installed: "
                f"{INSTALL_HINT}, or pass --sandbox none to run them unsandboxed"
            )
        command = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
        command += ["--uid", str(NOBODY), "--gid", str(NOBODY), "--clearenv"]
        for name, value in _environment(_HOME).items():
            command += ["--setenv", name, value]
        for path in _SYSTEM:
            if os.path.islink(path):
                command += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                command += ["--ro-bind", path, path]
        for path in _ETC:
            command += ["--ro-bind-try", path, path]
        prefix = _outside_system(self.python)
        if prefix is not None:  # an interpreter outside the system folders: its own install, read-only
            command += ["--ro-bind", prefix, prefix]
        command += ["--proc", "/proc", "--dev", "/dev"]
        command += ["--size", str(self.limits.tmpfs_mb * 2**20), "--tmpfs", _HOME, "--chdir", _HOME, "--"]
        return command

    def _probe(self) -> None:
        """Start one empty sandbox: a kernel without user namespaces fails here, with bwrap's own words."""
        try:
            done = subprocess.run(
                [*self._bwrap, self.python, "-c", "pass"],
                capture_output=True,
                timeout=30,
                check=False,
                user=self._as,
                group=self._as,
                extra_groups=None if self._as is None else [],
            )
        except subprocess.TimeoutExpired:
            raise ConfigError("bubblewrap did not start a sandbox within 30 s; check `bwrap --version`") from None
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip().splitlines()
            raise ConfigError(
                f"bubblewrap cannot start a sandbox here ({why[-1] if why else f'exit {done.returncode}'}); this "
                "kernel may not allow user namespaces (kernel.unprivileged_userns_clone=1, or a container that "
                "permits them), or pass --sandbox none to run programs unsandboxed"
            )


_SIGNALS = {s.value for s in signal.Signals}


def _interpreter() -> str:
    """The Python that runs programs: the system's own when there is one, else the one running redpen."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    import sys

    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _outside_system(python: str) -> str | None:
    """The install prefix of an interpreter that lives outside the bound system folders, else None."""
    real = os.path.realpath(python)
    if any(real == p or real.startswith(p + "/") for p in _SYSTEM):
        return None
    return str(Path(real).parent.parent)


def _environment(home: str) -> dict[str, str]:
    """All a program gets: no secrets, a fixed hash seed so set orders (and so verdicts) repeat."""
    return {"HOME": home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_said(error: str) -> str:
    """The error's last line that says something: the exception, not a traceback header or a frame.

    Processes a program forked write to the same stderr, so their tracebacks interleave and the very last line
    may be another process's "Traceback (most recent call last):".
    """
    lines = error.strip().splitlines()
    for line in reversed(lines):
        if line.strip() and not line.startswith((" ", "\t", "Traceback (most recent call last)", "During handling")):
            return line
    return lines[-1] if lines else ""


def _tail(data: bytes) -> str:
    """The last lines of stderr, without the harness's own traceback frames."""
    lines = [line for line in data.decode(errors="replace").rstrip().splitlines() if not _HARNESS_FRAME.match(line)]
    return "\n".join(line if len(line) <= _LINE else line[: _LINE - 3] + "..." for line in lines[-_ERROR_LINES:])


_configured: Sandbox | None = None


def configure(mode: str) -> Sandbox:
    """Choose the sandbox every code item of this process runs in (``--sandbox``); bwrap's absence is an error here."""
    global _configured
    if _configured is None or _configured.mode != mode:
        if _configured is not None:
            _configured.close()
        _configured = Sandbox(mode)
    return _configured


def current() -> Sandbox:
    """The configured sandbox, else a bubblewrap one (made on first use: processes that grade no code need none)."""
    return _configured or configure("bwrap")
