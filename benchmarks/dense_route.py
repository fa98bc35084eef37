"""Where the dense inference route pays: kernel routes vs a GEMM over the densified active rows.

A condensed linear layer at inference runs on srigl's fan-in kernels (window layout, gather or
tiled, by batch) or, where :func:`srigl.kernels.dense_route.dense_route_pays` says so, as a GEMM over
its active rows densified for the call (:func:`srigl.kernels.dense_route.dense_route`). This script
times both routes side by side, interleaved, for layer shapes that neuron ablation leaves behind
(few active rows, each reading a large share of the inputs) across batch sizes, densities
(fan-in / in_features) and dtypes, and prints each cell's ratio ``kernel time / dense-route time``
(above 1: the dense route is faster), with ``*`` on the cells the :data:`DENSE_ROUTE` rule sends to
the dense route. The summary counts the cells where the rule picks the slower route and the worst
such loss, which is what the bounds in ``DENSE_ROUTE`` should keep small.

Usage::

    python benchmarks/dense_route.py --out results/dense_route.md
    python benchmarks/dense_route.py --quick   # a small grid, for the smoke test
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from srigl.kernels import dense_route as routes
from srigl.kernels.dense_route import dense_route, dense_route_pays
from srigl.kernels.inference import WindowCache, condensed_linear_inference

# (in_features, active rows): ViT-B/16-like widths (768 in, 3072 in) at few and many active rows.
SHAPES = ((768, 400), (768, 2000), (3072, 200))
BATCHES = (32, 64, 128, 197, 512)
DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUICK = dict(shapes=((64, 24),), batches=(16, 128), densities=(0.2, 1.0), dtypes=("fp32",))


def _layer(n_active: int, in_features: int, k: int, dtype: torch.dtype, generator: torch.Generator):
    indices = torch.rand(n_active, in_features, generator=generator).topk(k, dim=1).indices.sort(dim=1).values
    return torch.randn(n_active, k, generator=generator).to(dtype), indices.to(torch.int16)


def _median_ms(fn, repeats: int, min_sample_s: float) -> float:
    """Median over ``repeats`` samples; each sample loops ``fn`` for at least ``min_sample_s``."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_sample_s:
        fn()
        calls += 1
    per_sample = max(1, calls)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_sample):
            fn()
        samples.append((time.perf_counter() - start) * 1e3 / per_sample)
    return statistics.median(samples)


def measure(in_features: int, n_active: int, batch: int, density: float, dtype: torch.dtype,
            repeats: int, min_sample_s: float) -> dict:
    """One cell: both routes on the same layer and input, timed in alternation."""
    generator = torch.Generator().manual_seed(in_features * 7919 + n_active)
    k = max(1, math.ceil(density * in_features - 1e-9))  # at least the density named: the rule's bounds are >=
    values, indices = _layer(n_active, in_features, k, dtype, generator)
    x = torch.randn(batch, in_features, generator=generator).to(dtype)
    windows = WindowCache()
    saved = dict(routes.DENSE_ROUTE)

    def kernel():  # the route the layer takes with the dense route switched off
        routes.DENSE_ROUTE.clear()
        try:
            return condensed_linear_inference(x, values, indices, None, None, in_features, n_active, windows)
        finally:
            routes.DENSE_ROUTE.update(saved)

    def dense():
        return dense_route(x, values, indices, None, None, in_features, n_active)

    with torch.no_grad():
        error = (kernel().double() - dense().double()).abs().max().item()
        tolerance = 1e-3 if dtype is torch.float32 else 0.5
        if error > tolerance * max(1.0, density * in_features) ** 0.5:
            raise AssertionError(f"routes disagree by {error:.3g} at {in_features}x{n_active} batch {batch}")
        kernel_ms, dense_ms = [], []
        for _ in range(2):  # interleaved: machine noise hits both columns alike
            kernel_ms.append(_median_ms(kernel, repeats, min_sample_s))
            dense_ms.append(_median_ms(dense, repeats, min_sample_s))
    return {"kernel_ms": min(kernel_ms), "dense_ms": min(dense_ms),
            "chosen": dense_route_pays(batch, k, in_features, dtype), "k": k}


def render(cells: dict, args, elapsed_s: float) -> str:
    lines = [
        "# Dense inference route vs the fan-in kernels (condensed linear, no autograd)",
        "",
        f"`benchmarks/dense_route.py`; torch {torch.__version__}, {args.threads} threads, {platform.machine()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed_s / 60:.1f} min.",
        "",
        "Each cell: kernel-route time ÷ dense-route time for one layer (above 1: the GEMM over the densified "
        "rows is faster), both routes timed in alternation on the same input; the kernel route is what "
        "the layer runs with the dense route off (window layout, gather or tiled by batch). `*`: the "
        "`DENSE_ROUTE` rule takes the dense route there. Density = fan-in / in_features of the active rows.",
        "",
    ]
    wrong, worst = 0, (1.0, None)
    total = 0
    for (dtype_name, in_features, n_active), grid in cells.items():
        batches = sorted({b for b, _ in grid})
        densities = sorted({d for _, d in grid})
        lines += [f"## {dtype_name}, {in_features} inputs, {n_active} active rows", "",
                  "| density | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for d in densities:
            row = []
            for b in batches:
                cell = grid[b, d]
                ratio = cell["kernel_ms"] / cell["dense_ms"]
                total += 1
                # The rule's pick is the slower one: dense chosen but slower, or not chosen but faster.
                loss = 1 / ratio if cell["chosen"] else ratio
                if loss > 1.1:
                    wrong += 1
                if loss > worst[0]:
                    worst = (loss, f"{dtype_name} {in_features}x{n_active} batch {b} density {d}")
                row.append(f"{ratio:.2f}{'*' if cell['chosen'] else ''}")
            lines.append(f"| {d:.2f} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Summary", "",
              f"- {wrong} of {total} cells where the rule's route is more than 10 % slower than the other.",
              f"- Worst pick: {worst[0]:.2f}× slower than the other route"
              + (f" ({worst[1]})." if worst[1] else " (none slower).")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a small grid (smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = QUICK if args.quick else dict(shapes=SHAPES, batches=BATCHES, densities=DENSITIES, dtypes=tuple(DTYPES))
    min_sample_s = 0.005 if args.quick else 0.05
    start = time.perf_counter()
    cells: dict = {}
    for dtype_name in grid["dtypes"]:
        for in_features, n_active in grid["shapes"]:
            table = cells.setdefault((dtype_name, in_features, n_active), {})
            for batch in grid["batches"]:
                for density in grid["densities"]:
                    table[batch, density] = measure(in_features, n_active, batch, density, DTYPES[dtype_name],
                                                    args.repeats if not args.quick else 2, min_sample_s)
    text = render(cells, args, time.perf_counter() - start)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
