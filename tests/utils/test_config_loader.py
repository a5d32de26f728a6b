from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from ofa_scale.errors import ConfigError
from ofa_scale.utils.config import apply_overrides, flatten, load_config


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    path: Optional[str] = None
    optim: Optim = field(default_factory=Optim)

    def validate(self):
        if self.steps <= 0:
            raise ConfigError("steps must be positive")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\noptim:\n  lr: 0.001\n")
    cfg = load_config(Cfg, p, ["optim.lr=3e-4", "precision=bf16", "path=/x"])
    assert cfg.steps == 5 and cfg.optim.lr == pytest.approx(3e-4) and cfg.precision == "bf16" and cfg.path == "/x"
    assert cfg.optim.betas == (0.9, 0.999)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "did you mean 'optim.lr'"),
        (["steps=ten"], "expected an integer"),
        (["precision=fp8"], "is not one of"),
        (["steps=0"], "steps must be positive"),
        (["optim=3"], "expected a mapping"),
        (["novalue"], "key.path=value"),
    ],
)
def test_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)


def test_flatten_and_apply():
    d = apply_overrides({}, ["a.b.c=1", "a.d=[1, 2]"])
    assert d == {"a": {"b": {"c": 1}, "d": [1, 2]}}
    assert flatten(d) == {"a.b.c": 1, "a.d": [1, 2]}
