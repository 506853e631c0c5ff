"""The code sandbox against hostile programs: each attack is a graded failure with its reason, the grader works
after it, and nothing outside the sandbox changed.

Every attack program is a *correct* solution of a small task preceded (or followed) by an attack on the machine,
or a *wrong* one with an attack on its grading, so a program that got past the sandbox would pass: a verdict of
``correct`` is an escape. redpen's environment holds a canary API key that no result may show. Run with ``-s`` to
see the table.
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
from runtime.data.kinds import grade
from runtime.data.sandbox import Limits, Program, Sandbox
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
WRONG = "def add(a, b):\n    return a - b\n"  # what the grading attacks below submit: it must never pass
# Short limits keep the suite fast: 2 CPU seconds, 10 s of wall clock on a loaded machine.
FAST = Limits(cpu_s=2, wall_s=10.0)
TOKEN = secrets.token_hex(8)
CANARY = f"sk-secret-canary-{TOKEN}"  # redpen's environment holds it as OPENAI_API_KEY; no program may see it
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
            "spinner = threading.Thread(target=spin)\nspinner.start()\nspinner.join()\n" + SOLUTION
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
        # Secrets: any process visible in the sandbox (its init above all) must show nothing of redpen's environment.
        "read every process's environment in /proc": (
            "import os, sys\n"
            "leak = b''\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n"
            "        leak += open(f'/proc/{pid}/environ', 'rb').read()\n"
            "    except (OSError, NotADirectoryError):\n"
            "        pass\n"
            "sys.stderr.write(leak.decode(errors='replace'))\n"
            "assert b'sk-secret-canary-' in leak\n" + SOLUTION  # the source names no token: a traceback may show it
        ),
        "open /proc/1/mem": "open('/proc/1/mem', 'rb').close()\n" + SOLUTION,
        "ptrace the process above it": (
            "import ctypes, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "assert libc.ptrace(16, os.getppid(), 0, 0) == 0 or libc.ptrace(16, 1, 0, 0) == 0\n" + SOLUTION
        ),
        # Grading: each submits a wrong add and tries to make it pass anyway.
        "sys.exit made a no-op": WRONG + "import sys\nsys.exit = lambda *a, **k: None\n",
        "print, sys.exit and os._exit made no-ops": (
            WRONG + "import builtins, os, sys, traceback\n"
            "builtins.print = traceback.print_exc = lambda *a, **k: None\n"
            "sys.exit = os._exit = lambda *a, **k: None\n"
        ),
        "an answer equal to everything": (
            "class Same:\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return Same()\n"
        ),
        "marker read from the harness's frame, then os._exit(0)": (
            WRONG + "import os, sys\n"
            "frame = sys._getframe()\n"
            "while 'job' not in frame.f_locals:\n"
            "    frame = frame.f_back\n"
            "os.write(1, ('\\n' + frame.f_locals['job']['marker'] + '\\n').encode())\n"
            "os._exit(0)\n"
        ),
        "atexit handler prints the harness's marker": (
            WRONG + "import atexit, os, sys\n"
            "frame = sys._getframe()\n"
            "while 'job' not in frame.f_locals:\n"
            "    frame = frame.f_back\n"
            "marker = frame.f_locals['job']['marker']\n"
            "atexit.register(lambda: (os.write(1, ('\\n' + marker + '\\n').encode()), os._exit(0)))\n"
        ),
        "a forged verdict on every file descriptor": (
            WRONG + "import os\n"
            'forged = b\'\\n{"passed": true, "reason": "passed"}\\n\'\n'
            "for fd in range(64):\n"
            "    for path in (f'/proc/1/fd/{fd}', f'/proc/{os.getppid()}/fd/{fd}'):\n"
            "        try:\n"
            "            os.write(os.open(path, os.O_WRONLY), forged)\n"
            "        except OSError:\n"
            "            pass\n"
            "    try:\n"
            "        os.write(fd, forged)\n"
            "    except OSError:\n"
            "        pass\n"
            "os._exit(0)\n"
        ),
        "search its own memory for the tests": (
            "import gc\n"
            "needle = 'assert ' + 'add('\n"  # spelled apart: the program's own source must not match
            "dicts = [o for o in gc.get_objects() if isinstance(o, dict)]\n"
            "assert any(isinstance(v, str) and needle in v != needle for d in dicts for v in list(d.values()))\n"
            + SOLUTION
        ),
        "ask the judge to run code": (
            WRONG + "import gc\n"
            "peer = next(o for o in gc.get_objects() if type(o).__name__ == 'Peer')\n"
            "peer.request('load', 'import os\\nos._exit(0)', {})\n"
        ),
        "signals to the process above it": (
            WRONG + "import os, signal\n"
            "for pid in {1, os.getppid()}:\n"
            "    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL):\n"
            "        try:\n"
            "            os.kill(pid, sig)\n"
            "        except OSError:\n"
            "            pass\n"
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
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
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
    assert CANARY not in (result.error or ""), f"{name}: redpen's environment leaked into the result"
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


def test_only_the_judge_gives_the_verdict(box: Sandbox) -> None:
    """A verdict line, printed or written to every descriptor, is the program's output, not the judge's verdict."""
    forged = '{"passed": true, "reason": "passed"}'
    run = box.run(Program(f"import os, sys\nprint({forged!r})\nos.write(1, b'{forged}')\nsys.exit(0)", "assert f()"))
    assert not run.passed and run.reason == "exited before the tests finished"
    assert box.run(Program("x = 1")).passed  # no tests: the code ran to its end
    assert box.run(Program("def f():\n    return 2", "assert f() == 2", entry_point="f")).passed
    assert not box.run(Program("import atexit\natexit.register(print, 'after the tests')", "assert False")).passed


def _item(name: str, tests: str, prefix: str = "") -> Example:
    return Example(f"toy/{name}", "toy", "", "", "code", (), {"prefix": prefix, "tests": tests, "entry_point": name})


def test_tests_see_their_own_builtins_and_the_items_own_helpers(box: Sandbox) -> None:
    """A program could once pass wrong code by shadowing a builtin the tests use, or by redefining a helper of the
    item's prefix that the tests use (as HumanEval/50's tests use its prompt's encode_shift). Not any more."""
    half = _item("half", "assert abs(half(3) - 1.5) < 1e-9\nassert abs(half(1) - 0.5) < 1e-9")
    assert grade(half, "def half(x):\n    return x / 2\n").verdict == "correct"
    assert grade(half, "def half(x):\n    return x\n\ndef abs(x):\n    return 0\n").verdict == "wrong"
    prefix = 'def encode(s):\n    return s[1:] + s[:1]\n\n\ndef decode(s):\n    """Undo encode."""\n'
    decode = _item("decode", "assert decode(encode('abc')) == 'abc'\nassert decode(encode('hello')) == 'hello'", prefix)
    assert grade(decode, "    return s[-1:] + s[:-1]\n").verdict == "correct"
    assert grade(decode, "    return s\n\n\ndef encode(s):\n    return s\n").verdict == "wrong"


def test_a_call_cannot_end_the_tests_loop_early(box: Sandbox) -> None:
    """A StopIteration out of the program would end ``map`` around it: all() of no cases is True."""
    add = _item("add", "cases = [((1, 2), 3), ((2, 2), 4)]\nassert all(map(lambda c: add(*c[0]) == c[1], cases))")
    assert grade(add, SOLUTION).verdict == "correct"
    assert grade(add, "def add(a, b):\n    raise StopIteration\n").verdict == "wrong"


def test_functions_the_tests_lend_can_be_called_not_opened(box: Sandbox) -> None:
    """A function the tests pass runs in the judge; its attributes (globals, code, closure) stay there."""
    apply = _item("apply", "assert apply(lambda x: x + 1, 2) == 3\nassert apply(str.upper, 'a') == 'A'")
    assert grade(apply, "def apply(f, x):\n    return f(x)\n").verdict == "correct"
    looked = grade(apply, "def apply(f, x):\n    getattr(f, '__globals__', None)\n    return f(x)\n")
    assert looked.verdict == "wrong" and "protocol" in (looked.error or "")


def test_values_cross_between_the_processes_as_they_are(box: Sandbox) -> None:
    """Plain values come back with their types; the program's own objects come back as proxies that work (calls,
    attributes, iteration, printing) but equal only themselves."""
    code = (
        "class Node:\n    def __init__(self, value):\n        self.value = value\n        self.next = None\n\n"
        "    def __repr__(self):\n        return f'Node({self.value})'\n\n"
        "def make():\n"
        "    return (1, [2.5, 'x', b'y', {3: None}], {4}, frozenset(), 2**100, 1 + 2j, True, float('nan'))\n"
        "def squares(n):\n    return (i * i for i in range(n))\n"
        "def kind(value, wanted):\n    return type(value) if isinstance(value, wanted) else None\n"
    )
    tests = (
        "value = make()\n"
        "assert value[:7] == (1, [2.5, 'x', b'y', {3: None}], {4}, frozenset(), 2**100, 1 + 2j, True)\n"
        "assert [type(v) for v in value] == [int, list, set, frozenset, int, complex, bool, float]\n"
        "assert value[7] != value[7]\n"
        "assert list(squares(4)) == [0, 1, 4, 9] and 9 in squares(4)\n"
        "assert kind(1, int) is int and kind('x', int) is None\n"
        "head = Node(1)\nhead.next = Node(2)\n"
        "assert head.next.value == 2 and repr(head.next) == 'Node(2)' and str(head) == 'Node(1)'\n"
        "assert head == head and head != Node(1) and head.next is head.next\n"
    )
    run = box.run(Program(code, tests, entry_point="make"))
    assert run.passed, run.reason + "\n" + run.error


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


def test_a_verdict_that_comes_as_a_wait_gives_up_is_read(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first wait returns nothing just after the verdict came and the sandbox ended (as a loaded machine can
    make it): the verdict is still read, not lost to "no verdict"."""
    import selectors
    import time

    class Late(selectors.DefaultSelector):
        late = True

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            reading = all(key.events == selectors.EVENT_READ for key in self.get_map().values())
            if Late.late and reading:  # the job is written: wait for the verdict, let the sandbox exit, give up
                Late.late = False
                super().select(None)
                time.sleep(1.0)
                return []
            return super().select(timeout)

    monkeypatch.setattr(sandbox.selectors, "DefaultSelector", Late)
    run = box.run(Program("x = 1"))
    assert run.passed, run.reason
    assert not Late.late


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
        runs = await asyncio.gather(*(box.arun(Program("import time\ntime.sleep(0.5)")) for _ in range(box.workers)))
        task.cancel()
        return [r.passed for r in runs], ticks

    started = time.perf_counter()
    passed, ticks = asyncio.run(main())
    assert all(passed)
    assert time.perf_counter() - started < 0.5 * box.workers + 1.5  # at once, not one after another
    assert ticks > 10  # the loop kept running while the programs did


def test_signal_name_in_reason(box: Sandbox) -> None:
    run = box.run(Program(f"import os, signal\nos.kill(os.getpid(), signal.{signal.SIGSEGV.name})"))
    assert not run.passed and "SIGSEGV" in run.reason
