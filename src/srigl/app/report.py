"""``srigl report``: aggregate many runs into a markdown table and plots.

Each run folder written by ``srigl train`` holds ``summary.json`` (final metrics, the resolved
config, and every sparse neuron's fan-in). Runs are grouped by (data set, model, method variant,
sparsity), where the variant splits srigl by ablation on/off (``srigl (γ_sal=0.3)`` vs
``srigl (no ablation)``), and each group is reduced to the mean and the sample standard deviation
(``ddof = 1``, as the SRigL paper's tables; 0 for a single seed) of its final test accuracy and of
its percentage of active neurons.

A run folder copied (a backup next to the original) holds the same config and seed as the original:
it is counted once, with a warning naming both folders, rather than as a second seed. Strings read
from ``summary.json`` go into ``report.md`` with ``|`` escaped and line breaks replaced by spaces, so
no value can end a table cell or start a row of its own.

Outputs in ``--out DIR``: ``report.md``, ``accuracy_vs_sparsity.png``,
``active_neurons_vs_sparsity.png`` and ``fan_in_histogram.png`` (every layer of one chosen run).
matplotlib is imported only to draw.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from srigl.errors import SriglError

# Variants in the order tables and legends list them.
_ORDER = ("dense", "static", "set", "rigl", "srigl (no ablation)")


class ReportError(SriglError, ValueError):
    """No run could be read, or a run folder is damaged (the message names the file)."""


@dataclass(frozen=True)
class RunRecord:
    """The numbers of one finished run that the report needs.

    Attributes:
        path: the run folder.
        data, model, method: from the run's config.
        label: method variant (``rigl``, ``srigl (γ_sal=0.3)``, ``srigl (no ablation)``, ...).
        sparsity: global target sparsity (0 for dense).
        seed: the run's seed.
        test_acc: final test accuracy in [0, 1].
        active_fraction: final fraction of active neurons over the sparse layers, in [0, 1].
        summary: the whole ``summary.json``.
    """

    path: Path
    data: str
    model: str
    method: str
    label: str
    sparsity: float
    seed: int
    test_acc: float
    active_fraction: float
    summary: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Cell:
    """One group of runs that differ only by seed, reduced to mean ± sample std."""

    data: str
    model: str
    label: str
    sparsity: float
    n: int
    acc_mean: float  # percent
    acc_std: float
    active_mean: float  # percent
    active_std: float
    seeds: tuple[int, ...]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1`` in the denominator; 0 when ``n == 1``).

    Raises:
        ReportError: ``values`` is empty.
    """
    n = len(values)
    if n == 0:
        raise ReportError("mean_std of no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among ``paths``: each path that holds ``summary.json``, else every folder below it that does.

    Raises:
        ReportError: a path does not exist, or no run folder is found at all.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{path}: no such run folder")
        if (path / "summary.json").is_file():
            found.append(path)
        else:
            found += sorted(p.parent for p in path.rglob("summary.json"))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ReportError(f"no summary.json found in {[str(p) for p in paths]}; are these `srigl train` run folders?")
    return unique


def load_run(path: str | Path) -> RunRecord:
    """Read one run folder's ``summary.json``.

    Raises:
        ReportError: the file is missing, is not JSON, or lacks the entries the report needs.
    """
    path = Path(path)
    file = path / "summary.json"
    try:
        summary = json.loads(file.read_text())
    except FileNotFoundError:
        raise ReportError(f"{file}: missing (an unfinished run?)") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"{file}: not valid JSON ({error})") from None
    try:
        config, final = summary["config"], summary["final"]
        names = {key: config[key] for key in ("data", "model", "method")}
        if summary.get("label") is not None:
            names["label"] = summary["label"]
        wrong = [key for key, value in names.items() if not isinstance(value, str)]
        if wrong:
            raise TypeError(f"{wrong[0]!r} must be a string, got {names[wrong[0]]!r:.60}")
        return RunRecord(
            path=path,
            data=config["data"],
            model=config["model"],
            method=config["method"],
            label=summary.get("label") or _label(config["method"], config.get("gamma_sal")),
            sparsity=float(config["sparsity"] or 0.0),
            seed=int(config["seed"]),
            test_acc=float(final["test_acc"]),
            active_fraction=float(final["active_neuron_fraction"]),
            summary=summary,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ReportError(f"{file}: not a srigl run summary (missing or bad entry {error})") from None


def _label(method: str, gamma_sal: float | None) -> str:
    from srigl.app.config import method_label

    return method_label(method, gamma_sal)


# Config entries that say where and how a run was executed, not what it computed.
_PLACE_KEYS = frozenset({"out", "data_dir", "plot", "threads", "progress", "device"})


def _identity(run: RunRecord) -> str:
    """What makes two runs the same run: their config (seed included) without where it ran."""
    config = {k: v for k, v in run.summary["config"].items() if k not in _PLACE_KEYS}
    return json.dumps([run.label, config], sort_keys=True, default=str)


def load_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Every distinct run found under ``paths`` (see :func:`find_run_dirs`).

    A run whose config and seed repeat an earlier one's (a copied run folder) is left out with a
    warning naming both folders: counted twice it would pass for a second seed with zero spread.
    """
    runs: dict[str, RunRecord] = {}
    for path in find_run_dirs(paths):
        run = load_run(path)
        first = runs.setdefault(_identity(run), run)
        if first is not run:
            warnings.warn(
                f"srigl report: {run.path} repeats {first.path} (same config and seed {run.seed}; a copied run "
                "folder?): counted once",
                UserWarning,
                stacklevel=2,
            )
    return list(runs.values())


def _md(value: object) -> str:
    """``value`` as text that stays inside one markdown table cell: ``|`` escaped, line breaks as spaces."""
    text = " ".join(str(value).splitlines())
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _label_key(label: str) -> tuple[int, str]:
    return (_ORDER.index(label), label) if label in _ORDER else (len(_ORDER), label)


def aggregate(runs: Iterable[RunRecord]) -> list[Cell]:
    """Group runs by (data, model, label, sparsity) and reduce each group over its seeds.

    Returns:
        Cells sorted by data, model, sparsity and variant; accuracies and active neurons in percent.
    """
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((run.data, run.model, run.label, round(run.sparsity, 6)), []).append(run)
    cells = []
    for (data, model, label, sparsity), members in groups.items():
        acc = mean_std([100.0 * r.test_acc for r in members])
        active = mean_std([100.0 * r.active_fraction for r in members])
        cells.append(Cell(data, model, label, sparsity, len(members), *acc, *active, tuple(sorted(r.seed for r in members))))
    return sorted(cells, key=lambda c: (c.data, c.model, c.sparsity, _label_key(c.label)))


def markdown_table(cells: Sequence[Cell]) -> str:
    """Long-format table: one row per cell, mean ± std and the number of seeds."""
    lines = [
        "| data | model | method | sparsity % | test accuracy % | active neurons % | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {_md(c.data)} | {_md(c.model)} | {_md(c.label)} | {100 * c.sparsity:g} | {c.acc_mean:.2f} ± {c.acc_std:.2f} | "
            f"{c.active_mean:.1f} ± {c.active_std:.1f} | {c.n} |"
        )
    return "\n".join(lines)


def pivot_table(cells: Sequence[Cell], data: str, model: str, value: str = "acc") -> str:
    """Sparsity rows x method columns for one (data, model); ``value`` is ``acc`` or ``active``."""
    mine = [c for c in cells if c.data == data and c.model == model]
    labels = sorted({c.label for c in mine if c.label != "dense"}, key=_label_key)
    dense = next((c for c in mine if c.label == "dense"), None)
    head = "accuracy %" if value == "acc" else "active neurons %"
    lines = ["| sparsity % | " + " | ".join(map(_md, labels)) + " |", "|---|" + "---|" * len(labels)]
    for sparsity in sorted({c.sparsity for c in mine if c.label != "dense"}):
        row = []
        for label in labels:
            c = next((c for c in mine if c.label == label and c.sparsity == sparsity), None)
            if c is None:
                row.append("–")
            else:
                mean, std = (c.acc_mean, c.acc_std) if value == "acc" else (c.active_mean, c.active_std)
                row.append(f"{mean:.2f} ± {std:.2f}")
        lines.append(f"| {100 * sparsity:g} | " + " | ".join(row) + " |")
    note = ""
    if dense is not None:
        mean, std = (dense.acc_mean, dense.acc_std) if value == "acc" else (dense.active_mean, dense.active_std)
        note = f"\n\nDense {head}: {mean:.2f} ± {std:.2f} (n={dense.n})."
    return "\n".join(lines) + note


def _plt():
    from srigl._optional import require

    require("matplotlib", "plotting").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_vs_sparsity(cells: Sequence[Cell], path: Path, value: str = "acc") -> Path:
    """One panel per (data, model): ``value`` (``acc`` or ``active``) against sparsity, one line per method.

    Sparsities are spaced evenly (0.5 ... 0.99 would crowd at the right on a linear axis); dense is
    a dashed line with its ±std band.
    """
    plt = _plt()
    panels = sorted({(c.data, c.model) for c in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (data, model) in zip(axes[0], panels):
        mine = [c for c in cells if (c.data, c.model) == (data, model)]
        sparsities = sorted({c.sparsity for c in mine if c.label != "dense"})
        x_of = {s: i for i, s in enumerate(sparsities)}
        for label in sorted({c.label for c in mine}, key=_label_key):
            points = sorted((c for c in mine if c.label == label), key=lambda c: c.sparsity)
            mean = [c.acc_mean if value == "acc" else c.active_mean for c in points]
            std = [c.acc_std if value == "acc" else c.active_std for c in points]
            if label == "dense":
                if sparsities:
                    ax.axhline(mean[0], color="k", ls="--", lw=1, label=f"dense (n={points[0].n})")
                    ax.axhspan(mean[0] - std[0], mean[0] + std[0], color="k", alpha=0.08)
                continue
            ax.errorbar([x_of[c.sparsity] for c in points], mean, yerr=std, marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(sparsities)), [f"{100 * s:g}" for s in sparsities])
        ax.set_xlabel("sparsity %")
        ax.set_ylabel("final test accuracy %" if value == "acc" else "active neurons %")
        ax.set_title(f"{model} on {data}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fan_in(run: RunRecord, path: Path) -> Path | None:
    """Histogram of the per-neuron fan-in of every layer of ``run`` (ablated neurons at fan-in 0)."""
    layers = {n: e for n, e in run.summary.get("layers", {}).items() if e.get("fan_in_counts")}
    if not layers:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.2), squeeze=False)
    for ax, (name, entry) in zip(axes[0], layers.items()):
        counts = entry["fan_in_counts"]
        top = max(counts) if counts else 0
        # Integer-centred bins; for wide ranges, fan-in 0 (ablated) keeps a bin of its own.
        if top <= 60:
            bins = [b - 0.5 for b in range(top + 2)]
        else:
            bins = [-0.5] + [0.5 + i * top / 40 for i in range(41)]
        ax.hist(counts, bins=bins, color="tab:blue", edgecolor="white", linewidth=0.3)
        zero = sum(1 for c in counts if c == 0)
        ax.set_title(f"{name}\n{'x'.join(map(str, entry.get('shape', [])))}, {zero}/{len(counts)} ablated", fontsize=8)
        ax.set_xlabel("fan-in (active weights)")
        ax.set_ylabel("neurons")
    fig.suptitle(f"{run.label} {run.model} {run.data} sparsity {run.sparsity:g} seed {run.seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _default_fan_in_run(runs: Sequence[RunRecord]) -> RunRecord:
    srigl = [r for r in runs if r.method == "srigl"]
    pool = srigl or runs
    return max(pool, key=lambda r: (r.sparsity, -r.seed))


def write_report(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    fan_in_run: str | Path | None = None,
    title: str = "srigl report",
) -> Path:
    """Aggregate the runs under ``paths`` and write ``report.md`` and the plots into ``out``.

    Args:
        paths: run folders, or folders searched for them.
        out: output folder (created).
        fan_in_run: run folder whose fan-in histogram is drawn; default the sparsest srigl run.
        title: the report's heading.

    Returns:
        The path of ``report.md``.

    Raises:
        ReportError: no readable run.
    """
    runs = load_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = aggregate(runs)
    chosen = load_run(fan_in_run) if fan_in_run is not None else _default_fan_in_run(runs)

    acc_png = plot_vs_sparsity(cells, out / "accuracy_vs_sparsity.png", "acc")
    active_png = plot_vs_sparsity(cells, out / "active_neurons_vs_sparsity.png", "active")
    fan_png = plot_fan_in(chosen, out / "fan_in_histogram.png")

    lines = [
        f"# {title}",
        "",
        f"{len(runs)} runs in {len(cells)} groups (data, model, method, sparsity); each cell is the mean ± "
        "sample standard deviation over seeds of the final-epoch value. Active neurons: output neurons of "
        "the sparse layers with at least one active incoming weight.",
        "",
    ]
    for data, model in sorted({(c.data, c.model) for c in cells}):
        # An XMC run's test_acc is its P@1 (srigl.app.xmc_train).
        accuracy = "Final test P@1 % (test accuracy of XMC data)" if data.startswith("xmc") else "Final test accuracy %"
        lines += [f"## {_md(model)} on {_md(data)}", "", f"{accuracy}:", "", pivot_table(cells, data, model, "acc"), ""]
        lines += ["Active neurons %:", "", pivot_table(cells, data, model, "active"), ""]
    lines += ["## All groups", "", markdown_table(cells), "", "## Plots", ""]
    lines += [f"![accuracy vs sparsity]({acc_png.name})", "", f"![active neurons vs sparsity]({active_png.name})", ""]
    if fan_png is not None:
        lines += [
            f"Per-neuron fan-in of every layer of `{_md(chosen.path.name)}` ({_md(chosen.label)}, sparsity {chosen.sparsity:g}, "
            f"seed {chosen.seed}; ablated neurons have fan-in 0):",
            "",
            f"![fan-in histogram]({fan_png.name})",
            "",
        ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


__all__ = [
    "Cell", "ReportError", "RunRecord", "aggregate", "find_run_dirs", "load_run", "load_runs", "markdown_table",
    "mean_std", "pivot_table", "plot_fan_in", "plot_vs_sparsity", "write_report",
]
