"""The run configuration: :class:`TrainConfig`, its checks and resolved defaults, and its files.

One run = one :class:`TrainConfig`. :func:`resolve_config` checks it and fills the defaults that
depend on other fields (sparsity 0 for ``dense``, ``gamma_sal`` 0.95 for ViTs, ...); resolving is
idempotent, so a run's ``config.toml`` (written with :func:`dumps_toml`, read with
:func:`load_config_file` and :func:`config_from_mapping`) resolves to itself. :func:`run_name` and
:func:`method_label` name runs and method variants in folders and tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from srigl.algorithms import ALGORITHMS, SRigL
from srigl.errors import InvalidConfigError

METHODS_DENSE = "dense"
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step", "constant")
DISTRIBUTIONS = ("erk", "uniform")
DEVICES = ("auto", "cpu", "cuda")
# gamma_sal defaults from the SRigL paper: 0.3 for CNNs and MLPs, 0.95 for ViTs.
GAMMA_SAL_DEFAULT = 0.3
GAMMA_SAL_VIT = 0.95


def methods() -> list[str]:
    """Valid ``method`` names: ``dense`` plus every registered sparse algorithm."""
    return [METHODS_DENSE, *sorted(ALGORITHMS)]


class DataNames(list):
    """The registered data set names plus ``xmc-synthetic``, and ``xmc:NAME`` for any folder NAME.

    A list (argparse shows and iterates it as the valid choices) whose ``in`` also admits every
    ``xmc:NAME``, which no finite list can hold.
    """

    def __contains__(self, name: object) -> bool:
        from srigl.app.datasets.xmc_sources import FILES_PREFIX

        return list.__contains__(self, name) or (isinstance(name, str) and name.startswith(FILES_PREFIX))


def _dataset_names() -> DataNames:
    from srigl.app.datasets import list_datasets
    from srigl.app.datasets.xmc_sources import FILES_PREFIX, SYNTHETIC

    return DataNames([*list_datasets(), SYNTHETIC, FILES_PREFIX + "NAME"])


def _model_names() -> list[str]:
    from srigl.app.models import list_models
    from srigl.app.xmc_models import list_xmc_models

    return sorted({*list_models(), *list_xmc_models()})


def _option(default: Any, help: str, group: str, choices=None, metavar: str | None = None):
    """A :class:`TrainConfig` field and its ``srigl train`` flag (see :func:`srigl.app.cli`).

    Args:
        default: the field's default; ``None`` means "resolved from the other fields".
        help: what the field means, the flag's help; ``{default}`` is replaced by ``default``.
        group: the flag's group in ``srigl train --help``.
        choices: the valid values, or a function returning them (registries are read lazily).
        metavar: the flag's value placeholder in the help.
    """
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "metavar": metavar})


RUN, DATA, SPARSITY, OPTIMISATION = "run", "data and model", "sparsity", "optimisation"


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` means "resolved from the other fields".

    Each field's metadata (:func:`_option`) holds its meaning, and the ``srigl train`` flags are
    generated from the fields: ``--name-with-dashes VALUE``, ``--flag`` for a boolean that defaults
    to False and ``--no-flag`` for one that defaults to True. :func:`resolve_config` fills the
    ``None`` defaults.
    """

    data: str = _option("fashion-mnist", "data set (default {default})", DATA, choices=_dataset_names)
    data_dir: str | None = _option(None, "directory searched first for the data files (for xmc:NAME also the "
                                   "folder NAME itself)", DATA, metavar="DIR")
    model: str = _option("mlp", "model (default {default}; XMC data: mlp or linear)", DATA, choices=_model_names)
    xmc_hidden: int | None = _option(None, "XMC mlp: hidden width (default 768)", DATA, metavar="N")
    xmc_points: int | None = _option(None, "xmc-synthetic: training points (default 2000; test: a quarter of it)",
                                     DATA, metavar="N")
    xmc_features: int | None = _option(None, "xmc-synthetic: features F (default 500)", DATA, metavar="N")
    xmc_labels: int | None = _option(None, "xmc-synthetic: labels L (default 1000)", DATA, metavar="N")
    method: str = _option("srigl", "training method: dense or a sparse algorithm (default {default})", SPARSITY,
                          choices=lambda: methods())
    sparsity: float | None = _option(None, "global sparsity in [0, 1) (default 0.9; 0 for dense)", SPARSITY)
    distribution: str = _option("erk", "layer-wise sparsity (default {default})", SPARSITY,
                                choices=lambda: DISTRIBUTIONS)
    gamma_sal: float | None = _option(None, "SRigL salient-weight threshold (default 0.3; 0.95 for vit-tiny)", SPARSITY)
    no_ablation: bool = _option(False, "SRigL without neuron ablation (gamma_sal = 0)", SPARSITY)
    delta: int = _option(100, "steps between mask updates (default {default})", SPARSITY)
    alpha: float = _option(0.3, "initial drop fraction (default {default})", SPARSITY)
    t_end_fraction: float = _option(0.75, "masks frozen after this fraction of steps (default {default})", SPARSITY)
    epochs: int = _option(10, "training epochs (default {default})", RUN)
    batch_size: int = _option(128, "batch size: items per optimizer step, per process when distributed "
                              "(default {default})", OPTIMISATION)
    optimizer: str = _option("sgd", "optimizer (default {default}: Nesterov, momentum 0.9)", OPTIMISATION,
                             choices=lambda: OPTIMIZERS)
    lr: float | None = _option(None, "peak learning rate (default 0.1 for sgd, 1e-3 for adamw)", OPTIMISATION)
    lr_schedule: str = _option("cosine", "per-step schedule: cosine (to 0), step (x0.2 at 30/60/90 %) or constant "
                               "(default {default})", OPTIMISATION, choices=lambda: LR_SCHEDULES)
    warmup_epochs: int = _option(0, "linear warm-up epochs from 0 to lr (default {default})", OPTIMISATION)
    weight_decay: float | None = _option(None, "weight decay (default 5e-4 for sgd, 0.05 for adamw)", OPTIMISATION)
    label_smoothing: float = _option(0.0, "label smoothing (default {default})", OPTIMISATION)
    seed: int = _option(0, "seed of weights, masks and data order (default {default})", RUN)
    out: str | None = _option(None, "run folder (default runs/<data>-<model>-<method>-s<sparsity>-seed<seed>)", RUN,
                              metavar="RUN_DIR")
    limit_train: int | None = _option(None, "use only the first N training items", DATA, metavar="N")
    limit_test: int | None = _option(None, "use only the first N test items", DATA, metavar="N")
    plot: bool = _option(False, "write curves.png (learning curves)", RUN)
    threads: int | None = _option(None, "torch CPU threads (default: torch's choice)", RUN)
    progress: bool = _option(True, "tqdm progress bars on a terminal; --no-progress turns them off", RUN)
    compact: bool = _option(False, "srigl only: train sparse layers as compact (n_active, k) values + indices", RUN)
    device: str = _option("auto", "device (default {default}: CUDA when available)", RUN, choices=lambda: DEVICES)
    dist_timeout: float = _option(300.0, "distributed runs: seconds a rank waits for the others before the run fails "
                                  "(default {default})", RUN, metavar="SECONDS")
    sparse_init: bool = _option(True, "rescale each neuron's initial weights to its sparse fan-in (the SRigL "
                                "reference's sparse Kaiming init); --no-sparse-init keeps the dense scale", SPARSITY)

    def to_dict(self) -> dict[str, Any]:
        """Field values as a plain dict (``None`` included)."""
        return dataclasses.asdict(self)


# Options that only change how a run executes, not what it computes: a resumed run may change them.
RUNTIME_FIELDS = frozenset({"data_dir", "plot", "threads", "progress", "device", "dist_timeout"})
# Fields that do not define what a run computes: the runtime options, and where the run folder is
# (a run folder may be moved). Two configs that agree on every other field are the same run.
NOT_COMPARED = RUNTIME_FIELDS | {"out"}


def config_fields() -> dict[str, type]:
    """``{field name: scalar type}`` of :class:`TrainConfig` (``int``, ``float``, ``str`` or ``bool``)."""
    kinds = {}
    for f in dataclasses.fields(TrainConfig):
        annotation = str(f.type)
        kinds[f.name] = next(t for t in (bool, int, float, str) if t.__name__ in annotation)
    return kinds


def config_from_mapping(values: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping (a parsed TOML file), checking keys and types.

    Raises:
        InvalidConfigError: an unknown key (the message lists the valid ones) or a value of the
            wrong type.
    """
    kinds = config_fields()
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise InvalidConfigError(f"{source}: unknown keys {unknown}; valid keys are {sorted(kinds)}")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        kind = kinds[key]
        # bool is a subclass of int: refuse `epochs = true`; accept an int where a float is expected.
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise InvalidConfigError(f"{source}: {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
        clean[key] = value
    return TrainConfig(**clean)


def _choice(name: str, value: str, valid: list[str] | tuple[str, ...]) -> None:
    if value not in valid:
        raise InvalidConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(valid)}")


def _check_range(name: str, value: float | None, low: float, high: float, *, low_open=False, high_open=False) -> None:
    if value is None:
        return
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or (isinstance(value, float) and math.isnan(value)):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise InvalidConfigError(f"{name} must be in {left}{low}, {high}{right}, got {value}")


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Check ``config`` and fill every field that depends on the others.

    Resolving is idempotent: a resolved config (e.g. read back from ``config.toml``) resolves to
    itself.

    Raises:
        InvalidConfigError: an unknown name (the message lists the valid ones), a value out of
            range, or an impossible combination (``gamma_sal`` with a method other than srigl,
            ``no_ablation`` with ``gamma_sal > 0``, a sparsity with ``dense``, ...).
    """
    from srigl.app.models import list_models

    c = dataclasses.replace(config)
    _choice("data set", c.data, _dataset_names())
    _resolve_data_and_model(c, list_models())
    _choice("method", c.method, methods())
    _choice("distribution", c.distribution, DISTRIBUTIONS)
    _choice("optimizer", c.optimizer, OPTIMIZERS)
    _choice("lr schedule", c.lr_schedule, LR_SCHEDULES)
    _choice("device", c.device, DEVICES)

    sparse = c.method != METHODS_DENSE
    if c.sparsity is not None:
        _check_range("sparsity", c.sparsity, 0.0, 1.0, high_open=True)
    if not sparse:
        if c.sparsity not in (None, 0.0):
            raise InvalidConfigError(
                f"method 'dense' trains no sparse weights but sparsity={c.sparsity} was given; "
                f"use a sparse method ({', '.join(sorted(ALGORITHMS))}) or drop the sparsity"
            )
        c.sparsity = 0.0
    else:
        c.sparsity = 0.9 if c.sparsity is None else c.sparsity
        if c.sparsity == 0.0:
            raise InvalidConfigError(f"method {c.method!r} needs a sparsity in (0, 1), got 0.0; use method 'dense'")

    if not has_ablation(c.method):
        if c.gamma_sal is not None:
            raise InvalidConfigError(f"gamma_sal applies to method 'srigl' only, not {c.method!r}")
        if c.no_ablation:
            raise InvalidConfigError(f"no_ablation applies to method 'srigl' only, not {c.method!r}")
    else:
        if c.no_ablation and c.gamma_sal not in (None, 0.0):
            raise InvalidConfigError(
                f"no_ablation means gamma_sal = 0 but gamma_sal={c.gamma_sal} was given; give one of them"
            )
        if c.gamma_sal is None:
            c.gamma_sal = 0.0 if c.no_ablation else (GAMMA_SAL_VIT if c.model.startswith("vit") else GAMMA_SAL_DEFAULT)
        _check_range("gamma_sal", c.gamma_sal, 0.0, 1.0)

    if c.delta < 1:
        raise InvalidConfigError(f"delta must be >= 1 step, got {c.delta}")
    _check_range("alpha", c.alpha, 0.0, 1.0)
    _check_range("t_end_fraction", c.t_end_fraction, 0.0, 1.0, low_open=True)
    for name in ("epochs", "batch_size"):
        if getattr(c, name) < 1:
            raise InvalidConfigError(f"{name} must be >= 1, got {getattr(c, name)}")
    for name in ("limit_train", "limit_test", "threads"):
        if getattr(c, name) is not None and getattr(c, name) < 1:
            raise InvalidConfigError(f"{name} must be >= 1, got {getattr(c, name)}")
    if not (0 <= c.warmup_epochs <= c.epochs):
        raise InvalidConfigError(f"warmup_epochs must be in [0, epochs={c.epochs}], got {c.warmup_epochs}")
    if c.lr is None:
        c.lr = 0.1 if c.optimizer == "sgd" else 1e-3
    _check_range("lr", c.lr, 0.0, math.inf, low_open=True, high_open=True)
    if c.weight_decay is None:
        c.weight_decay = 5e-4 if c.optimizer == "sgd" else 0.05
    _check_range("weight_decay", c.weight_decay, 0.0, math.inf, high_open=True)
    _check_range("label_smoothing", c.label_smoothing, 0.0, 1.0, high_open=True)
    if c.compact and not getattr(getattr(ALGORITHMS.get(c.method), "default_structure", None), "condensable", False):
        # Compact storage holds k values + indices per neuron: constant fan-in methods only.
        raise InvalidConfigError(f"compact training needs a constant fan-in method such as 'srigl', not {c.method!r}")
    _check_range("dist_timeout", c.dist_timeout, 0.0, math.inf, low_open=True, high_open=True)
    if c.out is None:
        c.out = str(Path("runs") / run_name(c))
    elif not c.out.strip():
        # "" would be the current directory: a run's files would land among whatever is there.
        raise InvalidConfigError(f"out must name a run folder, got {c.out!r}")
    return c


def _resolve_data_and_model(c: TrainConfig, image_models: list[str]) -> None:
    """Check the model against the kind of data and the XMC fields; fill the XMC sizes and ``xmc_hidden``."""
    from srigl.app.datasets.xmc_sources import SYNTHETIC, check_xmc_name, is_xmc
    from srigl.app.xmc_models import DEFAULT_HIDDEN, has_hidden, list_xmc_models

    sizes = {name: getattr(c, name) for name in ("xmc_points", "xmc_features", "xmc_labels")}
    if not is_xmc(c.data):
        given = [name for name in ("xmc_hidden", *sizes) if getattr(c, name) is not None]
        if given:
            raise InvalidConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to XMC data (xmc-synthetic, xmc:NAME) only, not {c.data!r}")
        if c.model not in image_models:
            raise InvalidConfigError(
                f"unknown model {c.model!r} for image data; choose one of: {', '.join(image_models)} "
                f"(the XMC models {', '.join(list_xmc_models())} take xmc-synthetic or xmc:NAME)"
            )
        return
    check_xmc_name(c.data)
    if c.model not in list_xmc_models():
        raise InvalidConfigError(f"unknown model {c.model!r} for XMC data {c.data!r}; choose one of: {', '.join(list_xmc_models())}")
    if c.data != SYNTHETIC:
        given = [name for name, value in sizes.items() if value is not None]
        if given:
            raise InvalidConfigError(f"{', '.join(given)} size the xmc-synthetic data; {c.data!r} has the sizes its files declare")
    else:
        from srigl.app.datasets.xmc_sources import SYNTHETIC_FEATURES, SYNTHETIC_LABELS, SYNTHETIC_POINTS

        defaults = {"xmc_points": SYNTHETIC_POINTS, "xmc_features": SYNTHETIC_FEATURES, "xmc_labels": SYNTHETIC_LABELS}
        for name, value in sizes.items():
            if value is not None and value < 1:
                raise InvalidConfigError(f"{name} must be >= 1, got {value}")
            setattr(c, name, defaults[name] if value is None else value)
    if not has_hidden(c.model):
        if c.xmc_hidden is not None:
            raise InvalidConfigError(f"xmc_hidden applies to the XMC model 'mlp', not {c.model!r} (no hidden layer)")
    else:
        c.xmc_hidden = DEFAULT_HIDDEN if c.xmc_hidden is None else c.xmc_hidden
        if c.xmc_hidden < 1:
            raise InvalidConfigError(f"xmc_hidden must be >= 1, got {c.xmc_hidden}")


def has_ablation(method: str) -> bool:
    """Whether ``method`` takes ``gamma_sal``: srigl, and any registered subclass of :class:`srigl.SRigL`."""
    cls = ALGORITHMS.get(method)
    return cls is not None and issubclass(cls, SRigL)


def run_name(config: TrainConfig) -> str:
    """A folder name that tells runs of a sweep apart: ``fashion-mnist-mlp-srigl-g0.3-s0.9-seed0``."""
    method = config.method
    if has_ablation(method):
        method += f"-g{config.gamma_sal:g}" if config.gamma_sal else "-noablation"
    data = config.data.replace(":", "-")  # xmc:EURLex-4K -> xmc-EURLex-4K, a plain folder name
    return f"{data}-{config.model}-{method}-s{config.sparsity:g}-seed{config.seed}"


def method_label(method: str, gamma_sal: float | None) -> str:
    """Name of a method variant in tables: srigl is split by ablation on/off (``gamma_sal`` None: no such knob)."""
    if gamma_sal is None:
        return method
    if not gamma_sal:
        return f"{method} (no ablation)"
    return f"{method} (γ_sal={gamma_sal:g})"


# ------------------------------------------------------------------------------------------- TOML
def _toml_key(key: str) -> str:
    bare = key and all(ch.isalnum() or ch in "-_" for ch in key) and key.isascii()
    return key if bare else _toml_string(key)


def _toml_string(text: str) -> str:
    escapes = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)  # shortest round-tripping form: "0.1", "1e-05", "5.0"
        return text if any(ch in text for ch in ".en") else text + ".0"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def dumps_toml(values: Mapping[str, Any]) -> str:
    """A tiny TOML writer: scalars, lists of scalars, and one level of tables; ``None`` is omitted.

    The stdlib reads TOML (``tomllib``) but does not write it; this covers what srigl writes.
    """
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if v is not None and not isinstance(v, Mapping)]
    for key, table in values.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{_toml_key(key)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def dumps_json(value: Any, level: int = 0) -> str:
    """JSON with one key per line but every list of numbers on a single line (fan-in lists stay short)."""
    pad = " " * level
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = [f"{pad} {json.dumps(str(k))}: {dumps_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
        items = [f"{pad} {dumps_json(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value, default=str, ensure_ascii=False)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a dict (keys are checked by :func:`config_from_mapping`).

    Raises:
        InvalidConfigError: the file is missing or is not valid TOML.
    """
    import tomllib

    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise InvalidConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise InvalidConfigError(f"config file {str(path)!r} is a folder; give a TOML file") from None
    except OSError as error:
        raise InvalidConfigError(f"cannot read config file {str(path)!r}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise InvalidConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {error.start}: {error.object[error.start:error.start + 1]!r})"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise InvalidConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None


def config_differences(saved: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, given value)}`` for every field that defines the run and differs.

    Runtime options and ``out`` (:data:`NOT_COMPARED`) are not compared: they may change on resume.
    Nor is a field ``saved`` lacks: it was saved by a srigl that predates the field, whose default
    then applies.
    """
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_COMPARED and f.name in saved]
    return {name: (saved[name], given.get(name)) for name in names if saved[name] != given.get(name)}


def _listed(differences: Mapping[str, tuple[Any, Any]], left: str, right: str) -> str:
    return "; ".join(f"{name}: {left} {a!r}, {right} {b!r}" for name, (a, b) in differences.items())


def resume_config(run_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config of the run in ``run_dir``, from its checkpoint, with runtime options overridden.

    The checkpoint's config is what the run trained with, so it is the truth. ``config.toml`` is
    only a copy for people (and for ``--config``): a copy that differs from it (edited, or left
    empty by an older srigl that rewrote it non-atomically) is an error naming the differing keys,
    because silently ignoring an edit would train something other than what the file says. A
    missing ``config.toml`` is fine; the run writes it again.

    Raises:
        InvalidConfigError: no checkpoint there (or one without a run config), a ``config.toml``
            that cannot be read or differs from the checkpoint, or an override that would change
            what the run computes (only ``data_dir``, ``plot``, ``threads``, ``progress``,
            ``device`` and ``dist_timeout`` may change).
        srigl.errors.CheckpointError: the checkpoint is damaged.
    """
    from srigl.io.checkpoint import latest_checkpoint, load_checkpoint

    overrides = dict(overrides or {})
    changed = sorted(set(overrides) - RUNTIME_FIELDS)
    if changed:
        raise InvalidConfigError(
            f"--resume continues the run with its own config; cannot change {changed} "
            f"(only {sorted(RUNTIME_FIELDS)} may be given)"
        )
    found = latest_checkpoint(run_dir)
    if found is None:
        raise InvalidConfigError(f"cannot resume {str(run_dir)!r}: no checkpoint (checkpoints/last.pt) there")
    saved = load_checkpoint(found).get("extra", {}).get("config")
    if not isinstance(saved, Mapping):
        raise InvalidConfigError(f"cannot resume from {found}: it holds no run config; it was not written by `srigl train`")
    values = {k: v for k, v in saved.items() if v is not None}
    config_from_mapping(values, str(found))  # a checkpoint from another srigl version is reported here
    toml = Path(run_dir) / "config.toml"
    if toml.exists():
        try:
            written = load_config_file(toml)
            if not written:  # valid TOML meaning "all defaults": what a crash during a non-atomic rewrite leaves
                raise InvalidConfigError(f"{toml} is empty")
            copy = config_from_mapping(written, str(toml)).to_dict()
        except InvalidConfigError as error:
            raise InvalidConfigError(
                f"{error}; the checkpoint {found} holds the run's config: delete {toml} to resume with it"
            ) from None
        differences = config_differences(saved, copy)
        if differences:
            raise InvalidConfigError(
                f"{toml} differs from the config in the checkpoint {found} in {sorted(differences)} "
                f"({_listed(differences, 'checkpoint', 'config.toml')}); the checkpoint is what the run trained "
                f"with: undo the edit, or delete {toml} to resume with the checkpoint's config"
            )
    values.update(overrides)
    values["out"] = str(run_dir)
    return config_from_mapping(values, str(found))
