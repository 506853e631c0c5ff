import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data, read in place: REDPEN_DATA_DIR, else ../shared/data beside the checkout."""
    path = Path(os.environ.get("REDPEN_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"benchmark data not found at {path}; set REDPEN_DATA_DIR")
    return path
