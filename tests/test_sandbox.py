"""The code sandbox against hostile programs: each attack is a graded failure with its reason, the grader works
after it, and nothing outside the sandbox changed.

Every attack program is a *correct* solution of a small task preceded (or followed) by the attack, so a program
that got past the sandbox would pass: a verdict of ``correct`` is an escape. Run with ``-s`` to see the table.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.data import graders, sandbox
from runtime.data.graders import grade
from runtime.data.sandbox import Limits, Sandbox
from runtime.data.tasks import Example
from runtime.errors import ConfigError

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap: apt-get install bubblewrap")

ADD = Example(
    "toy/add",
    "toy",
    "Write add(a, b).",
    "def add(a, b):\n    return a + b",
    "code",
    (),
    {"prefix": "", "tests": "assert add(1, 2) == 3\nassert add(-1, 1) == 0", "entry_point": "add"},
)
SOLUTION = "def add(a, b):\n    return a + b\n"
# Short limits keep the suite fast: 2 CPU seconds, 10 s of wall clock on a loaded machine.
FAST = Limits(cpu_s=2, wall_s=10.0)
TOKEN = secrets.token_hex(8)
TABLE: list[tuple[str, str, str]] = []


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    made = Sandbox("bwrap", FAST)
    before = sandbox._configured
    sandbox._configured = made
    yield made
    sandbox._configured = before
    made.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP server on 127.0.0.1 that hands every caller the token; ``accepted`` records who connected."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, peer = server.accept()
            except OSError:
                return
            accepted.append(str(peer))
            conn.sendall(TOKEN.encode())
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


@pytest.fixture(scope="module")
def home_secret() -> Iterator[Path]:
    """A file in the real home folder that no program may read."""
    path = Path.home() / f".redpen-test-secret-{TOKEN}"
    path.write_text(TOKEN)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def sentinel() -> Iterator[subprocess.Popen[bytes]]:
    """A process of the test's own that the kill attack aims at, besides the grader itself."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def attacks(home_secret: Path, port: int, sentinel_pid: int, parent: Path) -> dict[str, str]:
    """name -> program; each would pass if its attack got through."""
    escape = f"redpen-escape-{TOKEN}"
    return {
        "fork bomb": "import os\nwhile True:\n    os.fork()\n" + SOLUTION,
        "memory bomb": "hog = []\nwhile True:\n    hog.append(bytearray(64 * 2**20))\n" + SOLUTION,
        "one 2 GiB allocation": "hog = bytearray(2 * 2**30)\n" + SOLUTION,
        "infinite loop": "while True:\n    pass\n" + SOLUTION,
        "busy loop in a thread": (
            "import threading\n\ndef spin():\n    while True:\n        pass\n\n"
            "threading.Thread(target=spin).start()\n" + SOLUTION
        ),
        "write a file in the user's home": f"open({str(Path.home() / escape)!r}, 'w').write('x')\n" + SOLUTION,
        "write a file in /tmp": f"open('/tmp/{escape}', 'w').write('x')\n" + SOLUTION,
        "read a file in the user's home": f"assert open({str(home_secret)!r}).read() == {TOKEN!r}\n" + SOLUTION,
        "read an environment secret": f"import os\nassert os.environ['REDPEN_TEST_SECRET'] == {TOKEN!r}\n" + SOLUTION,
        "connect to a listener on 127.0.0.1": (
            "import socket\n"
            f"with socket.create_connection(('127.0.0.1', {port}), timeout=2) as s:\n"
            f"    assert s.recv(64) == {TOKEN.encode()!r}\n" + SOLUTION
        ),
        "kill the parent process": (
            "import os, signal\n"
            "os.kill(os.getppid(), signal.SIGKILL)\n"
            f"os.kill({os.getpid()}, signal.SIGKILL)\n"
            f"os.kill({sentinel_pid}, signal.SIGKILL)\n" + SOLUTION
        ),
        "100 MB of stdout": "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2**20)\n" + SOLUTION,
        "early sys.exit(0)": "def add(a, b):\n    return a - b\n\nimport sys\nsys.exit(0)\n",
        "early os._exit(0)": "def add(a, b):\n    return a - b\n\nimport os\nos._exit(0)\n",
        "override assert via builtins": (
            "import builtins, sys\n"
            "builtins.AssertionError = type('Quiet', (Exception,), {})\n"
            "sys.excepthook = lambda *args: print('0' * 32)\n"
            "def add(a, b):\n    return a - b\n"
        ),
        "delete files in its working directory's parent": (
            "import os, shutil\n"
            "for name in os.listdir('..'):\n"
            "    path = os.path.join('..', name)\n"
            "    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)\n"
            f"shutil.rmtree({str(parent)!r})\n" + SOLUTION
        ),
    }


NAMES = list(attacks(Path("h"), 0, 0, Path("p")))


@pytest.mark.parametrize("name", NAMES)
def test_attack_is_a_graded_failure_and_changes_nothing_outside(
    name: str,
    box: Sandbox,
    listener: tuple[int, list[str]],
    home_secret: Path,
    sentinel: subprocess.Popen[bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, accepted = listener
    monkeypatch.setenv("REDPEN_TEST_SECRET", TOKEN)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    escape = f"redpen-escape-{TOKEN}"

    code = attacks(home_secret, port, sentinel.pid, tmp_path)[name]
    result = grade(ADD, f"```python\n{code}\n```")
    reason = (result.error or "").splitlines()[0] if result.error else result.verdict
    TABLE.append((name, result.verdict, reason))

    assert result.verdict == "wrong", f"{name}: escaped, the program passed"
    assert reason, f"{name}: no reason given"
    # Nothing outside changed: files, the secret, the listener, our processes.
    assert not (Path.home() / escape).exists()
    assert not (Path("/tmp") / escape).exists()
    assert home_secret.read_text() == TOKEN
    assert (tmp_path / "keep.txt").read_text() == "keep" and work.is_dir()
    assert accepted == []
    assert sentinel.poll() is None, "the kill attack reached a process outside the sandbox"
    # The grader still works.
    assert grade(ADD, SOLUTION).verdict == "correct"
    assert grade(ADD, "def add(a, b):\n    return a * b\n").verdict == "wrong"


def test_reasons_name_the_limit_that_stopped_each_attack() -> None:
    """The table of (attack, verdict, reason) and the count of escapes; the limits show in the reasons."""
    if len(TABLE) != len(NAMES):
        # Not a skip: run alone it would pass silently without checking anything.
        pytest.fail("this test reads the table the attack tests fill: run the whole module")
    reasons = {name: reason for name, _, reason in TABLE}
    print("\n| attack | verdict | reason |\n|---|---|---|")
    for name, verdict, reason in TABLE:
        print(f"| {name} | {verdict} | {reason} |")
    print(f"escapes: {sum(verdict != 'wrong' for _, verdict, _ in TABLE)} of {len(TABLE)}")
    assert "BlockingIOError" in reasons["fork bomb"] or "timed out" in reasons["fork bomb"]
    # bytearray zero-fills its pages: on a loaded machine the kernel's page faults can spend the CPU limit before
    # the address space runs out. Either limit stops it; the single allocation shows the address-space cap alone.
    assert "MemoryError" in reasons["memory bomb"] or "CPU time limit" in reasons["memory bomb"]
    assert "MemoryError" in reasons["one 2 GiB allocation"]
    assert "CPU time limit" in reasons["infinite loop"]
    assert "CPU time limit" in reasons["busy loop in a thread"] or "timed out" in reasons["busy loop in a thread"]
    assert "output limit" in reasons["100 MB of stdout"]
    assert reasons["early sys.exit(0)"] == reasons["early os._exit(0)"] == "exited before the tests finished"
    assert "KeyError" in reasons["read an environment secret"]
    assert "AssertionError" in reasons["override assert via builtins"]


def test_the_marker_is_random_per_run_and_must_end_the_output(box: Sandbox) -> None:
    run = box.run("print('0' * 32)\nimport sys\nsys.exit(0)")
    assert not run.passed and run.reason == "exited before the tests finished"
    assert box.run("x = 1").passed
    assert not box.run("import atexit\natexit.register(print, 'after the marker')").passed


def test_missing_bwrap_refuses_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="apt-get install bubblewrap"):
        Sandbox("bwrap")


def test_unsandboxed_takes_an_explicit_mode_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        none = Sandbox("none", FAST)
    assert "UNSANDBOXED" in caplog.text
    assert none.run(graders.program(ADD, SOLUTION)).passed
    assert not none.run(graders.program(ADD, "def add(a, b):\n    return 0\n")).passed
    with pytest.raises(ConfigError, match="--sandbox"):
        Sandbox("docker")


def test_programs_run_concurrently_off_the_event_loop(box: Sandbox) -> None:
    import asyncio
    import time

    async def main() -> tuple[list[bool], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        runs = await asyncio.gather(*(box.arun("import time\ntime.sleep(0.5)") for _ in range(box.workers)))
        task.cancel()
        return [r.passed for r in runs], ticks

    started = time.perf_counter()
    passed, ticks = asyncio.run(main())
    assert all(passed)
    assert time.perf_counter() - started < 0.5 * box.workers + 1.5  # at once, not one after another
    assert ticks > 10  # the loop kept running while the programs did


def test_signal_name_in_reason(box: Sandbox) -> None:
    run = box.run(f"import os, signal\nos.kill(os.getpid(), signal.{signal.SIGSEGV.name})")
    assert not run.passed and "SIGSEGV" in run.reason
