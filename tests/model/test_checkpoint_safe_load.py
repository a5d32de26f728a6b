"""Safe checkpoint loading: allow-listed contents load, anything that could run code is refused unexecuted.

OmegaConf is not installed here, so `fake_omegaconf()` registers modules named like OmegaConf's with classes that
pickle exactly as its containers do (same module/class names, NEWOBJ + BUILD with the `__dict__` state that
`Node.__getstate__` returns: `_metadata`, `_parent`, `_content`/`_val`; Metadata dataclasses with a
`defaultdict(dict)` resolver cache; `typing.Any`/`Optional[...]` type references). The modules are removed before
loading, so the loader must cope without OmegaConf, as on a user's machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import pickle
import sys
import types
import typing
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from ofa_scale.errors import UserError
from ofa_scale.model.safe_load import safe_torch_load


@contextlib.contextmanager
def fake_omegaconf():
    """Yield `to_omegaconf(plain)` that converts dicts/lists/values into OmegaConf-shaped objects."""
    names = ["omegaconf", "omegaconf.base", "omegaconf.nodes", "omegaconf.dictconfig", "omegaconf.listconfig"]
    mods = {n: types.ModuleType(n) for n in names}

    def place(cls, module):
        cls.__module__ = module
        cls.__qualname__ = cls.__name__
        setattr(mods[module], cls.__name__, cls)
        return cls

    @dataclasses.dataclass
    class Metadata:
        ref_type: typing.Any
        object_type: typing.Any
        optional: bool
        key: typing.Any
        flags: typing.Optional[dict] = None
        flags_root: bool = False
        resolver_cache: dict = dataclasses.field(default_factory=lambda: defaultdict(dict))

    @dataclasses.dataclass
    class ContainerMetadata(Metadata):
        key_type: typing.Any = None
        element_type: typing.Any = None

    class Node:
        def __init__(self, parent, metadata):
            self.__dict__["_metadata"] = metadata
            self.__dict__["_parent"] = parent
            self.__dict__["_flags_cache"] = None

        def __getstate__(self):
            state = copy.copy(self.__dict__)
            del state["_flags_cache"]
            return state

    class DictConfig(Node):
        pass

    class ListConfig(Node):
        pass

    class AnyNode(Node):
        pass

    class StringNode(Node):
        pass

    class IntegerNode(Node):
        pass

    class FloatNode(Node):
        pass

    class BooleanNode(Node):
        pass

    place(Metadata, "omegaconf.base")
    place(ContainerMetadata, "omegaconf.base")
    place(DictConfig, "omegaconf.dictconfig")
    place(ListConfig, "omegaconf.listconfig")
    for cls in (AnyNode, StringNode, IntegerNode, FloatNode, BooleanNode):
        place(cls, "omegaconf.nodes")

    def to_omegaconf(value, parent=None, key=None):
        if isinstance(value, dict):
            node = DictConfig(parent, ContainerMetadata(typing.Any, dict, True, key, {"struct": True},
                                                         key_type=typing.Any, element_type=typing.Any))
            node.__dict__["_content"] = {k: to_omegaconf(v, node, k) for k, v in value.items()}
            return node
        if isinstance(value, list):
            node = ListConfig(parent, ContainerMetadata(typing.Any, list, True, key, {},
                                                         key_type=int, element_type=typing.Any))
            node.__dict__["_content"] = [to_omegaconf(v, node, i) for i, v in enumerate(value)]
            return node
        cls, ref = {bool: (BooleanNode, typing.Optional[bool]), int: (IntegerNode, typing.Optional[int]),
                    float: (FloatNode, typing.Optional[float]), str: (StringNode, typing.Optional[str])}.get(
            type(value), (AnyNode, typing.Any))
        node = cls(parent, Metadata(ref, typing.Any, True, key, {}))
        node.__dict__["_val"] = value
        return node

    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(mods)
    try:
        yield to_omegaconf
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


def save_with_omegaconf_cfg(obj_with_plain_cfg: dict, path: Path) -> None:
    """torch.save `obj` with its `cfg` entry converted to (fake) OmegaConf containers."""
    with fake_omegaconf() as to_omegaconf:
        obj = dict(obj_with_plain_cfg)
        obj["cfg"] = to_omegaconf(obj["cfg"])
        torch.save(obj, path)


PLAIN_CFG = {
    "common": {"fp16": True, "seed": 7, "log_format": "simple", "tensorboard_logdir": None},
    "model": {"arch": "ofa_tiny", "encoder_embed_dim": 256, "dropout": 0.1, "layers": [1, 2, {"x": "y"}],
              "missing": "???", "interp": "${common.seed}", "ns": argparse.Namespace(a=1, b=[2.5])},
    "task": {"_name": "vqa_gen", "max_src_length": 80},
}


def test_omegaconf_cfg_loads_as_plain_dicts_without_omegaconf(tmp_path):
    path = tmp_path / "ckpt.pt"
    weights = {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}
    save_with_omegaconf_cfg({"cfg": PLAIN_CFG, "model": weights}, path)
    assert "omegaconf" not in sys.modules
    with open(path, "rb") as f:  # the pickle really names OmegaConf's classes
        raw = f.read()
    assert b"omegaconf.dictconfig" in raw or b"DictConfig" in raw
    loaded = safe_torch_load(path)
    assert loaded["cfg"]["common"] == PLAIN_CFG["common"]
    model = loaded["cfg"]["model"]
    assert model["layers"] == [1, 2, {"x": "y"}]
    assert model["missing"] == "???" and model["interp"] == "${common.seed}"
    assert isinstance(model["ns"], argparse.Namespace) and vars(model["ns"]) == {"a": 1, "b": [2.5]}
    assert loaded["cfg"]["task"] == PLAIN_CFG["task"]
    assert torch.equal(loaded["model"]["w"], weights["w"]) and loaded["model"]["w"].dtype == torch.float16


def test_namespace_numpy_and_ordered_dict_load(tmp_path):
    path = tmp_path / "ckpt.pt"
    obj = {"args": argparse.Namespace(arch="ofa_base", lr=[5e-5]),
           "model": OrderedDict(a=torch.ones(2), n=torch.tensor(3)),
           "extra_state": {"best": np.float64(1.25), "epoch": 3, "count": np.int64(4)}}
    torch.save(obj, path)
    loaded = safe_torch_load(path)
    assert vars(loaded["args"]) == {"arch": "ofa_base", "lr": [5e-5]}
    assert isinstance(loaded["model"], OrderedDict) and list(loaded["model"]) == ["a", "n"]
    assert float(loaded["extra_state"]["best"]) == 1.25 and int(loaded["extra_state"]["count"]) == 4


class _RunsCode:
    """Pickles as a call to os.system (what a malicious checkpoint would contain)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path, legacy_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra_state": _RunsCode(marker)}, path,
               _use_new_zipfile_serialization=not legacy_format)
    with pytest.raises(UserError) as err:
        safe_torch_load(path)
    assert "system" in str(err.value)  # names the offending global (posix.system / os.system)
    assert "allow-list" in str(err.value)
    assert not marker.exists()


def test_plain_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _RunsCode(marker)}, protocol=2))
    with pytest.raises(UserError):
        safe_torch_load(path)
    assert not marker.exists()


class _Custom:
    pass


def test_unknown_class_is_refused_with_its_name(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "thing": _Custom()}, path)
    with pytest.raises(UserError, match="_Custom"):
        safe_torch_load(path)


def test_missing_and_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        safe_torch_load(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError):
        safe_torch_load(bad)


@pytest.mark.parametrize("kind", ["random", "pickle", "zip", "empty", "text"])
def test_a_file_that_is_not_a_checkpoint_is_named_without_torchs_weights_only_advice(tmp_path, kind):
    import random
    import zipfile

    path = tmp_path / f"{kind}.pt"
    if kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}))  # a pickle, but not torch.save's format
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("model: ofa_base\n")
    with pytest.raises(UserError) as err:
        safe_torch_load(path)
    message = str(err.value)
    expected = {"zip": "is a zip archive but not a torch checkpoint (no data.pkl inside)",
                "empty": "is empty, not a torch checkpoint"}.get(
        kind, "is not a torch checkpoint: it is neither a zip archive (what torch.save writes) nor a legacy torch file")
    assert expected in message and "weights_only" not in message
