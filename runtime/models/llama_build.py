"""Build llama.cpp's ``llama-server`` once, from the source that llama-cpp-python ships on PyPI.

llama-cpp-python's source distribution vendors llama.cpp; its own wheel holds only the library, so redpen builds
the server target from that same source (cmake and a C++ compiler, as pip would use) into the cache. Only the
``llama-server`` target is built, statically linked: one binary with nothing else to find at run time.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from runtime.errors import ConfigError
from runtime.models.default_model import cache_root

log = logging.getLogger(__name__)

# Pinned: the server's flags and API are those of this release's vendored llama.cpp.
LLAMA_CPP_PYTHON = "0.3.36"
_CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # The web UI would be fetched from a model hub at build time; redpen only uses the API.
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def built_server() -> Path:
    return cache_root() / "llama.cpp" / LLAMA_CPP_PYTHON / "llama-server"


def build_llama_server(progress: Callable[[int, str], None] | None = None) -> Path:
    """The cached ``llama-server``, building it first if needed; ``progress(percent, line)`` while it compiles.

    The build runs in a temporary folder and the binary is moved into place only when it is complete, so a killed
    build leaves nothing that looks finished.
    """
    target = built_server()
    if target.is_file():
        return target
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise ConfigError(f"building llama-server needs {tool}: install it (Debian: apt-get install cmake g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    log_path = cache_root() / "logs" / "llama-server-build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Line-buffered: the log can be followed while the build runs.
    with (
        tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as work,
        log_path.open("w", buffering=1) as sink,
    ):
        folder = Path(work)
        source = _source(folder, sink)
        build = folder / "build"
        log.info("building llama-server from llama-cpp-python %s (log %s)", LLAMA_CPP_PYTHON, log_path)
        _run(["cmake", "-S", str(source), "-B", str(build), *_CMAKE_FLAGS], sink, log_path)
        jobs = str(os.cpu_count() or 1)
        _run(
            ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], sink, log_path, progress=progress
        )
        binary = build / "bin" / "llama-server"
        tmp = target.with_suffix(".tmp")
        shutil.copy2(binary, tmp)
        tmp.replace(target)
    return target


def _source(folder: Path, sink: TextIO) -> Path:
    """llama-cpp-python's source distribution, downloaded by pip and unpacked: its vendored llama.cpp."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        "-d",
        str(folder),
    ]
    _run(command, sink, None)
    (archive,) = folder.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    (root,) = folder.glob("llama_cpp_python-*/vendor/llama.cpp")
    return root


def _run(
    command: list[str], sink: TextIO, log_path: Path | None, progress: Callable[[int, str], None] | None = None
) -> None:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        sink.write(line)
        tail = [*tail[-5:], line.rstrip()]
        match = _PERCENT.match(line)
        if match and progress is not None:
            progress(int(match.group(1)), line.rstrip())
    if process.wait() != 0:
        where = f"; the whole log: {log_path}" if log_path else ""
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        raise ConfigError(f"`{' '.join(command[:4])} ...` failed (exit {process.returncode}): {last}{where}")
