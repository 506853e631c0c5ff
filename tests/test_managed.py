"""The managed-server mechanism (runtime/models/managed.py) on a real subprocess: a tiny HTTP server script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime.errors import BackendError
from runtime.models.managed import ManagedServer, ServerCommand

# Answers /health with 200 and the key it was given, after a short load; exits at once with a message if told to.
SERVER = textwrap.dedent(
    """
    import http.server, os, sys, time
    if os.environ.get("FAIL"):
        print("error: cannot load model file", flush=True)
        sys.exit(3)
    time.sleep(0.5)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = os.environ["KEY"].encode()
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


def command(tmp_path: Path, **env: str) -> ServerCommand:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    return ServerCommand("the test server", [sys.executable, str(script), "{port}"], {"KEY": "{api_key}", **env})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_starts_healthy_on_loopback_with_its_own_key_and_stops(tmp_path: Path) -> None:
    import urllib.request

    server = ManagedServer(command(tmp_path), tmp_path / "server.log").start()
    try:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health") as response:
            assert response.read().decode() == server.api_key  # the key reached the server through its env
        assert len(server.api_key) >= 24
        pid = server._process.pid if server._process else -1
        assert alive(pid)
    finally:
        server.stop()
    assert not alive(pid)
    server.stop()  # twice is fine


def test_a_server_that_exits_is_one_line_with_its_last_log_line(tmp_path: Path) -> None:
    server = ManagedServer(command(tmp_path, FAIL="1"), tmp_path / "server.log")
    with pytest.raises(BackendError) as error:
        server.start()
    message = str(error.value)
    assert "exited (code 3)" in message and "cannot load model file" in message and "\n" not in message


def test_no_server_outlives_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL of the process that started the server (no atexit, no finally) still ends the server."""
    parent = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path.cwd())!r})
        from pathlib import Path
        from runtime.models.managed import ManagedServer, ServerCommand
        command = ServerCommand("s", [sys.executable, {str(tmp_path / "server.py")!r}, "{{port}}"], {{"KEY": "k"}})
        server = ManagedServer(command, Path({str(tmp_path / "p.log")!r})).start()
        print(server._process.pid, flush=True)
        time.sleep(600)
        """
    )
    command(tmp_path)  # writes server.py
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    child = int(process.stdout.readline())
    assert alive(child)
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_check_says_when_the_server_died(tmp_path: Path) -> None:
    server = ManagedServer(command(tmp_path), tmp_path / "server.log").start()
    assert server._process is not None
    server._process.kill()
    server._process.wait()
    with pytest.raises(BackendError, match="exited"):
        server.check()
    server.stop()
