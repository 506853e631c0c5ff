"""The README's `redpen serve` examples run as written: each curl of its Serving section gets a 2xx answer.

The blocks run in bash against servers started here (a tiny model named as the embedded one; a memory-guided app
with scripted roles), with ``KEY`` set and ``localhost:8000`` pointed at them; the lines that start the server or
make the key are what this test does itself.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from agents.team import Roles
from memory.embed import HashingEmbedder
from memory.store import MistakeMemory
from runtime.models.default_model import DEFAULT_MODEL_NAME
from runtime.models.local import LocalBackend
from runtime.server import Guided, KeyRing, Ledger, build_app
from tests.helpers import FakeAssistant, FakeStudent, build_tiny_model, running

README = Path(__file__).resolve().parent.parent / "README.md"
# Every curl fails the block on an HTTP error (its body still printed), and its answer ends with a newline.
PRELUDE = 'set -eo pipefail\ncurl() { command curl --fail-with-body "$@"; echo; }\n'


def serving_blocks() -> list[str]:
    """The Serving section's bash blocks that send requests (one only of `redpen` commands, a bench, has none)."""
    section = README.read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [
        "\n".join(line for line in block.splitlines() if not re.match(r"(KEY=\$\()?redpen ", line))
        for block in blocks
        if "curl " in block
    ]


def run_block(block: str, base: str, key: str) -> str:
    script = PRELUDE + block.replace("localhost:8000", base)
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=600, env={**os.environ, "KEY": key}
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_serving_example_in_the_readme_answers(tmp_path: Path) -> None:
    plain, guided = serving_blocks()
    assert plain.count("curl ") == 5 and guided.count("curl ") == 2
    keys = KeyRing(tmp_path / "keys.json")
    key = keys.add("my-app")

    backend = LocalBackend(build_tiny_model(tmp_path / DEFAULT_MODEL_NAME), max_batch_size=4)
    with running(build_app(backend, keys=keys)) as url:
        out = run_block(plain, url.removeprefix("http://").removesuffix("/v1"), key)
    assert out.count('"object": "chat.completion"') + out.count('"object":"chat.completion"') == 3
    assert "data: [DONE]" in out and '"text_completion"' in out and '"tool_calls"' in out

    memory = MistakeMemory(location=":memory:", embedder=HashingEmbedder())
    roles = Roles(FakeStudent(DEFAULT_MODEL_NAME), FakeAssistant())
    app = build_app(roles.student, keys=keys, guided=Guided(roles, memory, Ledger(tmp_path / "ledger.sqlite")))
    try:
        with running(app) as url:
            out = run_block(guided, url.removeprefix("http://").removesuffix("/v1"), key)
        assert '"recorded":true' in out.replace(" ", "") and memory.count() == 1
    finally:
        memory.close()


@pytest.mark.parametrize("block", range(2))
def test_the_readme_curls_send_json(block: int) -> None:
    """Without a Content-Type, curl -d sends a form, which the server refuses (the README once did)."""
    text = serving_blocks()[block]
    assert text.count('-H "Content-Type: application/json"') == text.count("curl ")
