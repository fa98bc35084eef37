"""Real-size inference speed, dense eager vs condensed eager (fp32), after an untrained SRigL mask.

PARTIAL version of issue #17's benchmark: only the dense-eager and condensed-eager columns, fp32.
Masks come from ``srigl.SRigL`` at construction (constant fan-in, no training, no ablated neurons),
which is enough for speed: condensed cost depends on the mask's shape, not on trained values.
ViT-B/16 and ResNet-50 are timed per image batch; the GPT-2-small decoder per generated token with
its key/value cache after a short prompt. ``--quick`` builds tiny versions (a smoke test).

Usage: ``python benchmarks/real_models.py [--quick] [--threads 2] [--out results/real_models.md]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import srigl
from srigl.app.decoder import Decoder
from srigl.app.models import create_model


def build(name: str, quick: bool) -> tuple[torch.nn.Module, object]:
    """The model and a callable input maker (batch -> example input)."""
    if name == "vit-b16":
        kw = dict(patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64) if quick else {}
        size = 32 if quick else 224
        return create_model(name, 3, size, 10 if quick else 1000, **kw), lambda b: torch.randn(b, 3, size, size)
    if name == "resnet50":
        size = 32 if quick else 224
        return create_model(name, 3, size, 10 if quick else 1000, **({"width": 0.125} if quick else {})), (
            lambda b: torch.randn(b, 3, size, size))
    kw = dict(vocab_size=64, context=32, dim=32, depth=2, heads=4) if quick else {}
    return Decoder(**kw), None


def sparsify(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Puts random SRigL constant fan-in masks at ``sparsity`` on ``model``; returns it condensed."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    srigl.SRigL(model, optimizer, sparsity=sparsity, total_steps=10)
    return srigl.condense(model.eval()).eval()


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    parser.add_argument("--out", type=Path, default=Path("results/real_models.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    lines = [
        "# Real-size models: dense eager vs condensed eager (partial #17 benchmark)", "",
        f"torch {torch.__version__}, {args.threads} threads, fp32, batch 1, median of {repeats} repeats"
        f"{' (--quick: tiny models)' if args.quick else ''}; untrained SRigL masks, no ablation.", "",
        "| model | sparsity | dense eager (ms) | condensed eager (ms) | speedup |", "|---|---|---|---|---|",
    ]
    for name in ["vit-b16", "resnet50", "gpt2-small"]:
        for sparsity in args.sparsity:
            torch.manual_seed(0)
            dense, make_input = build(name, args.quick)
            masked = copy.deepcopy(dense)  # dense stays a plain model: the baseline is true dense eager
            condensed = sparsify(masked, sparsity)
            dense.eval()
            with torch.no_grad():
                if make_input is not None:
                    x = make_input(1)
                    runs = {k: (lambda m=m: m(x)) for k, m in (("dense", dense), ("condensed", condensed))}
                else:  # one cached decoding step after an 8-token prompt
                    prompt = torch.randint(0, dense.token_embed.num_embeddings, (1, 8))
                    runs = {}
                    for k, m in (("dense", dense), ("condensed", condensed)):
                        _, past = m(prompt)
                        runs[k] = lambda m=m, past=past: m(prompt[:, :1], past)
                for fn in runs.values():
                    fn()  # warm-up
                # The condensed model must compute what the masked one does.
                if make_input is None:
                    outputs = [masked(prompt)[0], condensed(prompt)[0]]
                else:
                    outputs = [masked(x), condensed(x)]
                error = (outputs[0] - outputs[1]).abs().max().item()
                if error > 1e-3 * max(1.0, outputs[0].abs().max().item()):
                    raise SystemExit(f"{name}: condensed output differs from dense-masked by {error:.3g}")
                dense_ms = median_ms(runs["dense"], repeats)
                condensed_ms = median_ms(runs["condensed"], repeats)
            lines.append(f"| {name} | {sparsity:.0%} | {dense_ms:.2f} | {condensed_ms:.2f} | {dense_ms / condensed_ms:.2f}× |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
