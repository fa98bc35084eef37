"""Measuring a run: test evaluation, per-layer report, ``metrics.csv`` (and TensorBoard), the
learning-curve plot and the table printed at the end of ``srigl train``.

matplotlib and TensorBoard are imported where they are used.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from srigl.app import flops
from srigl.io.atomic import atomic_write
from srigl.masks import unwrap

METRIC_COLUMNS = (
    "epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "global_sparsity",
    "active_neurons", "active_neuron_fraction", "mask_churn", "seconds",
)


# The ranking metrics an XMC run adds to its rows (srigl.app.xmc_metrics), on the test split.
XMC_RANK_METRICS = ("P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5")


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device, label_smoothing: float = 0.0) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``dataset`` in its stored order."""
    from srigl.app import datasets

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    order = [(i, 0) for i in range(len(dataset))]
    for images, labels in datasets.batches(dataset, order, batch_size):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing).double()
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += len(labels)
    model.train(was_training)
    return float(loss_sum) / max(seen, 1), int(correct) / max(seen, 1)


def neuron_totals(model: nn.Module, sparsifier, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(active, total)`` output neurons over the sparse layers (over every counted layer when dense).

    A neuron is active when it has at least one active incoming weight.
    """
    if sparsifier is not None:
        entries = [e for e in sparsifier.summary().values() if e["sparse"] and "neurons" in e]
        return sum(e["active_neurons"] for e in entries), sum(e["neurons"] for e in entries)
    costs = [c for c in flops.count_costs(model, input_shape) if c.neurons]
    return sum(c.active_neurons for c in costs), sum(c.neurons for c in costs)


def layer_report(model: nn.Module, sparsifier, input_shape: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Per weight tensor: the sparsifier's summary (when sparse), its costs, and every neuron's fan-in."""
    base = unwrap(model)
    summary = sparsifier.summary() if sparsifier is not None else {}
    report: dict[str, dict[str, Any]] = {}
    for cost in flops.count_costs(base, input_shape):
        entry: dict[str, Any] = {k: v for k, v in cost.as_dict().items() if k != "name"}
        info = summary.get(cost.name)
        if info is not None:
            entry.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in info.items() if k not in ("numel", "nnz")})
        else:
            entry.setdefault("sparse", False)
        entry["sparsity"] = 1.0 - cost.params / cost.params_dense if cost.params_dense else 0.0
        if cost.neurons:
            module_name, _, param_name = cost.name.rpartition(".")
            module = base.get_submodule(module_name) if module_name else base
            entry["fan_in_counts"] = flops.fan_in_counts(module, param_name)
        report[cost.name] = entry
    return report


class MetricsLog:
    """``metrics.csv`` (and TensorBoard events when available), one row per epoch.

    ``columns`` are the CSV's columns (:data:`METRIC_COLUMNS`; an XMC run adds its ranking metrics).
    """

    def __init__(self, run_dir: Path, keep_epochs: int = 0, columns: tuple[str, ...] = METRIC_COLUMNS):
        self.path = run_dir / "metrics.csv"
        self.columns = tuple(columns)
        rows = []
        if keep_epochs and self.path.exists():
            # A resumed run keeps the rows of the epochs its checkpoint covers and drops the rest.
            with open(self.path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= keep_epochs]
        # Rewritten atomically: a crash here must not lose the rows of the epochs already trained.
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path, lambda file: file.write(text.getvalue().encode()))
        self.rows: list[dict[str, Any]] = [{k: float(v) for k, v in r.items()} for r in rows]
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is optional
            pass

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one epoch's row."""
        self.rows.append(dict(row))
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow({k: row[k] for k in self.columns})
        if self.tensorboard is not None:
            for key in self.columns[2:]:
                self.tensorboard.add_scalar(key, row[key], int(row["step"]))
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_curves(rows: list[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Loss, accuracy and active-neuron curves per epoch as a PNG (matplotlib, Agg backend)."""
    from srigl._optional import require

    require("matplotlib", "plotting").use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    axes[0].plot(epochs, [r["test_loss"] for r in rows], "s-", label="test")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].plot(epochs, [100 * r["train_acc"] for r in rows], "o-", label="train")
    axes[1].plot(epochs, [100 * r["test_acc"] for r in rows], "s-", label="test")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    axes[2].plot(epochs, [100 * r["active_neuron_fraction"] for r in rows], "o-", label="active neurons")
    axes[2].plot(epochs, [100 * r["global_sparsity"] for r in rows], "s-", label="global sparsity")
    axes[2].set(xlabel="epoch", ylabel="%", title="sparsity and active neurons")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(summary: Mapping[str, Any]) -> str:
    """The final report printed at the end of a run: totals, then one line per weight tensor."""
    final = summary["final"]
    lines = [
        f"run {summary['config']['out']}: {summary['label']} on {summary['config']['data']} / {summary['config']['model']}",
        f"test accuracy {100 * final['test_acc']:.2f} %   test loss {final['test_loss']:.4f}   "
        f"global sparsity {100 * final['global_sparsity']:.2f} %   "
        f"active neurons {final['active_neurons']}/{final['neurons']} ({100 * final['active_neuron_fraction']:.1f} %)",
        f"weights {flops.human(final['params'])} of {flops.human(final['params_dense'])} dense "
        f"({final['params'] / max(final['params_dense'], 1):.3f}x); "
        f"MACs/forward {flops.human(final['macs'])} of {flops.human(final['macs_dense'])} "
        f"({final['macs'] / max(final['macs_dense'], 1):.3f}x); all parameters {flops.human(final['all_params'])} "
        f"of {flops.human(final['all_params_dense'])}",
        "",
    ]
    if "P@1" in final:  # an XMC run: its test accuracy above is P@1
        ranks = "   ".join(f"{name} {100 * final[name]:.2f}" for name in XMC_RANK_METRICS if name in final)
        lines.insert(2, f"XMC test ranking (%): {ranks}")
    header = ("layer", "shape", "sparsity", "fan-in", "neurons", "weights", "dense", "MACs", "dense MACs")
    rows = []
    for name, e in summary["layers"].items():
        fan_in = e.get("fan_in")
        if fan_in is None and e.get("mean_fan_in") is not None:
            fan_in = f"~{e['mean_fan_in']:.1f}"
        rows.append((
            name,
            "x".join(str(s) for s in e["shape"]) or "-",
            f"{100 * e['sparsity']:.1f} %",
            "dense" if not e.get("sparse") else str(fan_in),
            f"{e['active_neurons']}/{e['neurons']}" if e["neurons"] else "-",
            flops.human(e["params"]),
            flops.human(e["params_dense"]),
            flops.human(e["macs"]),
            flops.human(e["macs_dense"]),
        ))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    lines += [fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]
    return "\n".join(lines)
