"""Where the benchmark data lives: ``--data-dir`` or ``$REDPEN_DATA_DIR``, read in place."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import ConfigError


def default_data_dir() -> Path | None:
    value = os.environ.get("REDPEN_DATA_DIR")
    return Path(value).expanduser() if value else None


def resolve_data_dir(data_dir: Path | None) -> Path:
    path = data_dir or default_data_dir()
    if path is None:
        raise ConfigError("no data directory: pass --data-dir or set REDPEN_DATA_DIR (the benchmark data folder)")
    if not path.is_dir():
        raise ConfigError(f"data directory {path} does not exist: pass --data-dir or set REDPEN_DATA_DIR")
    return path
