import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# LiteLLM fetches a price list from the internet when it is imported; its bundled copy needs no network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Teacher roles keep the student's model unless a test asks for the embedded teacher (tests/test_teacher.py): a
# test that starts a 1.5B llama.cpp server says so.
os.environ.setdefault("REDPEN_TEACHER", "off")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data, read in place: REDPEN_DATA_DIR, else ../shared/data beside the checkout."""
    path = Path(os.environ.get("REDPEN_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"benchmark data not found at {path}; set REDPEN_DATA_DIR")
    return path
