"""The sparsifier's per-tensor report: a plain dict that prints as a table."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Fixed-width text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[Any]) -> str:
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows]])


class Summary(dict):
    """``{parameter FQN: entry}`` as :meth:`srigl.Sparsifier.summary` returns it.

    Still a plain dict (``summary["fc1.weight"]["fan_in"]``, ``json.dumps(summary)``); ``print``
    shows one line per tensor: shape, sparsity, fan-in, active neurons, and why dense tensors are.
    """

    @classmethod
    def of(cls, decisions: Sequence[Any], layers: Sequence[Any], structure: str, masked_reasons: Mapping[str, str]) -> "Summary":
        """The report of a sparsifier: one entry per selection decision (``srigl.selection.Candidate``),
        with the live facts of its sparse tensor (``srigl.storage.SparseParam``) where it has one."""
        by_name = {layer.name: layer for layer in layers}
        report = cls()
        for c in decisions:
            numel = math.prod(c.shape)
            entry: dict[str, Any] = {"shape": c.shape, "sparse": c.sparse, "reason": c.reason, "numel": numel}
            layer = by_name.get(c.name)
            if layer is None:
                entry.update(nnz=numel, sparsity=0.0)
            else:
                counts = layer.fan_in_counts()  # (out,)
                active = counts > 0
                nnz = int(counts.sum())
                fan_ins = counts[active].unique().tolist()
                entry.update(
                    nnz=nnz,
                    sparsity=1.0 - nnz / numel,
                    target_sparsity=layer.sparsity,
                    fan_in=fan_ins[0] if len(fan_ins) == 1 else None,
                    mean_fan_in=float(counts[active].float().mean()) if bool(active.any()) else 0.0,
                    dense_fan_in=layer.fan_in,
                    active_neurons=int(active.sum()),
                    neurons=layer.n_rows,
                    ablation=layer.ablate,
                    structure=structure,
                    **layer.describe(),
                )
                if c.name in masked_reasons:
                    entry["storage_reason"] = masked_reasons[c.name]
            report[c.name] = entry
        return report

    def __str__(self) -> str:
        header = ("tensor", "shape", "sparsity", "fan-in", "neurons", "note")
        rows = []
        for name, e in self.items():
            shape = "x".join(str(s) for s in e["shape"]) or "-"
            if "neurons" not in e:
                rows.append((name, shape, "dense", "-", "-", e["reason"]))
                continue
            fan_in = e["fan_in"] if e.get("fan_in") is not None else f"~{e['mean_fan_in']:.1f}"
            note = [e["structure"]]
            if e.get("ablation"):
                note.append("ablation")
            if e.get("storage") == "compact" or e.get("storage_reason"):
                note.append(e["storage"])  # masked is the default; said only in a compact run
            rows.append((
                name, shape, f"{100 * e['sparsity']:.1f} %", f"{fan_in}/{e['dense_fan_in']}",
                f"{e['active_neurons']}/{e['neurons']}", ", ".join(note),
            ))
        return table(header, rows)

    def __repr__(self) -> str:
        return f"Summary({dict.__repr__(self)})"
