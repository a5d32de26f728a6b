import os
from pathlib import Path

import pytest

try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # the suite also runs in one process without pytest-xdist
    LoadFileScheduling = None

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


# The files whose tests read the session-scoped `layout_runs` fixture (tests/parallel/conftest.py: ten DeepSpeed
# launches). Under pytest-xdist they form one scope, so one worker builds the matrix once; collection refuses a test
# elsewhere that reads it.
LAYOUT_RUN_FILES = frozenset({
    "tests/parallel/test_canonical_sharded.py",
    "tests/parallel/test_equivalence.py",
    "tests/parallel/test_planner.py",
})


def pytest_collection_modifyitems(items):
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if "layout_runs" in getattr(item, "fixturenames", ()) and path not in LAYOUT_RUN_FILES:
            raise pytest.UsageError(f"{item.nodeid} reads layout_runs: add {path} to LAYOUT_RUN_FILES in tests/conftest.py")


if LoadFileScheduling is not None:
    class _SharedFixtureFileScheduling(LoadFileScheduling):
        """`--dist loadfile` (a file's tests in one worker, for its module fixtures), with LAYOUT_RUN_FILES as one
        scope. (xdist's `loadgroup` marks would say this, but pytest 9 no longer reports the group suffix xdist
        appends to node ids, so the controller never sees the groups.)"""

        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return "layout_runs" if path in LAYOUT_RUN_FILES else path

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadfile":
            return _SharedFixtureFileScheduling(config, log)
        return None
