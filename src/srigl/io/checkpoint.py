"""Training checkpoints: everything needed to resume a run bit for bit, written atomically.

A checkpoint is one plain dict::

    {"format": "srigl.checkpoint", "format_version": 1, "srigl_version": ..., "torch_version": ...,
     "model": model.state_dict(), "fingerprint": {name: {"shape": [...], "dtype": "torch.float32"}},
     "optimizer": ..., "optimizer_class": "SGD", "scheduler": ... | None, "scheduler_class": ... | None,
     "sparsifier": sparsifier.state_dict() | None, "sparsifier_config": sparsifier.config() | None,
     "rng": {"torch": ..., "cuda": [...] | None, "numpy": {...} | None, "python": {...}},
     "extra": {...}}

made only of containers, tensors, numbers and strings, so :func:`load_checkpoint` reads it with
``torch.load(weights_only=True)``: loading a checkpoint never runs code stored in the file. RNG states
are kept as tensors and numbers for the same reason (numpy's state array becomes an int64 tensor,
Python's ``random`` state a tensor of its 625 words).

Three promises:

* **Atomic save.** :func:`save_checkpoint` (through :func:`srigl.io.atomic.atomic_write`) writes a
  hidden temporary file next to the target, fsyncs it, renames it onto the target (``os.replace`` is
  atomic on POSIX and Windows) and fsyncs the directory. A crash or ``kill -9`` at any moment leaves either the old or the new checkpoint under
  the target name, never a partial one. A killed save may leave its hidden ``.<name>.<pid>.<rand>.tmp``
  file behind; nothing here ever loads such a file, and the next save of the same target deletes it
  (:func:`srigl.io.atomic.remove_stale_temporaries`). A save that fails (a full disk) raises
  :class:`CheckpointError` naming the path, the free space and about how much the checkpoint needs.
* **Refuse before touching.** :func:`restore_training_state` checks the model fingerprint, the
  sparsifier configuration, the optimizer and the scheduler against the live objects, and rehearses
  every RNG state on a throwaway generator, first and only then loads anything, so a refused
  checkpoint leaves model, optimizer, sparsifier and the global RNGs as they were.
* **Exact resume.** Model, optimizer, LR scheduler, sparsifier (masks, step, generator) and the torch,
  CUDA, numpy and Python RNG states are restored, so ``N`` steps straight and ``N/2 + N/2`` steps with a
  save, a new process and a restore in between give identical tensors. The data order must come back
  too: keep a seeded data generator's state in ``extra`` or derive the order from ``(seed, epoch)``.

In a distributed run, every rank builds the same state (DDP keeps replicas identical), and rank 0
alone should call :func:`save_checkpoint`; every rank calls :func:`restore_training_state`. The RNG
states saved are rank 0's, which every rank restores.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
import zipfile
from pathlib import Path, PurePath
from typing import Any, Mapping

import torch
from torch import nn

from srigl.errors import CheckpointError, CheckpointMismatchError
from srigl.io.atomic import atomic_write
from srigl.masks import unwrap, unwrap_optimizer

FORMAT = "srigl.checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST_NAME = "last.pt"

# What the saved masks mean is checked by the sparsifier itself (Sparsifier.check_state_dict). The
# schedule settings may change on resume, with a warning, so that a run can be extended deliberately.
_SCHEDULE_KEYS = ("delta", "alpha", "t_end", "total_steps", "seed")

_ZIP_MAGIC = b"PK\x03\x04"
_REQUIRED_KEYS = ("model", "fingerprint", "optimizer", "rng", "extra")

# Types torch.load(weights_only=True) reads back without running code from the file. Subclasses of
# str/int/float (torch.__version__ is a TorchVersion, an IntEnum is an int) are saved as their base type.
_SCALARS = (type(None), bool, complex, bytes, torch.dtype, torch.device, torch.Size)
_BASES = (str, int, float)


# ---------------------------------------------------------------------- building a state
def model_fingerprint(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{state_dict key: {"shape": [...], "dtype": "torch.float32"}}`` of the (unwrapped) model.

    Covers parameters and persistent buffers (what ``load_state_dict`` loads); srigl's masks are
    non-persistent buffers and belong to the sparsifier state instead.
    """
    return {name: _describe_tensor(t) for name, t in unwrap(model).state_dict().items()}


def _describe_tensor(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype)}


def _plain(obj: Any, where: str, copy: bool = True) -> Any:
    """A copy of ``obj`` made only of weights-only-loadable types (tensors detached, cloned if ``copy``).

    Paths become strings, dataclasses dicts, numpy scalars numbers and numpy arrays tensors; anything
    else that ``torch.load(weights_only=True)`` could not read back raises :class:`CheckpointError`
    naming where it sits, before anything is written.
    """
    if isinstance(obj, torch.Tensor):
        # Clone so that training on after building the state cannot change what gets saved.
        return obj.detach().clone() if copy else obj.detach()
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, _BASES):
        return next(base(obj) for base in _BASES if isinstance(obj, base))
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, where, copy)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{where} has a key of type {type(key).__name__} ({key!r}); use str or int keys")
            out[key] = _plain(value, f"{where}[{key!r}]", copy)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_plain(v, f"{where}[{i}]", copy) for i, v in enumerate(obj)]
        # Plain containers only (a namedtuple would not load weights-only).
        if isinstance(obj, (set, frozenset)):
            return set(items)
        return tuple(items) if isinstance(obj, tuple) else items
    numpy = sys.modules.get("numpy")  # only convert numpy objects if numpy is in use already
    if numpy is not None and isinstance(obj, numpy.generic):
        return obj.item()
    if numpy is not None and isinstance(obj, numpy.ndarray):
        return torch.from_numpy(numpy.array(obj, copy=True))
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only dicts, lists, "
        "tuples, tensors, numbers, strings and paths, so that loading it never runs code"
    )


def rng_states() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python ``random`` generator states as tensors and numbers."""
    import random

    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": None,
    }
    try:
        import numpy
    except ImportError:
        return states
    name, keys, pos, has_gauss, cached_gaussian = numpy.random.get_state(legacy=True)
    states["numpy"] = {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype("int64")),  # (624,) uint32 words, widened: torch has no uint32 ops
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only for the devices present)."""
    import random

    torch.set_rng_state(states["torch"].cpu())
    if states.get("cuda") and torch.cuda.is_available():
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), device)
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"].cpu().tolist()), python["gauss_next"]))
    if states.get("numpy") is not None:
        import numpy

        np_state = states["numpy"]
        keys = np_state["keys"].cpu().numpy().astype(numpy.uint32)
        numpy.random.set_state(
            (np_state["bit_generator"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
        )


def check_rng_states(states: Any, where: str = "checkpoint") -> None:
    """Raises :class:`CheckpointError` unless :func:`set_rng_states` would accept ``states``.

    Each state is rehearsed on a throwaway generator (a fresh ``torch.Generator``, ``random.Random``,
    ``numpy.random.RandomState``), so nothing global changes and a malformed entry is found before
    a restore has loaded anything.
    """
    import random

    if not isinstance(states, Mapping) or "torch" not in states or "python" not in states:
        raise CheckpointError(f"{where}: the 'rng' entry must be a dict with 'torch' and 'python' states, got {states!r:.80}")

    def rehearse(name: str, restore) -> None:
        try:
            restore(states[name])
        except Exception as error:
            raise CheckpointError(
                f"{where}: RNG state {name!r} is malformed ({type(error).__name__}: {error}); nothing was restored"
            ) from None

    def torch_state(state):
        torch.Generator().set_state(state.cpu())

    def cuda_states(states_):
        for state in states_ or ():
            if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
                raise TypeError(f"expected 1-D uint8 tensors, got {type(state).__name__}")

    def python_state(state):
        internal = state["internal"]
        if not isinstance(internal, torch.Tensor):
            raise TypeError(f"'internal' must be a tensor, got {type(internal).__name__}")
        random.Random().setstate((state["version"], tuple(internal.cpu().tolist()), state["gauss_next"]))

    def numpy_state(state):
        if state is None:
            return
        import numpy

        numpy.random.RandomState().set_state(
            (state["bit_generator"], state["keys"].cpu().numpy().astype(numpy.uint32), state["pos"],
             state["has_gauss"], state["cached_gaussian"])
        )

    rehearse("torch", torch_state)
    rehearse("python", python_state)
    if "cuda" in states:
        rehearse("cuda", cuda_states)
    if "numpy" in states:
        rehearse("numpy", numpy_state)


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Any = None,
    scheduler: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything needed to resume training exactly, as a plain dict ready for :func:`save_checkpoint`.

    Args:
        model: the model (DDP / DataParallel / compiled wrappers are unwrapped, so the keys carry no
            ``module.`` prefix and a checkpoint moves freely between single- and multi-process runs).
        optimizer: its optimizer.
        sparsifier: the :class:`srigl.Sparsifier` (masks, step, generator), or None for dense training.
        scheduler: an LR scheduler (anything with ``state_dict``), or None.
        **extra: anything else to resume with (epoch, global step, batch index, run config, a data
            generator's ``get_state()``). Paths are stored as strings and dataclasses as dicts.

    Returns:
        The state dict; every tensor in it is a copy, so training may go on before it is saved.

    Raises:
        CheckpointError: ``extra`` holds an object a weights-only load could not read back.
    """
    import srigl

    module = unwrap(model)
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "srigl_version": srigl.__version__,
        "torch_version": torch.__version__,
        "model": module.state_dict(),
        "fingerprint": model_fingerprint(module),
        "optimizer": optimizer.state_dict(),
        "optimizer_class": type(optimizer).__name__,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scheduler_class": type(scheduler).__name__ if scheduler is not None else None,
        "sparsifier": sparsifier.state_dict() if sparsifier is not None else None,
        "sparsifier_config": sparsifier.config() if sparsifier is not None else None,
        "rng": rng_states(),
        "extra": extra,
    }
    return _plain(state, "state")


# ---------------------------------------------------------------------- files
def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its latest checkpoint: ``RUN_DIR/checkpoints/last.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_NAME


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume ``run_dir`` from, or None if it has none.

    Accepts a run folder (``RUN_DIR/checkpoints/last.pt``), a checkpoints folder (``DIR/last.pt``)
    or a checkpoint file itself. Hidden temporary files of interrupted saves are never returned.
    """
    path = Path(run_dir)
    if path.is_file():
        return path
    for candidate in (checkpoint_path(path), path / LAST_NAME):
        if candidate.is_file():
            return candidate
    return None


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` (from :func:`training_state`) to ``path`` atomically.

    The state goes to a hidden temporary file in the same directory, which is flushed, fsynced and
    renamed onto ``path``; the directory is then fsynced. An exception, crash or kill during the save
    leaves whatever was at ``path`` before untouched.

    Raises:
        CheckpointError: ``state`` is not a srigl training state or holds an object a weights-only
            load could not read back (nothing is written then); or the file system refused the
            write (full, read-only): the message names the path and the free space, and the
            previous checkpoint at ``path`` is intact.
    """
    path = Path(path)
    _check_format(state, str(path), what="state to save")
    state = _plain(state, "state", copy=False)  # refuse unreadable objects before any byte is written
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda file: torch.save(state, file))
    except (OSError, RuntimeError) as error:
        # A full disk surfaces as ENOSPC, or from torch's zip writer as "unexpected pos ...".
        raise CheckpointError(_save_failure(path, state, error)) from error


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _save_failure(path: Path, state: Any, error: BaseException) -> str:
    import shutil

    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        space = f"{free} bytes ({free / 2**20:.1f} MiB) free there"
    except OSError:
        space = "free space unknown"
    needed = _tensor_bytes(state)
    return (
        f"cannot write checkpoint {path}: {reason}; {space}, and the new checkpoint needs about {needed} "
        f"bytes ({needed / 2**20:.1f} MiB) beside the previous one, which is intact"
    )


def _check_format(state: Any, where: str, what: str = "checkpoint") -> None:
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        keys = sorted(map(str, state))[:8] if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(
            f"{where}: {what} is not a srigl checkpoint (no 'format': {FORMAT!r} entry; found {keys}); "
            "build it with srigl.training_state()"
        )
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format version {version!r} is newer than this srigl reads ({FORMAT_VERSION}); "
            f"it was written by srigl {state.get('srigl_version')!r}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{where}: {what} lacks the entries {missing}")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (weights-only: no code from the file runs).

    Args:
        path: the checkpoint file.
        map_location: as for ``torch.load``; tensors land on the CPU by default and move to the
            model's device when restored.

    Raises:
        CheckpointError: the file is missing, empty, truncated, corrupt, holds objects a weights-only
            load refuses, or is not a srigl checkpoint. The message names the path and the cause.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file" + (" (it is a directory)" if path.is_dir() else ""))
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        # torch.save has written zip archives since torch 1.6; anything else is damage or another format.
        raise CheckpointError(
            f"{path}: cannot read checkpoint: the file is corrupt or not a checkpoint ({size} bytes, "
            f"starts with {head!r}, not the zip signature of torch.save)"
        )
    try:
        # torch.load does not check the CRC32 that torch.save writes for every record, so a flipped
        # bit in a tensor would load silently; one pass over the file catches it.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        # The zip signature is there but the end-of-archive record is not: the write stopped early.
        raise CheckpointError(
            f"{path}: cannot read checkpoint: the file is corrupt or truncated ({size} bytes; "
            "the zip archive has no end record, so its write did not finish)"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path}: cannot read checkpoint: the file is corrupt ({size} bytes; record {damaged!r} fails its CRC-32 check)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        if _refused_as_unsafe(e):
            # Every record passed its CRC above, so this is no damage: the pickle asks for objects a
            # weights-only load does not build. torch's message advises weights_only=False, which
            # would run whatever the file names; that advice is not passed on (hence `from None`).
            raise CheckpointError(
                f"{path}: refused to load checkpoint as unsafe: it holds Python objects beyond tensors, numbers, "
                f"strings and containers ({_unsafe_detail(e)}), and unpickling them could run code stored in the "
                "file. A srigl checkpoint never holds such objects: this file was not written by "
                "srigl.save_checkpoint, or was altered."
            ) from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise CheckpointError(
            f"{path}: cannot read checkpoint: the file is corrupt or truncated ({size} bytes): {type(e).__name__}: {lines[0]}"
        ) from e
    _check_format(state, str(path))
    return state


# How torch's weights-only unpickler has said "I refuse this object" across versions.
_UNSAFE_MARKERS = ("Weights only load failed", "WeightsUnpickler error", "Unsupported global", "unsupported GLOBAL")


def _refused_as_unsafe(error: Exception) -> bool:
    import pickle

    return isinstance(error, pickle.UnpicklingError) or any(marker in str(error) for marker in _UNSAFE_MARKERS)


def _unsafe_detail(error: Exception) -> str:
    """The line of torch's message that names the refused object, without its advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line or "WeightsUnpickler error" in line]
    detail = named[0] if named else "an object the weights-only unpickler refuses"
    # Only the first sentence: the rest is torch's advice on allow-listing the object.
    return detail.removeprefix("WeightsUnpickler error: ").split(". ")[0].rstrip(".")


# ---------------------------------------------------------------------- restoring
def _compact_prefixes(state: Mapping[str, Any], sparsifier: Any) -> tuple[str, ...]:
    """Module prefixes whose tensor shapes the sparsifier itself sets (compact layouts change in training).

    A compact layer stores ``(n_active, k)`` values and indices; ablation and revival change that
    shape during the run, so a freshly built model differs from the saved one there. The
    sparsifier's own ``load_state_dict`` checks those layouts and resizes the layers.
    """
    if sparsifier is None or not isinstance(state.get("sparsifier"), Mapping):
        return ()
    return tuple(name.rpartition(".")[0] + "." for name in state["sparsifier"].get("layouts", {}))


def _model_problems(saved: Mapping[str, Any], live: Mapping[str, Any], flexible: tuple[str, ...] = ()) -> list[str]:
    missing = sorted(set(live) - set(saved))
    unexpected = sorted(set(saved) - set(live))
    shapes = [
        f"{n}: checkpoint {saved[n]['shape']} vs model {live[n]['shape']}"
        for n in sorted(set(saved) & set(live))
        if list(saved[n]["shape"]) != list(live[n]["shape"]) and not n.startswith(flexible)
    ]
    dtypes = [
        f"{n}: checkpoint {saved[n]['dtype']} vs model {live[n]['dtype']}"
        for n in sorted(set(saved) & set(live))
        if saved[n]["dtype"] != live[n]["dtype"]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing from the checkpoint {missing[:8]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected in the checkpoint {unexpected[:8]}")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes [{'; '.join(shapes[:8])}]")
    if dtypes:
        problems.append(f"{len(dtypes)} with other dtypes [{'; '.join(dtypes[:8])}]")
    return problems


def _check_model(state: Mapping[str, Any], module: nn.Module, flexible: tuple[str, ...]) -> None:
    live = model_fingerprint(module)
    problems = _model_problems(state["fingerprint"], live, flexible)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint is from another model than {type(module).__name__}: " + "; ".join(problems)
        )
    # The fingerprint must describe the tensors really stored (guards against a hand-edited file).
    stored = {n: _describe_tensor(t) for n, t in state["model"].items() if isinstance(t, torch.Tensor)}
    inconsistent = _model_problems(stored, live, flexible)
    if inconsistent:
        raise CheckpointError("checkpoint model tensors disagree with its own fingerprint: " + "; ".join(inconsistent))


def _check_sparsifier(state: Mapping[str, Any], sparsifier: Any, module: nn.Module, optimizer) -> None:
    saved = state.get("sparsifier")
    if sparsifier is None:
        if saved is not None:
            config = saved.get("config", {})
            raise CheckpointMismatchError(
                f"checkpoint holds a sparsifier state (algorithm={config.get('algorithm')!r}, "
                f"sparsity={config.get('sparsity')!r}); pass the sparsifier to restore it"
            )
        return
    if saved is None:
        raise CheckpointMismatchError(
            f"checkpoint was saved without a sparsifier (dense training); cannot restore {sparsifier.name!r} from it"
        )
    if sparsifier.model is not module:
        raise CheckpointMismatchError("the sparsifier given is attached to another model than the one given")
    if sparsifier.optimizer is not unwrap_optimizer(optimizer):
        raise CheckpointMismatchError("the sparsifier given is attached to another optimizer than the one given")
    sparsifier.check_state_dict(saved, CheckpointMismatchError, what="checkpoint")
    _warn_schedule_change(sparsifier.config(), saved.get("config", {}))


def _warn_schedule_change(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> None:
    changed = [f"{k}: checkpoint {theirs.get(k)!r} -> now {mine.get(k)!r}" for k in _SCHEDULE_KEYS if mine.get(k) != theirs.get(k)]
    if changed:
        warnings.warn(f"srigl: resuming with another mask-update schedule ({'; '.join(changed)})", UserWarning, stacklevel=4)


def _check_optimizer(state: Mapping[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module, flexible: tuple[str, ...]) -> None:
    saved_class = state.get("optimizer_class")
    if saved_class is not None and saved_class != type(optimizer).__name__:
        raise CheckpointMismatchError(
            f"checkpoint optimizer is {saved_class}, the optimizer given is {type(optimizer).__name__}"
        )
    saved = state["optimizer"]
    saved_groups = [len(g["params"]) for g in saved["param_groups"]]
    live_groups = [len(g["params"]) for g in optimizer.param_groups]
    if saved_groups != live_groups:
        raise CheckpointMismatchError(
            f"checkpoint optimizer has param groups of sizes {saved_groups}, the optimizer given {live_groups}"
        )
    # Saved state is keyed by position over all groups in order, as Optimizer.load_state_dict maps it.
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = [i for g in saved["param_groups"] for i in g["params"]]
    names = {id(p): n for n, p in module.named_parameters()}
    bad = []
    for position, key in enumerate(index):
        if names.get(id(params[position]), "").startswith(flexible):
            continue  # a compact layout: resized with the sparsifier state
        for name, value in saved["state"].get(key, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(params[position].shape):
                bad.append(f"param {position} {name}: checkpoint {tuple(value.shape)} vs {tuple(params[position].shape)}")
    if bad:
        raise CheckpointMismatchError(f"checkpoint optimizer state has other shapes: {bad[:8]}")


def _check_entry_types(state: Mapping[str, Any]) -> None:
    """The top-level entries have the container types a restore reads (a hand-edited file may not)."""
    expected = {"model": Mapping, "fingerprint": Mapping, "optimizer": Mapping, "extra": Mapping}
    wrong = [f"{key!r} is a {type(state[key]).__name__}" for key, kind in expected.items() if not isinstance(state[key], kind)]
    optimizer = state["optimizer"]
    if isinstance(optimizer, Mapping) and not (
        isinstance(optimizer.get("state"), Mapping) and isinstance(optimizer.get("param_groups"), (list, tuple))
    ):
        wrong.append("'optimizer' lacks its 'state' dict or 'param_groups' list")
    if wrong:
        raise CheckpointError(f"checkpoint entries have the wrong type: {'; '.join(wrong)}; nothing was restored")


def _check_scheduler(state: Mapping[str, Any], scheduler: Any) -> None:
    saved_class = state.get("scheduler_class")
    if scheduler is None:
        if state.get("scheduler") is not None:
            raise CheckpointMismatchError(f"checkpoint holds an LR scheduler state ({saved_class}); pass the scheduler")
        return
    if state.get("scheduler") is None:
        raise CheckpointMismatchError(
            f"checkpoint was saved without an LR scheduler; cannot restore {type(scheduler).__name__} from it"
        )
    if saved_class != type(scheduler).__name__:
        raise CheckpointMismatchError(
            f"checkpoint LR scheduler is {saved_class}, the scheduler given is {type(scheduler).__name__}"
        )


def restore_training_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Any = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Validate ``state`` against the live objects, then load it into them and restore the RNGs.

    Build the model, optimizer, sparsifier and scheduler exactly as for a fresh run (same
    hyperparameters), then call this. Nothing is modified unless every check passes.

    Args:
        state: from :func:`load_checkpoint` (or :func:`training_state`).
        model: the model (wrappers such as DDP are unwrapped).
        optimizer: its optimizer, built over the same parameters in the same order.
        sparsifier: the sparsifier, if the checkpoint has one.
        scheduler: the LR scheduler, if the checkpoint has one.

    Returns:
        The ``extra`` dict given to :func:`training_state` (epoch, step, ...).

    Raises:
        CheckpointError: ``state`` is not a srigl checkpoint, or one of its entries is malformed
            (an RNG state that the generator would refuse, ``extra`` not a dict, ...).
        CheckpointMismatchError: the checkpoint belongs to another model (missing / unexpected /
            other-shaped names listed), another sparsity, algorithm, distribution or structure (both
            values named), another optimizer or scheduler, or it has a sparsifier or scheduler where
            none was given (or the reverse).
    """
    _check_format(state, "state")
    _check_entry_types(state)
    module = unwrap(model)
    flexible = _compact_prefixes(state, sparsifier)
    _check_model(state, module, flexible)
    _check_sparsifier(state, sparsifier, module, optimizer)
    _check_optimizer(state, optimizer, module, flexible)
    _check_scheduler(state, scheduler)
    check_rng_states(state["rng"])

    # The sparsifier first: it checks its own state before changing anything, and a compact one
    # resizes its layers to the saved layouts, which the model and optimizer states then fill.
    if sparsifier is not None:
        saved = dict(state["sparsifier"])
        if isinstance(saved.get("generator"), torch.Tensor):
            saved["generator"] = saved["generator"].cpu()  # a CPU generator; map_location may have moved it
        sparsifier.load_state_dict(saved)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    return dict(state["extra"])
