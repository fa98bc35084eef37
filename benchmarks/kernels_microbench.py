"""Micro-benchmark of the constant fan-in product against dense and CSR baselines (CPU).

For a 3072 -> 768 layer (configurable) at several sparsities it times, in one process and
interleaved so that machine load hits every column alike:

* ``dense``: ``F.linear(x, W)`` with the dense weight (zeros included);
* ``csr``: ``torch.sparse.mm(W_csr, x.T)`` with ``W.to_sparse_csr()``;
* ``torch``: ``fanin_matmul(..., backend="torch")``, the pure-torch fallback (it switches from
  the gather to a dense rebuild when that is cheaper, see ``srigl.kernels.reference``);
* ``srigl``: ``fanin_matmul`` on the C++ kernel.

Each cell is the median of ``torch.utils.benchmark.Timer.blocked_autorange``; with
``--rounds R`` every cell is measured R times (columns interleaved) and the smallest median is
kept, which filters out bursts of load from other processes. Ratios are ``baseline / srigl``
(> 1 means srigl is faster). A second table times forward + backward (gradients of x and of
the weight: ``W`` for dense, ``values`` for srigl) for the training use.

With ``--bf16`` it instead times bfloat16 beside float32 on one layer (90 %, batch 1, 8, 64 by
default), columns interleaved as above: ``F.linear`` dense fp32 and bf16, ``fanin_matmul`` on the
C++ kernel in fp32 and in bf16 (the route this CPU picks, and the portable route forced, see
``srigl.kernels.cpu.bf16_route``), and the fp32 ``CondensedLinear`` module (which adds the window
layout at small batches). ``--out`` writes the table to a markdown file (``results/bf16_kernel.md``).

Usage::

    python benchmarks/kernels_microbench.py            # 80/90/95/99 %, batch 1..2048
    python benchmarks/kernels_microbench.py --quick    # 90/99 %, batch 1, 16, 256, 2048
    python benchmarks/kernels_microbench.py --bf16 --out results/bf16_kernel.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from srigl.kernels import backend_name, cpu, fanin_matmul, index_dtype_for


def make_layer(out_features: int, in_features: int, sparsity: float, seed: int = 0):
    """Random constant fan-in layer: (values, indices) sorted per row, and its dense weight."""
    k = max(1, round(in_features * (1.0 - sparsity)))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(out_features, in_features, generator=generator)
    indices = scores.topk(k, dim=1).indices.sort(dim=1).values  # (out, k)
    values = torch.randn(out_features, k, generator=generator) / math.sqrt(k)
    weight = torch.zeros(out_features, in_features).scatter_(1, indices, values)  # (out, in)
    return values, indices.to(index_dtype_for(in_features)).contiguous(), weight


def median_seconds(fn, min_run_time: float) -> float:
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def measure(columns: dict, rounds: int, min_run_time: float) -> dict:
    """Smallest median per column over `rounds` interleaved rounds; None marks a skipped column."""
    best = {name: math.inf for name, fn in columns.items() if fn is not None}
    for _ in range(rounds):
        for name, fn in columns.items():
            if fn is not None:
                best[name] = min(best[name], median_seconds(fn, min_run_time))
    return {name: best.get(name) for name in columns}


def forward_columns(x, values, indices, weight, weight_csr, max_fallback_batch):
    return {
        "dense": lambda: F.linear(x, weight),
        "csr": lambda: torch.sparse.mm(weight_csr, x.T),
        "torch": (lambda: fanin_matmul(x, values, indices, backend="torch")) if len(x) <= max_fallback_batch else None,
        "srigl": lambda: fanin_matmul(x, values, indices),
    }


def training_columns(x, values, indices, weight, weight_csr, grad_y):
    x = x.clone().requires_grad_(True)
    values = values.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)

    def dense():
        torch.autograd.grad(F.linear(x, weight), (x, weight), grad_y)

    def srigl(backend=None):
        torch.autograd.grad(fanin_matmul(x, values, indices, backend=backend), (x, values), grad_y)

    csr = weight_csr.clone().requires_grad_(True)

    def sparse():
        torch.autograd.grad(torch.sparse.mm(csr, x.T), (x, csr), grad_y.T)

    try:
        sparse()
    except (RuntimeError, NotImplementedError):  # CSR autograd support varies by torch build
        sparse = None
    return {"dense": dense, "csr": sparse, "torch": lambda: srigl("torch"), "srigl": srigl}


def fmt_time(seconds) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def fmt_ratio(numerator, denominator) -> str:
    return "n/a" if numerator is None or denominator is None else f"{numerator / denominator:.2f}x"


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}\n")
    header = ("sparsity", "k", "batch", "dense", "csr", "torch fallback", "srigl", "dense/srigl", "csr/srigl")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for sparsity, k, batch, t in rows:
        cells = (f"{sparsity:.0%}", str(k), str(batch), fmt_time(t["dense"]), fmt_time(t["csr"]),
                 fmt_time(t["torch"]), fmt_time(t["srigl"]), fmt_ratio(t["dense"], t["srigl"]),
                 fmt_ratio(t["csr"], t["srigl"]))
        print("| " + " | ".join(cells) + " |")


BF16_COLUMNS = ("dense fp32", "dense bf16", "srigl fp32", "srigl fp32 module", "srigl bf16", "srigl bf16 portable")


def bf16_columns(x, values, indices, weight):
    """Every column of the bf16 table: ``(fn, portable)``, portable None (the route does not matter),
    True or False (the bf16 route to set before timing, outside the timed call)."""
    from srigl.condensed import CondensedLinear  # only this mode needs the module

    x16, values16, weight16 = x.bfloat16(), values.bfloat16(), weight.bfloat16()
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    module = CondensedLinear.from_dense(linear, weight != 0).requires_grad_(False)
    return {
        "dense fp32": (lambda: F.linear(x, weight), None),
        "dense bf16": (lambda: F.linear(x16, weight16), None),
        "srigl fp32": (lambda: fanin_matmul(x, values, indices), None),
        "srigl fp32 module": (lambda: module(x), None),
        "srigl bf16": (lambda: fanin_matmul(x16, values16, indices), False),
        "srigl bf16 portable": (lambda: fanin_matmul(x16, values16, indices), True),
    }


def measure_bf16(columns: dict, rounds: int, min_run_time: float) -> dict:
    """:func:`measure` for :func:`bf16_columns`, switching the bf16 route between columns."""
    best = dict.fromkeys(columns, math.inf)
    with torch.no_grad():
        for _ in range(rounds):
            for name, (fn, portable) in columns.items():
                if portable is not None:
                    cpu.bf16_route(portable=portable)
                best[name] = min(best[name], median_seconds(fn, min_run_time))
    cpu.bf16_route(portable=False)
    return best


def run_bf16(args) -> None:
    """The bf16 table (see the module docstring); printed, and written to ``args.out`` if given."""
    sparsity = args.sparsities[0] if args.sparsities != [0.8, 0.9, 0.95, 0.99] else 0.9
    batches = args.batches if args.batches != [2**i for i in range(12)] else [1, 8, 64]
    values, indices, weight = make_layer(args.out_features, args.in_features, sparsity)
    k = values.shape[1]
    route = cpu.bf16_route() if backend_name("cpu", torch.bfloat16) == "cpp" else "n/a (torch fallback)"
    lines = [
        "# bf16 on the C++ CPU kernel: condensed bf16 vs condensed fp32 vs dense",
        "",
        f"Written by `benchmarks/kernels_microbench.py --bf16` on {datetime.date.today()}: "
        f"{args.in_features} -> {args.out_features}, {sparsity:.0%} sparsity (k = {k}, int16 indices), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
        f"bf16 route chosen here: `{route}`, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end "
        "(a shared machine: other processes ran during the measurement, so absolute times are noisy; the "
        f"columns are interleaved, {args.rounds} rounds, smallest median kept, so ratios are fairer than times).",
        "",
        "| batch | " + " | ".join(BF16_COLUMNS) + " | srigl fp32 / bf16 | module fp32 / srigl bf16 "
        "| dense bf16 / srigl bf16 | dense fp32 / srigl bf16 | portable / vdpbf16ps |",
        "|" + "---|" * (len(BF16_COLUMNS) + 6),
    ]
    for batch in batches:
        x = torch.randn(batch, args.in_features)
        t = measure_bf16(bf16_columns(x, values, indices, weight), args.rounds, args.min_run_time)
        cells = [fmt_time(t[name]) for name in BF16_COLUMNS]
        ratios = [fmt_ratio(t["srigl fp32"], t["srigl bf16"]), fmt_ratio(t["srigl fp32 module"], t["srigl bf16"]),
                  fmt_ratio(t["dense bf16"], t["srigl bf16"]), fmt_ratio(t["dense fp32"], t["srigl bf16"]),
                  fmt_ratio(t["srigl bf16 portable"], t["srigl bf16"])]
        lines.append(f"| {batch} | " + " | ".join(cells + ratios) + " |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "Ratios > 1: the bf16 condensed layer is faster. `srigl fp32` and `srigl bf16` are `fanin_matmul` "
        "on the same routes (gather up to batch 2, transposed tiles above); `srigl fp32 module` is the fp32 "
        "`CondensedLinear`, which runs the window layout at small batches (fp32 only). The vdpbf16ps route "
        "exists only in the gather layout (batch <= 2): above it `srigl bf16` and `srigl bf16 portable` run "
        "the same code, and their ratio shows only the noise.",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="90/99 %% sparsity, batch 1, 16, 256, 2048")
    parser.add_argument("--in-features", type=int, default=3072)
    parser.add_argument("--out-features", type=int, default=768)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--batches", type=int, nargs="+", default=[2**i for i in range(12)])
    parser.add_argument("--train-batches", type=int, nargs="+", default=[128], help="batches for forward+backward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the smallest median is kept")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per blocked_autorange")
    parser.add_argument("--max-fallback-batch", type=int, default=2048, help="skip the torch fallback above this")
    parser.add_argument("--bf16", action="store_true", help="the bf16 vs fp32 table only (90 %%, batch 1, 8, 64)")
    parser.add_argument("--out", help="with --bf16: write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sparsities, args.batches = [0.9, 0.99], [1, 16, 256, 2048]

    torch.set_num_threads(args.threads)
    if args.bf16:
        return run_bf16(args)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    backend = backend_name("cpu")
    print(f"# constant fan-in product, {args.in_features} -> {args.out_features}, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, srigl backend '{backend}'")
    if backend != "cpp":
        print(f"# C++ kernel unavailable ({cpu.load_error()}); the srigl column is the fallback")

    forward_rows, training_rows = [], []
    for sparsity in args.sparsities:
        values, indices, weight = make_layer(args.out_features, args.in_features, sparsity)
        weight_csr = weight.to_sparse_csr()
        k = values.shape[1]
        for batch in args.batches:
            x = torch.randn(batch, args.in_features)
            times = measure(forward_columns(x, values, indices, weight, weight_csr, args.max_fallback_batch),
                            args.rounds, args.min_run_time)
            forward_rows.append((sparsity, k, batch, times))
            print(f"  forward  {sparsity:.0%} batch {batch}: srigl {fmt_time(times['srigl'])}, "
                  f"dense/srigl {fmt_ratio(times['dense'], times['srigl'])}", flush=True)
        for batch in args.train_batches:
            x = torch.randn(batch, args.in_features)
            grad_y = torch.randn(batch, args.out_features)
            times = measure(training_columns(x, values, indices, weight, weight_csr, grad_y),
                            args.rounds, args.min_run_time)
            training_rows.append((sparsity, k, batch, times))
            print(f"  fwd+bwd  {sparsity:.0%} batch {batch}: srigl {fmt_time(times['srigl'])}, "
                  f"dense/srigl {fmt_ratio(times['dense'], times['srigl'])}", flush=True)

    print_table("## forward (median; ratios > 1: srigl faster)", forward_rows)
    print_table("## forward + backward (grads of x and weight/values)", training_rows)


if __name__ == "__main__":
    main()
