"""The ``srigl`` command line: ``train``, ``report``, ``condense`` and ``data``.

``srigl train`` merges three sources, later ones winning: :class:`srigl.app.config.TrainConfig`
defaults, a ``--config file.toml``, and the flags given on the command line. Its flags are
generated from the ``TrainConfig`` fields (:func:`add_config_flags`) and parsed with
``argparse.SUPPRESS`` defaults so that "not given" is told apart from "given with the default
value". Every invalid name, value or combination exits with status 2 and a message that lists the
valid choices; other srigl errors (missing data, a damaged checkpoint) exit with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path
from typing import Any, Sequence

from srigl.app.config import DATA, OPTIMISATION, RUN, SPARSITY, TrainConfig, config_fields
from srigl.errors import InvalidConfigError, InvalidSparsityError, SriglError

SUPPRESS = argparse.SUPPRESS


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a model densely or with a sparse method",
        description="Train a model with dense, static, SET, RigL or SRigL training and write a run folder "
        "(config.toml, metrics.csv, summary.json, checkpoints/last.pt, curves.png with --plot).",
        argument_default=SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: built-in defaults < --config file < command-line flags. A --method flag also drops the\n"
        "file's settings that do not apply to it (gamma_sal/no_ablation unless srigl, sparsity for dense).\n"
        "Example: srigl train --data fashion-mnist --model mlp --method srigl --sparsity 0.9 --epochs 3 --plot",
    )
    groups = {name: p.add_argument_group(name) for name in (RUN, DATA, SPARSITY, OPTIMISATION)}
    groups[RUN].add_argument("--config", metavar="FILE", help="TOML file with any of the settings below (keys as the flags, with _)")
    groups[RUN].add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    # Not a TrainConfig field: it is an action on the folder, not a property of the run, and a
    # config.toml fed back with --config must never carry it (it would replace the run it names).
    groups[RUN].add_argument("--overwrite", action="store_true",
                             help="let a new run replace the run that --out holds (its files are deleted first)")
    add_config_flags(groups)
    p.set_defaults(handler=_run_train, subparser=p)
    return p


def config_flag(name: str, default: Any) -> str:
    """The ``srigl train`` flag of config field ``name``: ``--no-x`` for a boolean that defaults to True."""
    flag = "--" + name.replace("_", "-")
    return "--no-" + flag[2:] if default is True else flag


def add_config_flags(groups: dict[str, Any]) -> None:
    """One flag per :class:`TrainConfig` field, from the field's type, default and metadata.

    A boolean field becomes a switch that flips its default (``--plot``, ``--no-progress``); any
    other field takes one value of its type. Defaults stay ``SUPPRESS`` so that :func:`_merge` can
    tell "not given" from "given with the default value".
    """
    kinds = config_fields()
    for f in dataclasses.fields(TrainConfig):
        meta, kind = f.metadata, kinds[f.name]
        group = groups[meta["group"]]
        text = meta["help"].format(default=f.default).replace("%", "%%")  # argparse %-formats help
        if kind is bool:
            action = "store_false" if f.default else "store_true"
            group.add_argument(config_flag(f.name, f.default), dest=f.name, action=action, help=text)
            continue
        choices = meta["choices"]
        # A list is kept as it is: the data names' list also admits every xmc:NAME (config.DataNames).
        valid = choices() if choices is not None else None
        extra = {"choices": valid if isinstance(valid, list) else list(valid)} if valid is not None else {"type": kind}
        if meta["metavar"]:
            extra["metavar"] = meta["metavar"]
        group.add_argument(config_flag(f.name, f.default), dest=f.name, help=text, **extra)


def _merge(args: dict[str, Any]):
    """TrainConfig from defaults < --config file < flags (see the module docstring)."""
    from srigl.app.config import config_from_mapping, load_config_file

    values: dict[str, Any] = {}
    if "config" in args:
        values = dict(load_config_file(args["config"]))
        config_from_mapping(values, args["config"])  # unknown keys and types are reported against the file
        method = args.get("method")
        if method is not None and method != values.get("method", method):
            # A new method on the command line discards the file's settings that belong to another method.
            if method != "srigl":
                values.pop("gamma_sal", None)
                values.pop("no_ablation", None)
            if method == "dense":
                values.pop("sparsity", None)
    flags = {k: v for k, v in args.items() if k not in ("config", "resume", "overwrite")}
    values.update(flags)
    return config_from_mapping(values, "command line")


def _run_train(args: dict[str, Any], parser: argparse.ArgumentParser) -> int:
    from srigl.app.config import resolve_config, resume_config
    from srigl.app.metrics import format_table
    from srigl.app.train import TrainingInterrupted, train

    overwrite = bool(args.pop("overwrite", False))
    try:
        if "resume" in args:
            if "config" in args:
                raise InvalidConfigError("--resume uses the config in the run's checkpoint; do not give --config")
            if overwrite:
                raise InvalidConfigError("--overwrite starts a new run and --resume continues one; give one of them")
            flags = {k: v for k, v in args.items() if k != "resume"}
            config = resume_config(args["resume"], flags)
        else:
            config = _merge(args)
        config = resolve_config(config)
    except (InvalidConfigError, InvalidSparsityError) as error:
        parser.error(str(error))
    try:
        summary = train(config, resume="resume" in args, overwrite=overwrite)
    except TrainingInterrupted as error:
        print(f"srigl: {error}", file=sys.stderr)
        return 128 + error.signal_number  # as a shell reports a process ended by the signal: 130, 143
    except (InvalidConfigError, InvalidSparsityError) as error:
        parser.error(str(error))
    finally:
        # Under torchrun the DDP wrapper sits in reference cycles that hold the process group. Freed
        # only by the interpreter's final collection, the group's gloo worker threads can still be
        # freeing a finished collective while Python shuts down, which aborts the process ("terminate
        # called without an active exception", seen in ~1 of 3 loaded test runs). Collecting here
        # destroys the group, and joins its threads, while the interpreter is alive.
        gc.collect()
    if summary is not None:
        print()
        print(format_table(summary))
        out = Path(config.out)
        print(f"\nwrote {out / 'config.toml'}, {out / 'metrics.csv'}, {out / 'summary.json'}, {out / 'checkpoints' / 'last.pt'}"
              + (f", {out / 'curves.png'}" if config.plot else ""))
    return 0


def _report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="aggregate many runs into report.md and plots",
        description="Read summary.json/config.toml of runs (folders, or folders searched for them), group by "
        "(data, model, method incl. ablation on/off, sparsity) and write DIR/report.md with mean ± std over "
        "seeds plus PNG plots.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding run folders")
    p.add_argument("--out", required=True, metavar="DIR", help="where report.md and the plots go")
    p.add_argument("--fan-in-run", metavar="RUN_DIR", help="run whose per-layer fan-in histogram is plotted "
                   "(default: the sparsest SRigL run, else the sparsest run)")
    p.add_argument("--title", default="srigl report", help="heading of report.md")
    p.set_defaults(handler=_run_report, subparser=p)


def _run_report(args: dict[str, Any], parser: argparse.ArgumentParser) -> int:
    from srigl.app.report import ReportError, write_report

    try:
        path = write_report(args["runs"], args["out"], fan_in_run=args.get("fan_in_run"), title=args["title"])
    except ReportError as error:
        parser.error(str(error))
    print(f"wrote {path}")
    return 0


def _condense_parser(sub) -> None:
    p = sub.add_parser(
        "condense",
        help="turn a trained constant fan-in checkpoint into a condensed model file",
        description="Load a training checkpoint (checkpoints/last.pt of an SRigL run), condense it with "
        "srigl.condense and save it with srigl.save_condensed.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file or a run folder")
    p.add_argument("--out", required=True, metavar="FILE", help="condensed model file to write")
    p.set_defaults(handler=_run_condense, subparser=p)


def check_condense_out(checkpoint: str | Path, out: str | Path) -> None:
    """Refuse a ``srigl condense --out`` that would replace a run's checkpoint or cannot be written.

    Raises:
        InvalidConfigError: ``out`` is the input, a file in a run's ``checkpoints/`` folder (resuming
            needs ``last.pt``), an existing folder, or in a folder that does not exist.
    """
    from srigl.io.checkpoint import latest_checkpoint

    out, source = Path(out), latest_checkpoint(checkpoint)  # a run folder names its checkpoints/last.pt
    if out.exists() and out.is_dir():
        raise InvalidConfigError(f"--out {str(out)!r} is a folder; give the condensed model file's path")
    if not out.parent.is_dir():
        raise InvalidConfigError(f"--out {str(out)!r}: the folder {str(out.parent)!r} does not exist")
    if out.exists() and source is not None and out.resolve() == source.resolve():
        raise InvalidConfigError(f"--out {str(out)!r} is the input checkpoint; write the condensed model elsewhere")
    in_run_checkpoints = out.parent.name == "checkpoints" and (
        (out.parent / "last.pt").exists() or (out.parent.parent / "config.toml").exists()
    )
    if in_run_checkpoints:
        raise InvalidConfigError(
            f"--out {str(out)!r} is inside the run's checkpoints folder, which `srigl train --resume` reads; "
            f"write the condensed model elsewhere, e.g. {str(out.parent.parent / 'condensed.safetensors')!r}"
        )


def _run_condense(args: dict[str, Any], parser: argparse.ArgumentParser) -> int:
    from srigl import condense, save_condensed
    from srigl.app.train import load_trained_model

    try:
        check_condense_out(args["checkpoint"], args["out"])
        model, config = load_trained_model(args["checkpoint"])
    except InvalidConfigError as error:
        parser.error(str(error))
    if config.method == "dense":
        parser.error(f"{args['checkpoint']} is a dense run; nothing to condense")
    from srigl.app.datasets import dataset_info
    from srigl.app.datasets.xmc_sources import is_xmc

    condensed, report = condense(model, return_report=True)
    # What rebuilds the architecture (the skeleton load_condensed needs for models with custom blocks).
    if is_xmc(config.data):
        factory = "srigl.app.xmc_models.create_xmc_model"
        inputs = model.get_submodule(model.first_layer_name).in_features
        skeleton = {"model": config.model, "n_features": inputs, "n_labels": model.head.out_features,
                    "hidden": config.xmc_hidden}
    else:
        factory = "srigl.app.models.create_model"
        info = dataset_info(config.data)
        skeleton = {"model": config.model, "in_channels": info.in_channels, "image_size": info.image_size,
                    "num_classes": info.num_classes}
    try:
        save_condensed(condensed, args["out"], metadata={key: str(value) for key, value in skeleton.items()})
    except OSError as error:  # read-only or full file system, permission denied
        parser.error(f"cannot write {args['out']!r}: {error.strerror or error}")
    call = ", ".join(f"{value!r}" for value in skeleton.values())
    print(f"condensed {args['checkpoint']}: {report['params_before']} -> {report['params_after']} parameters; "
          f"wrote {args['out']}\nload it with: srigl.load_condensed({str(args['out'])!r}, "
          f"model={factory}({call}))")
    return 0


def _data_parser(sub) -> None:
    from srigl.app.datasets import list_datasets

    p = sub.add_parser(
        "data",
        help="fetch a data set, or show where srigl looks for it",
        description="Fetch a data set (Fashion-MNIST from the Debian package dataset-fashion-mnist; nothing "
        "is done when it is already on the search path), or list where srigl looks for one and what it finds.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    fetch_parser = actions.add_parser("fetch", help="obtain a data set (Fashion-MNIST from Debian's package)")
    where_parser = actions.add_parser("where", help="show where srigl looks for a data set and what it finds")
    for action in (fetch_parser, where_parser):
        action.add_argument("name", choices=list_datasets())
        action.add_argument("--data-dir", default="data", help="data directory (default: %(default)s)")
    p.set_defaults(handler=_run_data, subparser=p)


def _run_data(args: dict[str, Any], parser: argparse.ArgumentParser) -> int:
    from srigl.app.datasets import find_dataset_dir, search_dirs

    if args["action"] == "fetch":
        from srigl.app.datasets.fetch import fetch

        fetch(args["name"], args["data_dir"])
        return 0
    for directory in search_dirs(args["name"], args["data_dir"]):
        print(directory)
    if args["name"] != "digits":
        print(f"found: {find_dataset_dir(args['name'], args['data_dir'])}")
    return 0


def _kernels_parser(sub) -> None:
    p = sub.add_parser(
        "kernels",
        help="build the C++ fan-in kernel ahead of time",
        description="Compile the C++ fan-in kernel now (it is otherwise built on the first use of a condensed "
        "layer, once per CPU level); prints where it came from, or the compiler's output when it cannot be built.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("build", help="compile (or load from the cache) the C++ kernel")
    p.set_defaults(handler=_run_kernels, subparser=p)


def _run_kernels(args: dict[str, Any], parser: argparse.ArgumentParser) -> int:
    import warnings

    from srigl.kernels import cpu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failure is reported below, in full
        try:
            print(cpu.build())
        except RuntimeError as error:
            print(f"srigl kernels: error: {error}", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``srigl`` argument parser with its subcommands."""
    from srigl import __version__

    parser = argparse.ArgumentParser(prog="srigl", description="Dynamic sparse training with structured sparsity.")
    parser.add_argument("--version", action="version", version=f"srigl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _report_parser(sub)
    _condense_parser(sub)
    _data_parser(sub)
    _kernels_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``srigl`` console script and of ``python -m srigl``.

    Returns:
        The exit status: 0 on success, 2 for invalid arguments, 1 for other srigl errors,
        130 (SIGINT) or 143 (SIGTERM) when training was interrupted (a checkpoint to resume from
        was written).
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    handler, subparser = args.pop("handler"), args.pop("subparser")  # errors cite the subcommand's usage
    try:
        return handler(args, subparser)
    except SriglError as error:
        print(f"srigl {command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
