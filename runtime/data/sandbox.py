"""Run untrusted programs (model-written code and its tests), one sandbox each, under bubblewrap.

Model-written code is hostile input. Each program runs in its own ``bwrap`` sandbox: every namespace unshared (no
network but an empty loopback, its own PIDs and a fresh ``/proc`` that shows only its own processes, no further
user namespaces), the system folders bound read-only (``/usr`` and its ``/bin``, ``/lib*`` links, a few files of
``/etc``), an empty size-capped tmpfs as home and working directory, nothing else of the machine visible, a new
session, and killed with its parent. bwrap itself starts from a fixed four-variable environment, so no process in
the sandbox holds anything of redpen's (API keys). Hard rlimits cap CPU time, address space, processes, file size
and open files; a wall-clock timeout kills the whole process group, and output past a cap stops it too.

Inside runs the judge (``runtime.data.judge``): the item's tests run in its process, the program in another one it
forked before it read them, and only the judge holds the descriptor the verdict comes back on. A program passes when
the judge says so, and nothing the program does in its own process can say it for the judge.

``Sandbox("none")`` runs the same judge with the same rlimits, environment and a temporary working directory, but
with no namespaces: the program sees the machine. It is for machines without bubblewrap, on explicit request, and
logs a warning whenever it is made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import selectors
import shutil
import signal
import struct
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
_TAIL = 64 * 1024  # bytes of stdout (the verdict) and of stderr (the program's output, the error) kept
_ERROR_LINES = 20  # lines of stderr a failed program's error tail shows
_LINE = 300  # characters of each of those lines (a reply that repeats itself makes one very long line)
_JUDGE = (Path(__file__).parent / "judge.py").read_text()  # run as ``python -c``: the sandbox sees no redpen files


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
class Program:
    """What one sandbox runs: ``code`` in the program's process, ``tests`` in the judge's, which calls the
    ``entry_point`` and the other names the code defines. ``prefix`` is the item's own code (HumanEval's prompt): it
    runs before ``code`` in the program's process and alone in the judge's, so the helpers the tests use are the
    item's, never a reply's redefinition of them."""

    code: str
    tests: str = ""
    prefix: str = ""
    entry_point: str = ""


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

    def run(self, program: Program) -> Run:
        """Run one program to its verdict, its timeout or its output cap; never raises for what the program does."""
        public = json.dumps(
            {
                "code": program.code,
                "prefix": program.prefix,
                "entry_point": program.entry_point,
                "limits": self.limits.rlimits(),
            }
        ).encode()
        # The judge reads the part the program may see (the length says where it ends), forks it, then the tests.
        job = struct.pack(">I", len(public)) + public + json.dumps({"tests": program.tests}).encode()
        workdir = None if self.mode == "bwrap" else tempfile.mkdtemp(prefix="redpen-program-")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                [*self._bwrap, self.python, "-s", "-B", "-c", _JUDGE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir or "/",
                env=_environment(workdir or _HOME),  # bwrap's own too: redpen's environment stays out
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
        error = _tail(stderr)
        if stopped:
            return Run(False, stopped, error, seconds, proc.returncode)
        verdict = _verdict(stdout)
        if verdict is None:
            return Run(False, self._no_verdict(proc.returncode, error), error, seconds, proc.returncode)
        passed, reason = verdict
        return Run(passed, reason, "" if passed else error, seconds, proc.returncode)

    async def arun(self, program: Program) -> Run:
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
                # Whether it had ended is asked before the wait: its last words (the verdict) may come in just as a
                # wait gives up, and are read when the next one starts.
                ended = proc.poll() is not None
                ready = selector.select(min(left, 0.2))
                if not ready and ended:
                    break  # it ended and said all: what it left behind holds the pipes open (--sandbox none)
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
                        stopped = f"output limit: over {self.limits.output_kb} KiB of output"
                        break
        _kill_group(proc.pid)  # also what the program left behind once it exited
        proc.wait()
        out, err = tails[proc.stdout.fileno()], tails[proc.stderr.fileno()]
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        return out, err, stopped

    def _no_verdict(self, returncode: int | None, error: str) -> str:
        """Why the judge wrote no verdict: bubblewrap could not start, or the judge itself was stopped."""
        signum = None
        if returncode is not None and returncode < 0:
            signum = -returncode
        elif self.mode == "bwrap" and returncode is not None and returncode > 128:
            signum = returncode - 128  # bwrap exits 128 + N when its program died of signal N
        last = _last_said(error)
        if last.startswith("bwrap:"):
            return f"sandbox failed: {last}"
        if signum is not None:
            name = signal.Signals(signum).name if signum in _SIGNALS else str(signum)
            return f"no verdict: the judge was stopped by signal {name}"
        return f"no verdict: {last[:200] or f'the judge exited with status {returncode}'}"

    def _bwrap_command(self) -> list[str]:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise ConfigError(
                "code tasks run model-written programs under bubblewrap, and `bwrap` is not installed: "
                f"{INSTALL_HINT}, or pass --sandbox none to run them unsandboxed"
            )
        # --as-pid-1: the judge is the sandbox's init, so no process of bwrap's (which would hold the verdict's pipe
        # and be readable in /proc) is visible inside; when it exits, the kernel kills whatever the program left.
        command = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--as-pid-1", "--die-with-parent"]
        command += ["--new-session", "--uid", str(NOBODY), "--gid", str(NOBODY)]
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
                env=_environment(_HOME),
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


def _verdict(stdout: bytes) -> tuple[bool, str] | None:
    """The judge's verdict line, or None when stdout holds anything else (it never does unless the judge failed)."""
    try:
        verdict = json.loads(stdout)
    except ValueError:
        return None
    if type(verdict) is not dict or type(verdict.get("passed")) is not bool or type(verdict.get("reason")) is not str:
        return None
    return verdict["passed"], verdict["reason"]


def _tail(data: bytes) -> str:
    """The last lines of stderr: the program's output and its tracebacks, then the failed test's."""
    lines = data.decode(errors="replace").rstrip().splitlines()
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
