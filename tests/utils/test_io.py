import json

from ofa_scale.utils.io import atomic_write_json


def test_atomic_write_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "m.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]
