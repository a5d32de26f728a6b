"""Session fixtures for tests/parallel: the multi-process layout runs (launched through parallel_launch)."""

import pytest

from parallel_launch import LAYOUTS, RESUMES, SAVE_AT, STEPS, launch


@pytest.fixture(scope="session")
def layout_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    init = root / "init"
    launch("write_init", 1, root / "write_init", dir=str(init))
    runs = {}
    for name, spec in LAYOUTS.items():
        spec = dict(spec)
        world = spec.pop("world")
        params = dict(init=str(init), steps=STEPS, **spec)
        if spec.get("save_at"):
            params["save_dir"] = str(root / f"{name}-step{SAVE_AT}")
        if spec.get("export"):
            params["export"] = str(root / f"{name}-final")  # a canonical checkpoint directory
        runs[name] = {"ranks": launch("train", world, root / name, **params), "params": params}
    for name, (source, spec) in RESUMES.items():
        spec = dict(spec)
        world = spec.pop("world")
        params = dict(resume=runs[source]["params"]["save_dir"], steps=STEPS - SAVE_AT,
                      export_at_start=str(root / f"{name.replace('>', '')}-start"), **spec)
        runs[name] = {"ranks": launch("train", world, root / name.replace(">", ""), **params), "params": params}
    runs["root"] = root
    return runs


def pytest_collection_modifyitems(items):
    # The layout matrix is ten DeepSpeed launches of up to 4 ranks (~5 minutes on 2 cores, a quarter of the suite), so
    # every test that reads it is `slow`: run by .ci/run, not by `make test`. `make test` keeps one 2-rank equivalence
    # test per axis at trainer level (tests/train/test_train_parallel.py for tp=2 and pp=2, test_train_e2e.py for
    # ZeRO-3).
    for item in items:
        if "layout_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
