"""Read torch/fairseq checkpoints without ever executing code stored in them.

`safe_torch_load(path)` is `torch.load(weights_only=True)` plus an explicit allow-list of the few non-tensor
globals that fairseq/OFA checkpoints legitimately carry:

* `argparse.Namespace` (legacy `args`, and `cfg["model"]` of OFA's legacy-registered architectures); the real
  class is allowed: unpickling it only creates an empty Namespace and updates its `__dict__`.
* OmegaConf containers (older fairseq pickled `cfg` as a `DictConfig`): `DictConfig`, `ListConfig`, the value
  nodes, `Metadata`/`ContainerMetadata`, and the type references their metadata holds (`typing.Any`,
  `typing.Dict`, `builtins.dict`, `Optional[...]` via `operator.getitem`, the empty `defaultdict(dict)` resolver
  cache).
* numpy scalars and dtypes (training meters / best scores in `extra_state`).

Design: OmegaConf is usually not installed and we do not want to depend on it, so every OmegaConf name is mapped
(`torch.serialization.safe_globals` accepts `(object, "pickled.name")` pairs) to an inert stand-in class defined
here. The weights-only unpickler then builds stand-ins with `__new__` + `__setstate__` only, and afterwards
`_materialise` turns them into plain dicts/lists/values. Type references become `TypeRef` names; the few calls a
pickle may make (`operator.getitem`, `defaultdict`, `type`) are routed to our own functions that build names or
empty dicts, never to the real callables. Anything else (e.g. an `os.system` reduce) is refused before
unpickling starts, with an error naming the offending globals.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ofa_scale.errors import UserError


@dataclass(frozen=True)
class TypeRef:
    """A type or typing construct named by a pickle (kept as its name; never resolved or called)."""

    name: str

    def __str__(self) -> str:
        return self.name


class _StandIn:
    """Base of the inert stand-ins: remembers the pickled state, has no behaviour."""

    pickled_name = "?"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_pickled_state"] = state

    @property
    def state(self) -> dict:
        state = self.__dict__.get("_pickled_state")
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            return merged
        return state if isinstance(state, dict) else {}


class OmegaDictConfig(_StandIn):
    pickled_name = "DictConfig"


class OmegaListConfig(_StandIn):
    pickled_name = "ListConfig"


class OmegaValueNode(_StandIn):
    pickled_name = "ValueNode"


class OmegaMetadata(_StandIn):
    pickled_name = "Metadata"


def _typing_subscript(origin: Any, args: Any) -> TypeRef:
    """Stand-in for `operator.getitem(typing.X, args)` (how `Optional[int]`, `Dict[str, Any]` pickle)."""
    args = args if isinstance(args, tuple) else (args,)
    return TypeRef(f"{origin}[{', '.join(str(a) for a in args)}]")


def _type_of(obj: Any) -> TypeRef:
    """Stand-in for `builtins.type(obj)` (how `NoneType` pickles)."""
    return TypeRef(f"type({obj!r})")


def _empty_defaultdict(*_factory: Any) -> dict:
    """Stand-in for `collections.defaultdict(factory)`: a plain dict (items follow via SETITEMS)."""
    return {}


_OMEGACONF_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode",
                    "EnumNode", "ValueNode", "UnionNode", "InterpolationResultNode")
_TYPE_NAMES = ("typing.Any", "typing.Dict", "typing.List", "typing.Tuple", "typing.Optional", "typing.Union",
               "typing.Type", "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int",
               "builtins.float", "builtins.bool", "builtins.bytes", "builtins.object", "pathlib.Path")


def _numpy_globals() -> list[tuple[Any, str]]:
    """numpy scalar/dtype reconstruction (data only: `scalar(dtype, bytes)`, `dtype(code, align, copy)`)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of the package
        return []
    core = getattr(np, "_core", None) or np.core
    out: list[tuple[Any, str]] = [(np.dtype, "numpy.dtype")]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((core.multiarray.scalar, f"{mod}.scalar"))
    for name in dir(getattr(np, "dtypes", object())):
        if name.endswith("DType"):
            out.append((getattr(np.dtypes, name), f"numpy.dtypes.{name}"))
    return out


def allowed_globals() -> list[tuple[Any, str]]:
    """The explicit allow-list, as (object, pickled name) pairs for `torch.serialization.safe_globals`."""
    out: list[tuple[Any, str]] = [(argparse.Namespace, "argparse.Namespace")]
    for mod in ("omegaconf.dictconfig", "omegaconf"):
        out.append((OmegaDictConfig, f"{mod}.DictConfig"))
    for mod in ("omegaconf.listconfig", "omegaconf"):
        out.append((OmegaListConfig, f"{mod}.ListConfig"))
    for mod in ("omegaconf.nodes", "omegaconf", "omegaconf.base"):
        out.extend((OmegaValueNode, f"{mod}.{n}") for n in _OMEGACONF_NODES)
    for name in ("Metadata", "ContainerMetadata"):
        out.append((OmegaMetadata, f"omegaconf.base.{name}"))
    out.extend((TypeRef(n), n) for n in _TYPE_NAMES)
    out.extend((_typing_subscript, f"{mod}.getitem") for mod in ("operator", "_operator"))
    out.append((_type_of, "builtins.type"))
    out.append((_empty_defaultdict, "collections.defaultdict"))
    out.extend(_numpy_globals())
    return out


def _materialise(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """Replace stand-ins by plain Python values, recursively (tensors are returned as they are)."""
    memo = {} if memo is None else memo
    if isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None))):
        return obj
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, OmegaDictConfig):
        content = obj.state.get("_content")
        if isinstance(content, dict):
            out: Any = {}
            memo[key] = out
            for k, v in content.items():
                out[_materialise(k, memo)] = _materialise(v, memo)
            return out
        return _materialise(content, memo)  # None, "???" (missing) or an unresolved "${...}" interpolation
    if isinstance(obj, OmegaListConfig):
        content = obj.state.get("_content")
        if isinstance(content, list):
            out = []
            memo[key] = out
            out.extend(_materialise(v, memo) for v in content)
            return out
        return _materialise(content, memo)
    if isinstance(obj, OmegaValueNode):
        return _materialise(obj.state.get("_val"), memo)
    if isinstance(obj, TypeRef):
        return obj.name
    if isinstance(obj, OmegaMetadata):
        return None
    if isinstance(obj, argparse.Namespace):
        memo[key] = obj
        for k, v in list(vars(obj).items()):
            setattr(obj, k, _materialise(v, memo))
        return obj
    if isinstance(obj, dict):  # dict, OrderedDict, Counter: mutate in place to keep types and sharing
        memo[key] = obj
        for k in list(obj.keys()):
            obj[k] = _materialise(obj[k], memo)
        return obj
    if isinstance(obj, list):
        memo[key] = obj
        for i, v in enumerate(obj):
            obj[i] = _materialise(v, memo)
        return obj
    if isinstance(obj, tuple):
        out = tuple(_materialise(v, memo) for v in obj)
        memo[key] = out
        return out
    return obj


_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")


def _refusal(path: Path, names: list[str]) -> UserError:
    listed = ", ".join(sorted(set(names)))
    return UserError(
        f"refusing to load {path}: it references {listed}, which is not on the allow-list of checkpoint contents "
        "(tensors, argparse.Namespace, OmegaConf configs, numpy scalars) and could run code when unpickled; "
        "if you trust the file, re-save just its 'model' and 'cfg' entries with torch.save and import that")


# torch.save's legacy (pre-zip) format opens with this number, pickled (torch/serialization.py MAGIC_NUMBER)
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_TORCH_ADVICE = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)")


def _not_a_checkpoint(path: Path) -> UserError | None:
    """Say what the file is not, before torch's unpickler answers a random file with its weights_only advice."""
    if path.stat().st_size == 0:
        return UserError(f"{path} is empty, not a torch checkpoint; pass a fairseq/OFA .pt file such as ofa_base.pt")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist()):
                return None
        return UserError(f"{path} is a zip archive but not a torch checkpoint (no data.pkl inside); pass a "
                         "fairseq/OFA .pt file such as ofa_base.pt")
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
        return None
    return UserError(f"{path} is not a torch checkpoint: it is neither a zip archive (what torch.save writes) nor a "
                     "legacy torch file; pass a fairseq/OFA .pt file such as ofa_base.pt")


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load a `torch.save`d object on CPU without executing pickled code; OmegaConf objects become plain dicts."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a fairseq/OFA .pt file")
    problem = _not_a_checkpoint(path)
    if problem is not None:
        raise problem
    allow = allowed_globals()
    with torch.serialization.safe_globals(allow):
        if zipfile.is_zipfile(path):
            # Static scan first, so every offending global is named at once and nothing is unpickled.
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except (ValueError, RuntimeError, pickle.UnpicklingError) as e:
                raise UserError(f"{path} is not a readable torch checkpoint ({e}); re-download or re-export it")
            if unsafe:
                raise _refusal(path, unsafe)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            names = _GLOBAL_IN_ERROR.findall(str(e))
            if names:
                raise _refusal(path, names) from None
            # torch's own text advises weights_only=False, which is exactly what must not be done here
            found = _TORCH_ADVICE.search(str(e))
            reason = found.group(1).strip() if found else type(e).__name__
            raise UserError(f"refusing to load {path}: its pickle uses something outside the allow-list "
                            f"({reason[:300]})") from None
        except Exception as e:  # noqa: BLE001 - truncated/corrupt files and malformed pickles (TypeError, …)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} is not a readable torch checkpoint ({msg[:300]}); check the file") from None
    return _materialise(obj)


__all__ = ["safe_torch_load", "allowed_globals", "TypeRef"]
