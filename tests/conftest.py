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


# The slow stage's longest files (minutes each, most of them one test), in the order .ci/run's two workers should
# start them: with `--no-loadscope-reorder` xdist hands out files in collection order, and otherwise it starts
# with the files that hold the most tests, which left a 7-minute end-to-end file running alone at the end.
LONGEST_FIRST = (
    "tests/finetune/test_refcoco_e2e.py",
    "tests/finetune/test_image_gen_e2e.py",
    "tests/finetune/test_recipes_e2e.py",
    "tests/finetune/test_imagenet_e2e.py",
    *sorted(LAYOUT_RUN_FILES),
    "tests/finetune/test_text_recipes_e2e.py",
    "tests/benchmarks/test_gpu_check.py",
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep order
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if "layout_runs" in getattr(item, "fixturenames", ()) and path not in LAYOUT_RUN_FILES:
            raise pytest.UsageError(f"{item.nodeid} reads layout_runs: add {path} to LAYOUT_RUN_FILES in "
                                    f"tests/conftest.py")


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
