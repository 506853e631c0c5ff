"""What runs inside the sandbox: the judge, which runs an item's tests, and the program process they call into.

The sandbox starts this file as its one process (``python -c``, pid 1 of the sandbox). The tests and the
model-written program never share a process, so nothing the program does to its own interpreter (a no-op
``sys.exit``, a patched ``print``, an ``atexit`` hook, walking frames, ``os._exit`` after a forged line) can reach
the verdict:

- The judge forks the program process *before* it reads the tests from stdin (it has read only what the program
  may see: the item's prefix, the code, the limits), so the program's memory never held the tests or their
  expected values. That process drops stdin and the verdict descriptor before it runs anything of the program's;
  its stdout, like the judge's own, is the sandbox's stderr.
- Then, before it reads the tests or lets the program run, the judge makes itself non-dumpable: a process of the
  same user without ``CAP_SYS_PTRACE`` (no sandboxed process has it) can neither ptrace it nor open its
  ``/proc/<pid>/mem``, ``environ`` or ``fd/``.
- The tests run in the judge. The names they use that the program defines are proxies: calling one sends the
  arguments to the program process and brings the result back. Plain values (None, bool, int, float, complex,
  str, bytes and tuples, lists, sets, frozensets and dicts of them) come back as copies the judge builds from
  data, so every comparison the tests make runs on the judge's own objects and builtins. Anything else (a class
  instance, a generator) comes back as a proxy the tests may call, index, iterate or print, but that equals only
  itself: the program cannot answer a test's ``==``, ``<`` or ``in`` for it.
- Only the judge holds the sandbox's stdout, and it writes one line there: the verdict, after the tests ended.

What the program can still do is answer the calls it is given however it likes: a test passes when the program's
answers are right, computed or guessed. Functions the tests pass to the program run in the judge, but the program
may only call them (no attribute of a judge object is readable from the program).
"""

from __future__ import annotations

import sys

# ``python -c`` puts the working directory first on the path; it is the program's, so the judge never imports from
# it (this runs before any import that could look there).
if sys.path and sys.path[0] == "":
    del sys.path[0]

import builtins  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

# Every sandbox starts this file anew, so it imports only what each run needs: typing only for the type checker
# (mypy takes any TYPE_CHECKING as true), traceback and linecache only to print a failure.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

PROGRAM, PREFIX, TESTS = "<program>", "<prefix>", "<tests>"  # file names in tracebacks
_SOURCES: dict[str, str] = {}  # file name -> source, for tracebacks
_MESSAGE = 64 * 2**20  # the largest message either side accepts
_HEADER = struct.Struct(">I")
_PR_SET_DUMPABLE = 4
# What a program may do with an object the judge lent it (a function the tests pass as an argument): use it, not
# look inside it (its attributes would lead to the judge's modules, frames and globals).
_LENT_OPS = frozenset({"call", "iter", "next", "len", "bool", "str", "repr", "getitem"})


class ProtocolError(BaseException):
    """The other process sent something that is no message of this protocol. Like :class:`ProgramExited`, no
    ``except Exception`` in the tests catches it, and the judge fails the program once either was raised."""


class ProgramExited(BaseException):
    """The program process ended (or closed its pipes) while the tests still needed it."""


class ProgramError(Exception):
    """An exception the program raised that is no builtin one: the message starts with its type's name."""


class Remote:
    """An object of the other process: using it is a request to that process. It equals only itself."""

    __slots__ = ("_redpen_peer", "_redpen_id")

    def __init__(self, peer: Peer, ident: int) -> None:
        object.__setattr__(self, "_redpen_peer", peer)
        object.__setattr__(self, "_redpen_id", ident)

    def _ask(self, op: str, *values: Any) -> Any:
        return self._redpen_peer.request(op, self._redpen_id, *values)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ask("call", list(args), kwargs)

    def __getattr__(self, name: str) -> Any:
        return self._ask("getattr", name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._ask("setattr", name, value)

    def __getitem__(self, key: Any) -> Any:
        return self._ask("getitem", key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._ask("setitem", key, value)

    def __iter__(self) -> Remote:
        iterator = self._ask("iter")
        if not isinstance(iterator, Remote):
            raise ProtocolError("iter() answered with a plain value")
        return iterator

    def __next__(self) -> Any:
        return self._ask("next")

    def __len__(self) -> int:
        return int(self._ask("len"))

    def __bool__(self) -> bool:
        return bool(self._ask("bool"))

    def __str__(self) -> str:
        return str(self._ask("str"))

    def __repr__(self) -> str:
        return str(self._ask("repr"))

    def __int__(self) -> int:
        return int(self._ask("int"))

    def __float__(self) -> float:
        return float(self._ask("float"))

    def __index__(self) -> int:
        return int(self._ask("int"))

    # No __eq__, __lt__, __contains__, __hash__ or arithmetic: they would hand the tests' expected values to the
    # program and take its word for the answer. ``x in remote`` iterates it and compares here.


class Peer:
    """One end of the two pipes between the judge and the program process.

    Each side serves the other's requests while it waits for its own answer, so a program may call back a function
    the tests passed it. ``lent`` holds this side's objects the other side has references to.
    """

    def __init__(self, read_fd: int, write_fd: int, *, judge: bool) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.judge = judge
        self.lent: dict[int, Any] = {}
        self.remotes: dict[int, Remote] = {}
        self.broken: ProtocolError | ProgramExited | None = None  # what ended the exchange, once it has

    # ---- messages ------------------------------------------------------------------------------------------------

    def send(self, message: list[Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        view = memoryview(_HEADER.pack(len(data)) + data)
        try:
            while view:
                view = view[os.write(self.write_fd, view) :]
        except BrokenPipeError:
            raise ProgramExited from None

    def receive(self) -> list[Any]:
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        if size > _MESSAGE:
            raise ProtocolError(f"a message of {size} bytes")
        try:
            message = json.loads(self._read(size))
        except (ValueError, RecursionError) as error:
            raise ProtocolError(f"unreadable message: {type(error).__name__}") from None
        if type(message) is not list or not message or type(message[0]) is not str:
            raise ProtocolError("a message that is not [kind, ...]")
        return message

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(self.read_fd, min(size - len(data), 2**20))
            if not chunk:
                raise ProgramExited
            data += chunk
        return data

    def request(self, op: str, *values: Any) -> Any:
        """Send a request; serve the other side's requests until its answer comes; return it or raise its error."""
        if self.broken is not None:
            raise self.broken
        try:
            self.send([op, *(self.encode(v) for v in values)])
            while True:
                message = self.receive()
                if message[0] == "ok" and len(message) == 2:
                    return self.decode(message[1])
                if message[0] == "err" and len(message) == 3:
                    # Only the end of an iteration is a StopIteration here: raised by a call, it would quietly end
                    # the test's own loop around it (``all(map(candidate, cases))`` would pass on no cases).
                    stop = message[1] in ("StopIteration", "StopAsyncIteration") and op != "next"
                    raise _exception(f"{message[1]} (from a call)" if stop else message[1], message[2])
                self.send(self.serve(message))
        except (ProtocolError, ProgramExited) as error:
            self.broken = error
            raise

    def serve(self, message: list[Any]) -> list[Any]:
        """One request of the other side, answered ["ok", value] or ["err", type name, message]."""
        op, args = message[0], message[1:]
        if self.judge and (op not in _LENT_OPS or not args):
            raise ProtocolError(f"a request {op!r} to the judge")
        try:
            if op == "load" and not self.judge:
                # The answer is the program's top-level names, containers by reference: a program's globals may be
                # large or hold themselves (a list of dicts).
                names = _load(*(self.decode(v) for v in args)).items()
                return ["ok", ["d", *([n, self.encode(v) if _is_scalar(v) else self.lend(v)] for n, v in names)]]
            target = self.decode(["y", args[0]]) if args else None
            values = [self.decode(v) for v in args[1:]]
            return ["ok", self.encode(_apply(op, target, values))]
        except (ProtocolError, ProgramExited, SystemExit, KeyboardInterrupt):
            raise
        except BaseException as error:
            if not self.judge and op in ("load", "call") and not isinstance(error, StopIteration):
                _print_traceback(error, (PROGRAM,))  # the program's own error; len() of a generator is not
            return ["err", type(error).__name__, _message(error)]

    # ---- values --------------------------------------------------------------------------------------------------

    def encode(self, value: Any) -> Any:
        """A value as JSON data: plain values by copy (bool before int: it is one), everything else by reference."""
        if type(value) in (type(None), bool, str):
            return value
        if isinstance(value, str):
            return str.__str__(value)  # a subclass's instance as the plain string it holds
        if isinstance(value, int):
            number = int(value)
            return number if -(2**63) <= number < 2**63 else ["i", hex(number)]  # hex: no digit limit
        if isinstance(value, float):
            return ["n", float.hex(float(value))]  # exact, and NaN and infinities too
        if isinstance(value, complex):
            return ["c", float.hex(value.real), float.hex(value.imag)]
        if isinstance(value, (bytes, bytearray)):
            return ["b", bytes(value).hex()]
        if isinstance(value, Remote) and value._redpen_peer is self:
            return ["y", value._redpen_id]
        if isinstance(value, dict):
            return ["d", *([self.encode(k), self.encode(v)] for k, v in value.items())]
        for tag, kind in _SEQUENCES:
            if isinstance(value, kind):
                return [tag, *(self.encode(item) for item in value)]
        return self.lend(value)

    def lend(self, value: Any) -> Any:
        """A value as a reference the other side can use (a builtin type or a standard module by its name)."""
        if isinstance(value, type) and _is_builtin(value):
            return ["B", value.__name__]  # a builtin type (``int``, ``ValueError``): each side has its own
        self.lent[id(value)] = value
        if isinstance(value, types.ModuleType):
            return ["m", value.__name__, id(value)]
        return ["o", id(value)]

    def decode(self, data: Any) -> Any:
        """JSON data back to a value; anything malformed is a :class:`ProtocolError`."""
        try:
            return self._decode(data)
        except (ProtocolError, ProgramExited):
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as error:
            raise ProtocolError(f"a malformed value ({type(error).__name__})") from None

    def _decode(self, data: Any) -> Any:
        if data is None or type(data) in (bool, int, str):
            return data
        if type(data) is not list or not data:
            raise ProtocolError("a value that is neither plain nor tagged")
        tag, rest = data[0], data[1:]
        if tag == "n":
            return float.fromhex(_text(rest[0]))
        if tag == "i":
            return int(_text(rest[0]), 16)
        if tag == "c":
            return complex(float.fromhex(_text(rest[0])), float.fromhex(_text(rest[1])))
        if tag == "b":
            return bytes.fromhex(_text(rest[0]))
        if tag == "l":
            return [self._decode(item) for item in rest]
        if tag == "t":
            return tuple(self._decode(item) for item in rest)
        if tag == "s":
            return {self._decode(item) for item in rest}
        if tag == "f":
            return frozenset(self._decode(item) for item in rest)
        if tag == "d":
            return {self._decode(k): self._decode(v) for k, v in (_pair(item) for item in rest)}
        if tag == "y":
            return self.lent[_ident(rest[0])]
        if tag == "o":
            return self._remote(_ident(rest[0]))
        if tag == "B":
            kind = getattr(builtins, _text(rest[0]))
            if not isinstance(kind, type):
                raise ProtocolError("a builtin that is no type")
            return kind
        if tag == "m":
            return _module(_text(rest[0])) or self._remote(_ident(rest[1]))
        raise ProtocolError(f"an unknown tag {tag!r}")

    def _remote(self, ident: int) -> Remote:
        if ident not in self.remotes:
            self.remotes[ident] = Remote(self, ident)
        return self.remotes[ident]


_SEQUENCES: tuple[tuple[str, type[list[Any] | tuple[Any, ...] | set[Any] | frozenset[Any]]], ...] = (
    ("l", list),
    ("t", tuple),
    ("s", set),
    ("f", frozenset),
)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (type(None), bool, int, float, complex, str, bytes))


def _is_builtin(kind: type) -> bool:
    return vars(builtins).get(kind.__name__) is kind


def _text(value: Any) -> str:
    if type(value) is not str:
        raise ProtocolError("a string was expected")
    return value


def _ident(value: Any) -> int:
    if type(value) is not int:
        raise ProtocolError("an object id was expected")
    return value


def _pair(item: Any) -> tuple[Any, Any]:
    if type(item) is not list or len(item) != 2:
        raise ProtocolError("a dict item that is not [key, value]")
    return item[0], item[1]


def _module(name: str) -> types.ModuleType | None:
    """The judge's own copy of a standard-library module the program names (``math``), else None."""
    # The sandbox runs the system's Python, which may predate stdlib_module_names (3.10): then the program's own.
    if name.partition(".")[0] not in getattr(sys, "stdlib_module_names", ()):
        return None
    try:
        import importlib

        return importlib.import_module(name)
    except ImportError:
        return None


def _exception(name: Any, message: Any) -> BaseException:
    """The other side's exception, as the builtin exception of that name when there is one."""
    kind = getattr(builtins, name, None) if type(name) is str else None
    text = message if type(message) is str else ""
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(text) if text else kind()
        except Exception:  # noqa: BLE001 - an exception type that needs other arguments (UnicodeDecodeError)
            pass
    return ProgramError(f"{name}: {text}" if text else str(name))


def _message(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - a program's exception whose __str__ fails
        return ""


def _apply(op: str, target: Any, values: list[Any]) -> Any:
    """One operation on one of this side's objects, with arguments already decoded."""
    if op == "call":
        args, kwargs = values
        if type(args) is not list or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            raise ProtocolError("call arguments are not [args, kwargs]")
        return target(*args, **kwargs)
    if op == "getattr":
        return getattr(target, _text(values[0]))
    if op == "setattr":
        return setattr(target, _text(values[0]), values[1])
    if op == "getitem":
        return target[values[0]]
    if op == "setitem":
        target[values[0]] = values[1]
        return None
    unary: dict[str, Callable[[Any], Any]] = {
        "iter": iter,
        "next": next,
        "len": len,
        "bool": bool,
        "str": str,
        "repr": repr,
        "int": int,
        "float": float,
    }
    if op in unary and not values:
        return unary[op](target)
    raise ProtocolError(f"an unknown request {op!r}")


# ---- the program process ----------------------------------------------------------------------------------------

_program: dict[str, Any] = {}


def _load(source: Any, limits: Any) -> dict[str, Any]:
    """Cap this process, run the program (the item's prefix and the reply's code) in a fresh namespace, and return
    its top-level names, for the judge to bind where the tests use them."""
    if type(source) is not str or type(limits) is not dict:
        raise ProtocolError("load takes a source and limits")
    for name, (soft, hard) in limits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    _SOURCES[PROGRAM] = source
    _program.update({"__name__": "__program__", "__builtins__": builtins})
    exec(compile(source, PROGRAM, "exec"), _program)
    return {name: value for name, value in _program.items() if not name.startswith("__")}


def _serve_program(peer: Peer) -> None:
    """The program process: answer the judge's requests until it closes the pipe."""
    pid = os.getpid()
    while True:
        try:
            message = peer.receive()
        except ProgramExited:  # the judge is done
            return
        answer = peer.serve(message)
        if os.getpid() != pid:
            os._exit(0)  # a process the program forked returned here: only the original answers
        sys.stdout.flush()
        peer.send(answer)


def _run_program(peer: Peer) -> None:
    code = 0
    try:
        _serve_program(peer)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        if stop.code is not None and not isinstance(stop.code, int):
            sys.stderr.write(f"{stop.code}\n")
    except BaseException as error:  # noqa: BLE001 - whatever ends the program, it ends here and nowhere else
        _print_traceback(error, (PROGRAM,))
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - the program may have closed or replaced them
                pass
        os._exit(code)


# ---- the judge --------------------------------------------------------------------------------------------------


def _judge(peer: Peer, job: dict[str, Any], namespace: dict[str, Any], pid: int) -> str:
    """Run the tests against the program; "" when they all passed, else why not."""
    _SOURCES[TESTS] = job["tests"]
    try:
        names = peer.request("load", job["prefix"] + job["code"], job["limits"])
        if type(names) is not dict or not all(type(k) is str for k in names):
            raise ProtocolError("names are not a dict of strings")
        entry = job["entry_point"]
        for name, value in names.items():
            # A program's name never hides a builtin the tests use (its own ``set`` would answer both sides of a
            # comparison), nor the prefix's helpers, except the entry point itself.
            if name == entry or (name not in namespace and not hasattr(builtins, name)):
                namespace[name] = value
        exec(compile(job["tests"], TESTS, "exec"), namespace)
        if peer.broken is not None:  # the tests caught it (``except BaseException``) and went on
            raise peer.broken
    except ProgramExited:
        return _exit_reason(pid, job["limits"]["RLIMIT_CPU"][0])
    except ProtocolError as error:
        return f"the program broke the judge's protocol: {error}"
    except BaseException as error:  # noqa: BLE001 - a test failed: whatever it raised is the reason
        return _print_traceback(error, (PREFIX, TESTS))[:300]
    return ""


def _exit_reason(pid: int, cpu_s: int) -> str:
    """Why the program process stopped answering: its exit status or signal, waited for up to a second."""
    status = None
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "the program closed its pipes to the judge"
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum == signal.SIGXCPU:
            return f"CPU time limit ({cpu_s} s)"
        return f"killed by signal {signal.Signals(signum).name}" if signum in _SIGNALS else f"signal {signum}"
    code = os.WEXITSTATUS(status)
    return "exited before the tests finished" + (f" (exit status {code})" if code else "")


_SIGNALS = {s.value for s in signal.Signals}


def _print_traceback(error: BaseException, files: tuple[str, ...]) -> str:
    """Print the traceback's frames in ``files`` only (the program's, or the tests'), then the exception; return the
    exception's line."""
    try:
        import linecache
        import traceback

        for name in files:
            source = _SOURCES.get(name, "")
            linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename in files]
        lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else []
        lines += traceback.format_exception_only(type(error), error)
        sys.stderr.write("".join(lines))
        sys.stderr.flush()
        return lines[-1].strip()
    except BaseException:  # noqa: BLE001 - a program's exception that cannot even be printed
        return type(error).__name__


def _read(fd: int, size: int | None = None) -> bytes:
    """Exactly ``size`` bytes of ``fd`` (all of it when None), never more: what is not read stays in the pipe."""
    data = b""
    while size is None or len(data) < size:
        chunk = os.read(fd, 2**20 if size is None else size - len(data))
        if not chunk:
            if size is None:
                return data
            raise EOFError(f"the job ended after {len(data)} of {size} bytes")
        data += chunk
    return data


def main() -> None:
    """The judge: read the job's public part, fork the program process, read the tests, run them, write the
    verdict on stdout.

    The job on stdin is a length, the public part (the item's prefix, the code, the entry point, the limits) and
    then the tests. The prefix runs here before the fork, so the program process starts with what it imports
    (HumanEval's ``typing``) already loaded; the tests are read only after the fork and after the judge made itself
    non-dumpable, and the program runs nothing before the judge asks it to.
    """
    (size,) = _HEADER.unpack(_read(0, _HEADER.size))
    job = json.loads(_read(0, size))
    # The item's own prefix (HumanEval's prompt, with its helpers) runs here too: the tests use these helpers, never
    # a program's redefinition of them.
    _SOURCES[PREFIX] = job["prefix"]
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(job["prefix"], PREFIX, "exec"), namespace)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a program's SIGINT is no KeyboardInterrupt in the judge
    to_program, to_judge = os.pipe(), os.pipe()
    verdict = os.dup(1)
    os.dup2(2, 1)  # both processes print to the sandbox's stderr: the verdict's descriptor is the judge's alone
    pid = os.fork()
    if pid == 0:
        for fd in (verdict, to_program[1], to_judge[0]):
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the tests, still unread, stay the judge's
        os.close(null)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _run_program(Peer(to_program[0], to_judge[1], judge=False))
    os.close(to_program[0])
    os.close(to_judge[1])
    import ctypes  # after the fork: the program process needs none of it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    job.update(json.loads(_read(0)))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for name, (soft, hard) in job["limits"].items():
        if name != "RLIMIT_NPROC":  # the judge forks nothing more; the program's processes count against it
            resource.setrlimit(getattr(resource, name), (soft, hard))
    reason = _judge(Peer(to_judge[0], to_program[1], judge=True), job, namespace, pid)
    os.write(verdict, json.dumps({"passed": not reason, "reason": reason or "passed"}).encode() + b"\n")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
