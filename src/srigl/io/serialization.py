"""Save and load (condensed) models as safetensors, rebuildable without the original Python objects.

A file written by :func:`save_condensed` is an ordinary safetensors file: the model's ``state_dict``
(a condensed layer stores ``values``, ``indices``, ``active_rows`` and ``bias``, so the file size is
about proportional to density) and three string entries in the safetensors header metadata:

* ``srigl.format``: ``"srigl-condensed/2"``.
* ``srigl.spec``: JSON of the module tree. Each node is ``{"type": NAME, "args": {...},
  "children": {child_name: node}}`` where ``NAME`` is registered in :data:`SERIALIZABLE` (torch's
  common layers, containers and activations, and the condensed layers) and ``args`` are the
  constructor arguments read back from the module's attributes. A module of any other class is
  recorded as ``{"type": null, "class": "package.module.Class", "children": {...}}``.
* ``srigl.sha256``: a digest of every tensor's name, dtype, shape and bytes and of every other
  metadata entry (the spec and the ``user.`` entries included), so a flipped byte anywhere is
  caught, not only a truncated file. It guards against damage, not against someone who edits the
  file on purpose (anyone can recompute it).

Files of the first format, ``"srigl-condensed/1"``, still load: their digest covers the tensors
only, so a damaged spec would go unnoticed, and loading one warns (save it again to upgrade it).

Caller metadata goes in as ``user.<key>`` entries (:func:`read_metadata`); the CLI can record there
how to build a skeleton.

Loading: a tree made only of registered types (e.g. an ``nn.Sequential`` MLP or CNN) is rebuilt
from the file alone. A tree containing other classes (a custom ``forward``) needs a *skeleton*: an
instance of the original architecture, passed as ``load_condensed(path, model=skeleton)``. Its
unregistered modules are kept (their forward is the code), while every registered submodule is
replaced by the one the file describes, so condensed and shrunk layers need no special handling.
Nothing in the file is executed or unpickled; types are looked up only in the registry.

Checked before anything is used: the checksum; the spec's form (every node a registered type with
arguments its constructor accepts; a dtype argument names a dtype); the module tree is built on the
``meta`` device (no memory allocated, so a tiny file declaring ``Linear(60000, 60000)`` costs
nothing), its tensor names and shapes compared with the tensors stored, and only then are the
stored tensors put in; finally every condensed layer's indices and active rows are checked
(:meth:`~srigl.condensed.layers.CondensedLinear.check_storage`). Any disagreement raises
:class:`CorruptFileError` naming the module and the argument or tensor.

safetensors is imported lazily, inside the functions.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from srigl.condensed import CondensedConv2d, CondensedLinear, CondensedMultiheadAttention
from srigl.condensed.layers import _CondensedLayer
from srigl.errors import SriglError
from srigl.io.atomic import atomic_write

__all__ = [
    "FORMAT",
    "SERIALIZABLE",
    "CorruptFileError",
    "SkeletonMismatchError",
    "SkeletonRequiredError",
    "load_condensed",
    "read_metadata",
    "register_serializable",
    "save_condensed",
]

FORMAT = "srigl-condensed/2"
# The first format: its srigl.sha256 covers the tensors only (not the spec); still read, with a warning.
_FORMAT_TENSORS_ONLY = "srigl-condensed/1"


class CorruptFileError(SriglError, ValueError):
    """The file is truncated, damaged, or was not written by :func:`save_condensed`."""


class SkeletonRequiredError(SriglError, ValueError):
    """The file records modules of unregistered classes; pass an instance of the architecture."""


class SkeletonMismatchError(SriglError, ValueError):
    """The skeleton passed to :func:`load_condensed` is not the architecture the file records."""


ArgsReader = Callable[[nn.Module], dict[str, Any]]
SERIALIZABLE: dict[str, tuple[type[nn.Module], ArgsReader]] = {}


def _constructor_args(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments read back from same-named attributes (``bias``: whether there is one)."""
    args = {}
    for param in list(inspect.signature(type(module).__init__).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in ("device", "dtype"):
            continue
        if param.name == "bias":
            args["bias"] = getattr(module, "bias", None) is not None
        elif hasattr(module, param.name):
            args[param.name] = getattr(module, param.name)
        else:
            raise TypeError(f"{type(module).__name__} has no attribute {param.name!r} to rebuild it from")
    return args


def register_serializable(cls: type[nn.Module], name: str | None = None, args: ArgsReader | None = None) -> type[nn.Module]:
    """Allow modules of exactly ``cls`` to be rebuilt from a file.

    Args:
        cls: the module class.
        name: its name in files (default ``cls.__name__``); must be unique.
        args: reads the constructor arguments from an instance; by default every ``__init__``
            parameter is read from the attribute of the same name.

    Returns:
        ``cls``, so that this also works as a class decorator.

    ``cls`` must be constructible under ``with torch.device("meta")`` (as torch's own layers are):
    :func:`load_condensed` builds the spec there, so that no memory is spent on sizes the stored
    tensors have not confirmed.
    """
    name = name or cls.__name__
    if name in SERIALIZABLE and SERIALIZABLE[name][0] is not cls:
        raise ValueError(f"{name!r} is already registered for {SERIALIZABLE[name][0]}")
    SERIALIZABLE[name] = (cls, args or _constructor_args)
    return cls


def _no_args(module: nn.Module) -> dict[str, Any]:
    return {}


for _cls in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
    register_serializable(_cls, args=_no_args)
for _cls in (
    nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.Identity, nn.Flatten,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.Dropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, CondensedLinear, CondensedConv2d,
):
    register_serializable(_cls)



def _attention_args(module: CondensedMultiheadAttention) -> dict[str, Any]:
    # The projections are children in the file; the constructor leaves them to add_module.
    return {key: getattr(module, key) for key in ("embed_dim", "num_heads", "dropout", "batch_first")}


register_serializable(CondensedMultiheadAttention, args=_attention_args)
# Attention projections that stay dense keep the out_proj class nn.MultiheadAttention uses.
register_serializable(nn.modules.linear.NonDynamicallyQuantizableLinear)
_NAMES = {cls: name for name, (cls, _) in SERIALIZABLE.items()}


def _encode(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store constructor argument {value!r} of type {type(value).__name__}")


def _decode(value: Any, where: str) -> Any:
    """A constructor argument from its JSON form; ``where`` names it for :class:`CorruptFileError`."""
    if isinstance(value, dict):
        name = value.get("dtype") if len(value) == 1 else None
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype):
            raise CorruptFileError(f"{where}: {value!r} is not a dtype (expected {{\"dtype\": \"float32\"}} or similar)")
        return dtype
    if isinstance(value, list):
        return tuple(_decode(v, f"{where}[{i}]") for i, v in enumerate(value))  # torch modules take tuples for sizes
    return value


def _check_node(node: Any, where: str) -> None:
    """The form of one spec node (not its children): a dict with the keys :func:`_spec` writes."""
    name = where or "the root"
    if not isinstance(node, dict):
        raise CorruptFileError(f"{name}: spec node is a {type(node).__name__}, expected an object")
    if not isinstance(node.get("children"), dict):
        raise CorruptFileError(f"{name}: spec node has no 'children' object")
    for child in node["children"]:
        if not child or "." in child:
            raise CorruptFileError(f"{name}: child name {child!r} is empty or contains a dot")
    if node.get("type") is None:
        if not isinstance(node.get("class"), str):
            raise CorruptFileError(f"{name}: spec node of an unregistered module has no 'class' string")
        return
    if not isinstance(node["type"], str) or node["type"] not in SERIALIZABLE:
        raise CorruptFileError(f"{name}: unknown module type {node['type']!r}")
    if not isinstance(node.get("args"), dict):
        raise CorruptFileError(f"{name}: {node['type']} has no 'args' object")


# Size arguments of the registered constructors: checked here so that the message names the argument
# (the constructors would fail with a negative-dimension RuntimeError or a ZeroDivisionError).
_SIZE_ARGS = {"in_features": 0, "out_features": 0, "in_channels": 0, "out_channels": 0, "num_features": 0,
              "fan_in": 0, "n_active": 0, "embed_dim": 0, "groups": 1, "num_heads": 1}


def _construct(node: dict[str, Any], where: str) -> nn.Module:
    """The registered module ``node`` describes, built with its arguments (on the current device)."""
    name = where or "the root"
    cls = SERIALIZABLE[node["type"]][0]
    args = {key: _decode(value, f"{name}: {node['type']} argument {key!r}") for key, value in node["args"].items()}
    for key, least in _SIZE_ARGS.items():
        value = args.get(key, least)
        if type(value) is not int or value < least:
            raise CorruptFileError(f"{name}: {node['type']} argument {key!r} must be an integer >= {least}, got {value!r}")
    signature = inspect.signature(cls)
    # save_condensed never writes device or dtype: the tensors stored carry them.
    unknown = sorted(set(args) & {"device", "dtype"})
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        unknown = sorted(set(unknown) | set(args) - set(signature.parameters))
    if unknown:
        raise CorruptFileError(f"{name}: {node['type']} takes no argument {unknown[0]!r} (spec args {sorted(args)})")
    try:
        signature.bind(**args)
    except TypeError as error:
        raise CorruptFileError(f"{name}: {node['type']} arguments {args}: {error}") from None
    try:
        return cls(**args)
    except Exception as error:  # the constructor refused the file's arguments, whichever way it says so
        raise CorruptFileError(
            f"{name}: cannot build {node['type']} from the spec arguments {args}: {type(error).__name__}: {error}"
        ) from None


def _spec(module: nn.Module) -> dict[str, Any]:
    children = {name: _spec(child) for name, child in module.named_children()}
    cls = type(module)
    if cls not in _NAMES:
        return {"type": None, "class": f"{cls.__module__}.{cls.__qualname__}", "children": children}
    name = _NAMES[cls]
    args = {key: _encode(value) for key, value in SERIALIZABLE[name][1](module).items()}
    return {"type": name, "args": args, "children": children}


def _build(node: dict[str, Any], skeleton: nn.Module | None, where: str) -> nn.Module:
    """The module ``node`` describes; unregistered nodes come from ``skeleton`` (modified in place)."""
    _check_node(node, where)
    if node["type"] is None:
        if skeleton is None:
            raise SkeletonRequiredError(
                f"{where or 'the root'} is a {node['class']}, which is not registered for rebuilding: "
                f"pass load_condensed(path, model=<an instance of the architecture>)"
            )
        actual = f"{type(skeleton).__module__}.{type(skeleton).__qualname__}"
        if actual != node["class"]:
            raise SkeletonMismatchError(f"{where or 'the root'}: file records {node['class']}, skeleton has {actual}")
        module = skeleton
    else:
        module = _construct(node, where)
    for name, child in node["children"].items():
        # The skeleton is followed below registered nodes too: an unregistered block inside a
        # registered container (a ViT's blocks in an nn.Sequential) comes from the skeleton.
        child_skeleton = skeleton._modules.get(name) if skeleton is not None else None
        module.add_module(name, _build(child, child_skeleton, f"{where}.{name}".lstrip(".")))
    return module


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and every metadata entry but the digest's own.

    ``metadata=None`` gives the first format's digest, over the tensors only.
    """
    digest = hashlib.sha256()
    if metadata is not None:
        for key in sorted(metadata):
            if key != "srigl.sha256":
                # Length-prefixed, so that no two different headers hash the same bytes.
                for text in (key, metadata[key]):
                    data = text.encode()
                    digest.update(len(data).to_bytes(8, "little") + data)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_condensed(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s tensors and module tree to a safetensors file, atomically.

    Args:
        model: any module; typically the output of :func:`srigl.condense`.
        path: destination; written via a temporary file in the same directory, fsynced, renamed.
        metadata: extra string entries, read back with :func:`read_metadata`.

    Returns:
        The path written.
    """
    from srigl._optional import require

    save = require("safetensors.torch", "saving a condensed model").save

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (tied weights); store such a one twice.
        if tensor.untyped_storage().data_ptr() in storages and tensor.numel():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    header = {"srigl.format": FORMAT, "srigl.spec": json.dumps(_spec(model))}
    header.update({f"user.{key}": str(value) for key, value in (metadata or {}).items()})
    header["srigl.sha256"] = _digest(tensors, header)
    path = Path(path)
    data = save(tensors, metadata=header)
    atomic_write(path, lambda file: file.write(data), mode=0o644)  # a saved model is meant to be shared
    return path


def _read(path: str | os.PathLike) -> tuple[bytes, dict[str, str]]:
    """The file's bytes and its srigl header metadata, checked to be well formed."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise CorruptFileError(f"{path}: {len(data)} bytes is too short for a safetensors file")
    # safetensors layout: an 8-byte little-endian header size, the JSON header, then the tensor data.
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise CorruptFileError(f"{path}: header claims {header_size} bytes, but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + header_size])
        metadata = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as error:
        raise CorruptFileError(f"{path}: unreadable safetensors header ({error})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFileError(f"{path}: safetensors metadata must map strings to strings")
    if metadata.get("srigl.format") not in (FORMAT, _FORMAT_TENSORS_ONLY):
        raise CorruptFileError(
            f"{path}: format {metadata.get('srigl.format')!r}, expected {FORMAT!r} (not written by save_condensed?)"
        )
    return data, metadata


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata`` that :func:`save_condensed` was given for ``path``."""
    _, metadata = _read(path)
    return {key.removeprefix("user."): value for key, value in metadata.items() if key.startswith("user.")}


def load_condensed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved at ``path``, in eval mode, on the CPU.

    Args:
        path: a file written by :func:`save_condensed`.
        model: a skeleton (an instance of the original architecture, weights irrelevant), needed
            when the file records unregistered module classes. It is modified in place: its
            registered submodules are replaced by the file's.

    Returns:
        The model with the file's tensors (dtypes as saved).

    Raises:
        CorruptFileError: truncated or damaged file, checksum mismatch, or not a srigl file; a spec
            whose arguments its constructors refuse (the argument is named) or whose tensors
            disagree with those stored; condensed storage with indices or active rows out of
            range, repeated or unsorted. Nothing the spec declares is allocated before that check.
        SkeletonRequiredError: the file needs a skeleton and none was given.
        SkeletonMismatchError: the skeleton does not have the recorded classes or tensor names.

    Warns:
        UserWarning: the file has the first format, whose checksum does not cover the spec.
    """
    from srigl._optional import require

    load = require("safetensors.torch", "loading a condensed model").load

    data, metadata = _read(path)
    try:
        tensors = load(data)
        spec = json.loads(metadata["srigl.spec"])
    except Exception as error:  # safetensors reports truncation and bad offsets in its own types
        raise CorruptFileError(f"{path}: {type(error).__name__}: {error}") from None
    if metadata["srigl.format"] == FORMAT:
        if _digest(tensors, metadata) != metadata.get("srigl.sha256"):
            raise CorruptFileError(f"{path}: tensor data or header does not match the checksum in the header (damaged file)")
    else:
        if _digest(tensors) != metadata.get("srigl.sha256"):
            raise CorruptFileError(f"{path}: tensor data does not match the checksum in the header (damaged file)")
        warnings.warn(
            f"{path}: written in format {_FORMAT_TENSORS_ONLY!r}, whose checksum does not cover the module spec, "
            f"so damage there cannot be detected; save it again with save_condensed to upgrade it to {FORMAT!r}",
            UserWarning,
            stacklevel=2,
        )
    # Built on the meta device: the spec's sizes cost no memory until they are compared with the
    # tensors really stored (a tiny file may declare a 60000 x 60000 layer).
    try:
        with torch.device("meta"):
            module = _build(spec, model, "")
    except RecursionError:
        raise CorruptFileError(f"{path}: module spec is nested too deeply") from None
    except CorruptFileError as error:
        raise CorruptFileError(f"{path}: {error}") from None
    _check_against_spec(path, module, tensors, skeleton=model is not None)
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as error:
        raise SkeletonMismatchError(f"{path}: {error}") from None
    left = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise CorruptFileError(f"{path}: the file stores no tensor for {left[:8]}, which its spec declares")
    for name, layer in module.named_modules():
        if isinstance(layer, _CondensedLayer):
            try:
                layer.check_storage()
            except SriglError as error:
                raise CorruptFileError(f"{path}: {name or 'the root'}: {error}") from None
    return module.eval()


def _check_against_spec(path, module: nn.Module, tensors: dict[str, torch.Tensor], skeleton: bool) -> None:
    """Tensor names and shapes declared by the (meta-built) module against those stored in the file.

    A mismatch is the file's fault when the whole tree came from the file, the skeleton's when a
    skeleton supplied some of it.
    """
    declared = module.state_dict()
    missing = sorted(set(declared) - set(tensors))
    unexpected = sorted(set(tensors) - set(declared))
    shapes = [
        f"{name}: spec {tuple(declared[name].shape)}, stored {tuple(tensors[name].shape)}"
        for name in sorted(set(declared) & set(tensors))
        if declared[name].shape != tensors[name].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} declared but not stored {missing[:8]}")
    if unexpected:
        problems.append(f"{len(unexpected)} stored but not declared {unexpected[:8]}")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes [{'; '.join(shapes[:8])}]")
    if problems:
        error = SkeletonMismatchError if skeleton else CorruptFileError
        what = "the skeleton and the file's module spec" if skeleton else "the file's module spec"
        raise error(f"{path}: tensors of {what} disagree with the tensors stored: " + "; ".join(problems))
