import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BPE_DIR = SHARED / "ofa-bpe"
SPEC_DIR = SHARED / "reference"

# Keep every test single-threaded per process unless it asks otherwise: the machine has 2 cores and several
# multi-process tests run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def bpe_dir() -> Path:
    if not (BPE_DIR / "encoder.json").is_file():
        pytest.fail(f"OFA BPE files not found at {BPE_DIR}; the suite reads them from ../shared/ofa-bpe")
    return BPE_DIR
