"""End-to-end inference latency: a trained SRigL model (90 %) masked-dense vs condensed.

Trains ``mlp`` and ``vit-tiny`` with ``srigl train`` on Fashion-MNIST (short runs: the point is a
real trained mask with real ablation, not accuracy), condenses each checkpoint with
:func:`srigl.condense`, checks the outputs agree, and times both models at batch 1 and 256 with
``benchmarks/condensed_linear.bench_model`` in the same run. Writes ``results/end_to_end.md``.

Usage: ``python benchmarks/end_to_end.py [--data-dir data] [--threads 2] [--runs runs/e2e]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from condensed_linear import bench_model  # noqa: E402

import srigl  # noqa: E402
from srigl.app.config import TrainConfig  # noqa: E402
from srigl.app.train import load_trained_model, train  # noqa: E402

MODELS = {
    # name: training settings (short; vit-tiny uses its paper gamma_sal 0.95 by default)
    "mlp": dict(epochs=2),
    "vit-tiny": dict(epochs=2, limit_train=24_000, optimizer="adamw"),  # 376 steps: 2 mask updates
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=Path("runs/e2e"))
    parser.add_argument("--out", type=Path, default=Path("results/end_to_end.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        "# End-to-end latency: trained SRigL 90 % models, masked dense vs condensed",
        "",
        f"`benchmarks/end_to_end.py`; torch {torch.__version__}, {args.threads} threads, fp32, eval mode; "
        "median of `torch.utils.benchmark` `blocked_autorange`, dense and condensed timed in the same run. "
        "Models trained briefly on Fashion-MNIST with `srigl train --method srigl --sparsity 0.9`.",
        "",
        "| model | test acc | params dense → condensed | neurons in condensed layers | batch | masked dense (µs) | condensed (µs) | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, settings in MODELS.items():
        run_dir = args.runs / name
        if not (run_dir / "summary.json").exists():
            config = TrainConfig(
                data="fashion-mnist", data_dir=args.data_dir, model=name, method="srigl", sparsity=0.9,
                seed=0, out=str(run_dir), progress=False, **settings,
            )
            train(config, overwrite=True)  # no summary: nothing finished there to keep
        import json

        summary = json.loads((run_dir / "summary.json").read_text())
        model, config = load_trained_model(run_dir)
        condensed, report = srigl.condense(model, return_report=True)
        input_shape = (1, 28, 28)
        x = torch.randn(64, *input_shape)
        with torch.no_grad():
            error = (model(x) - condensed(x)).abs().max().item()
        if error > 1e-4:
            raise SystemExit(f"{name}: condensed output differs from the masked model by {error:.3g}")
        active = sum(layer.get("active_neurons", 0) for layer in report["layers"].values()) if isinstance(
            report.get("layers"), dict) else None
        rows = bench_model(model, condensed, [1, 256], input_shape=input_shape)
        for row in rows:
            lines.append(
                f"| {name} | {summary['final']['test_acc']:.4f} | {report['params_before']:,} → "
                f"{report['params_after']:,} | {active if active is not None else '–'} | {row['batch']} | "
                f"{row['dense_us']:.1f} | {row['condensed_us']:.1f} | {row['speedup']:.2f}× |"
            )
            print(lines[-1], flush=True)
        print(f"{name}: max |masked - condensed| = {error:.2e}")
    lines += [
        "",
        "Every sparse Linear is condensed, and so are the ViT's attention projections "
        "(`nn.MultiheadAttention` → `CondensedMultiheadAttention`, whose ablated q/k/v/out rows are kept "
        "and filled in by the kernel's row scatter); what stays dense is what SRigL leaves dense (the ViT's "
        "patch embedding and the layers the sparsity policy exempts) plus everything that is not a weight "
        "product (attention core, LayerNorm, GELU).",
        "At batch 1 a small model costs tens of µs and each condensed layer adds about 2–3 µs of dispatch "
        "(Python checks plus the operator call, see results/condensed_linear.md), about what a dense "
        "784 → 256 matrix-vector product costs; so at batch 1 these small models gain only ~1.2×, and the "
        "per-layer speedups of results/condensed_linear.md appear at the paper's layer sizes (3072 → 768).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
