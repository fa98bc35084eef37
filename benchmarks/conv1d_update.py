"""Hugging Face ``Conv1D`` (weight stored ``(in, out)``, read through a transposed view) against the
``nn.Linear`` twin holding the transposed weights: masked training step and mask update, side by side.

One GPT-2-small block's projections (``c_attn`` 768 -> 2304, ``attn.c_proj`` 768 -> 768, ``c_fc``
768 -> 3072, ``mlp.c_proj`` 3072 -> 768), each fed its own input of ``batch x tokens`` rows, at 90 %
sparsity (SRigL with ablation, SGD momentum). The two models take turns, round by round, so the load
of a shared machine falls on both alike; medians are reported. Three rows: the dense step (no
sparsifier: what Conv1D's own ``addmm`` costs against ``F.linear``), the masked step with updates far
away, and the update step, measured with ``delta = 1`` (every step updates). After the run the
two models' masks are checked to be transposes of each other (same seed, same data), so the timing
compares the same work.

Writes ``results/conv1d_update.md``. Usage:
``python benchmarks/conv1d_update.py [--quick] [--threads 2] [--rounds 7] [--tokens 64]``
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/compact_training.py

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import srigl  # noqa: E402

# (name, in, out) of one GPT-2-small block's projections.
PROJECTIONS = (("c_attn", 768, 2304), ("attn_c_proj", 768, 768), ("c_fc", 768, 3072), ("mlp_c_proj", 3072, 768))
TARGET = 1.25  # Conv1D update time / Linear update time we accept
# (row, delta): dense (no sparsifier), masked steps with the update far away, every step an update.
PHASES = (("dense step", None), ("masked step", 10_000), ("update step", 1))


class Block(nn.Module):
    """The projections side by side (each reads its own input): what the sparsifier sees of a block."""

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(layer(inputs[name]).square().mean() for name, layer in self.layers.items())


def models(scale: int) -> tuple[Block, Block]:
    torch.manual_seed(0)
    conv = Block({name: Conv1D(n_out // scale, n_in // scale) for name, n_in, n_out in PROJECTIONS})
    for layer in conv.layers.values():
        nn.init.normal_(layer.weight, std=0.02)
    linear = Block({})
    for name, layer in conv.layers.items():
        twin = nn.Linear(*layer.weight.shape)
        with torch.no_grad():
            twin.weight.copy_(layer.weight.t())  # (in, out) -> (out, in)
            twin.bias.copy_(layer.bias)
        linear.layers[name] = twin
    return conv, linear


def engine(model: Block, delta: int | None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if delta is None:  # dense: no sparsifier
        return optimizer, None
    sparsifier = srigl.SRigL(model, optimizer, sparsity=0.9, total_steps=10_000, delta=delta, gamma_sal=0.3,
                             distribution="uniform")
    return optimizer, sparsifier


def step(model: Block, optimizer, sparsifier, inputs: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(inputs).backward()
    optimizer.step()
    if sparsifier is not None:
        sparsifier.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="layers 8x narrower, 2 rounds (a smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64, help="input rows per projection (batch x tokens)")
    parser.add_argument("--out", default=None, help="default: results/conv1d_update.md (not written with --quick)")
    args = parser.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = str(Path(__file__).resolve().parents[1] / "results" / "conv1d_update.md")
    torch.set_num_threads(args.threads)
    scale, rounds = (8, 2) if args.quick else (1, args.rounds)
    generator = torch.Generator().manual_seed(1)
    batches = [
        {name: torch.randn(args.tokens, n_in // scale, generator=generator) for name, n_in, _ in PROJECTIONS}
        for _ in range(rounds)
    ]
    conv, linear = models(scale)
    times: dict[tuple[str, str], list[float]] = {}
    for phase, delta in PHASES:
        runs = {"Conv1D": (copy.deepcopy(conv),), "Linear": (copy.deepcopy(linear),)}
        runs = {kind: (m, *engine(m, delta)) for kind, (m,) in runs.items()}
        for inputs in batches:
            for kind, (model, optimizer, sparsifier) in runs.items():  # turns: both see the same load
                times.setdefault((phase, kind), []).append(step(model, optimizer, sparsifier, inputs))
        if phase == "update step":
            conv_masks, linear_masks = runs["Conv1D"][2].masks(), runs["Linear"][2].masks()
            same = all(torch.equal(conv_masks[n], linear_masks[n].t()) for n in conv_masks)
    median = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    rows = []
    for phase, _ in PHASES:
        c, lin = median[(phase, "Conv1D")], median[(phase, "Linear")]
        rows.append(f"| {phase} | {c:.1f} | {lin:.1f} | {c / lin:.2f}x |")
    ratio = median[("update step", "Conv1D")] / median[("update step", "Linear")]
    verdict = "met" if ratio <= TARGET else "missed"
    sizes = ", ".join(f"{name} {n_in // scale}->{n_out // scale}" for name, n_in, n_out in PROJECTIONS)
    text = "\n".join([
        "# Conv1D (transposed view) vs nn.Linear twin (benchmarks/conv1d_update.py)",
        "",
        f"CPU: {platform.processor() or platform.machine()}; threads: {args.threads}; torch {torch.__version__}; "
        f"{sizes}; {args.tokens} input rows each; SRigL 90 % uniform, gamma_sal 0.3; medians of {rounds} "
        f"rounds, the two models taking turns{' (--quick: narrow layers, not a measurement)' if args.quick else ''}.",
        "",
        "| step | Conv1D (ms) | Linear twin (ms) | Conv1D / Linear |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Masks after the update steps are transposes of each other: **{'yes' if same else 'NO'}**.",
        "",
        f"Target (a Conv1D update costs at most {TARGET}x its Linear twin's): **{verdict}** ({ratio:.2f}x). "
        "What the update adds for Conv1D is copying the transposed weight, mask and dense gradient into "
        "row-major (out, fan_in) tensors and writing the new mask back transposed (column-strided "
        "copies); the top-k and drop/grow work is the same. The update runs every delta (100) steps.",
        "",
    ])
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
