"""Compact convolution training: ResNet-18 compact vs masked-dense vs dense, step time and peak memory.

ResNet-18 (the CIFAR variant of ``srigl.app.models``: 3x3 stem, no max pool) on 3x32x32 inputs at
batch 64, SGD momentum 0.9, SRigL at 90 % sparsity (uniform over the sparse layers, default policy),
``torch.set_num_threads(THREADS)``. Columns, each in its own fresh process (so its peak RSS is its
own):

* ``dense``: the plain model;
* ``masked``: ``srigl.SRigL`` (masked dense);
* ``compact``: ``srigl.SRigL(..., compact=True)``, convolutions on the automatic route (the direct
  C++ kernel of ``csrc/conv.h`` where the layer's density is at most ``DIRECT_MAX_DENSITY``);
* ``compact-scatter``: the same with every convolution forced onto the dense-scatter route (what
  compact training did before the direct kernel).

Each process builds the model, runs WARMUP steps, then times STEPS ordinary training steps
(forward + backward + ``optimizer.step`` + ``sp.step`` + ``zero_grad``; ``delta`` is larger than the
run, so no mask update falls inside) and reports the median, and the peak-RSS increase over the
whole run (``VmHWM`` minus ``VmRSS`` before the model was built). The columns run in turn,
``--repeats`` times, and the smallest median per column is kept (a shared machine's load falls
on all alike).

A second table times the direct kernel against the dense-scatter route per ResNet-18 3x3 layer
shape (forward, grad_x, grad_values), a third sweeps the density of one layer (what
``DIRECT_MAX_DENSITY`` is chosen from), and a fourth the kernel's batch-tile width (what
``kConvRowsBytes`` in ``csrc/conv.h`` is chosen from).

Writes ``results/compact_conv.md``. Usage:
``python benchmarks/compact_conv.py [--quick] [--threads 2] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Passive OpenMP waiting on a shared machine (see benchmarks/compact_training.py for why).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import srigl  # noqa: E402
from srigl.app.models import create_model  # noqa: E402
from srigl.condensed import conv_function  # noqa: E402
from srigl.kernels import cpu  # noqa: E402

BATCH = 64
SPARSITY = 0.9
IMAGE = 32
COLUMNS = ("dense", "masked", "compact", "compact-scatter")
RESULTS = Path(__file__).resolve().parent.parent / "results" / "compact_conv.md"
ANALYSIS_MARKER = "## Analysis"  # hand-written text from here on survives a rerun


def _rss(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process in bytes (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(column: str, threads: int, warmup: int, steps: int) -> None:
    """Run in a fresh process: print ``{"median_s", "cpu_s", "peak_rss", "state", "step_tensors"}`` for
    one column as JSON (``state``: bytes of parameters, buffers, gradients and optimizer state after the
    timed steps; ``step_tensors``: peak bytes of tensors a forward + backward allocates and holds)."""
    torch.set_num_threads(threads)
    cpu.available()  # build/load the kernel before the baseline
    if column == "compact-scatter":
        conv_function.DIRECT_MAX_DENSITY = -1.0  # every k > -fan_in: the dense-scatter route
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)
    y = torch.randint(0, 10, (BATCH,), generator=generator)
    baseline = _rss("VmRSS")
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=3, image_size=IMAGE, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = None
    if column != "dense":
        sp = srigl.SRigL(model, optimizer, sparsity=SPARSITY, total_steps=100_000, delta=10_000,
                         distribution="uniform", compact=column.startswith("compact"))
    times, cpu_times, tensor_peak = [], [], 0
    for i in range(warmup + steps + 1):
        if i == warmup + steps:  # one more step, under the tensor counter (slow: Python per op)
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from compact_training import LiveBytes

            with LiveBytes() as tracker:
                F.cross_entropy(model(x), y).backward()
            tensor_peak = tracker.peak
            state = sum(t.numel() * t.element_size() for t in (
                *model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None),
                *(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))))
            break
        start, cpu_start = time.perf_counter(), time.process_time()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if sp is not None:
            sp.step()
        optimizer.zero_grad()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    print(json.dumps({"median_s": statistics.median(times), "cpu_s": statistics.median(cpu_times),
                      "peak_rss": _rss("VmHWM") - baseline, "state": state, "step_tensors": tensor_peak}))


def run_column(column: str, threads: int, warmup: int, steps: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", column, "--threads", str(threads), "--warmup", str(warmup),
         "--steps", str(steps)],
        check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _layer(c: int, out: int, size: int, stride: int, density: float, seed: int = 0):
    """(x padded, values, indices, rows, dense weight) of a random constant fan-in 3x3 layer."""
    generator = torch.Generator().manual_seed(seed)
    fan_in = c * 9
    k = max(1, round(density * fan_in))
    rows = torch.arange(out)
    indices = torch.stack([torch.randperm(fan_in, generator=generator)[:k].sort().values for _ in rows]).short()
    values = torch.randn(out, k, generator=generator)
    weight = torch.zeros(out, fan_in).scatter(1, indices.long(), values).view(out, c, 3, 3)  # (out, C, 3, 3)
    x = F.pad(torch.randn(BATCH, c, size, size, generator=generator), (1, 1, 1, 1))
    return x, values, indices, rows, weight, stride


def time_tile_widths(c, out, size, stride, density) -> dict[int, float]:
    """Seconds of forward + grad_x + grad_values of the direct kernel per batch-tile width (0: automatic)."""
    x, values, indices, rows, weight, s = _layer(c, out, size, stride, density)
    conf = (out, (3, 3), (s, s), (1, 1), 1)
    grad_y = torch.randn_like(F.conv2d(x, weight, None, s))
    return {
        width: _best_of(lambda: cpu.conv_forward(x, values, indices, rows, *conf, max_tile=width))
        + _best_of(lambda: cpu.conv_backward(grad_y, x, values, indices, rows, *conf, True, False, max_tile=width))
        + _best_of(lambda: cpu.conv_backward(grad_y, x, values, indices, rows, *conf, False, True, max_tile=width))
        for width in (16, 32, 64, 0)
    }


def time_layer(c, out, size, stride, density) -> dict[str, float]:
    """Seconds of forward, grad_x, grad_values: the direct kernel and the dense-scatter route."""
    x, values, indices, rows, weight, s = _layer(c, out, size, stride, density)
    conf = (out, (3, 3), (s, s), (1, 1), 1)
    grad_y = torch.randn_like(F.conv2d(x, weight, None, s))

    def scatter_weight():
        return conv_function._dense(values, indices, rows, out, weight.shape)

    return {
        "fwd": _best_of(lambda: cpu.conv_forward(x, values, indices, rows, *conf)),
        "gx": _best_of(lambda: cpu.conv_backward(grad_y, x, values, indices, rows, *conf, True, False)),
        "gv": _best_of(lambda: cpu.conv_backward(grad_y, x, values, indices, rows, *conf, False, True)),
        "fwd_dense": _best_of(lambda: F.conv2d(x, scatter_weight(), None, s)),
        "gx_dense": _best_of(lambda: torch.nn.grad.conv2d_input(x.shape, scatter_weight(), grad_y, s, 0, 1, 1)),
        "gv_dense": _best_of(lambda: torch.nn.grad.conv2d_weight(x, weight.shape, grad_y, s, 0, 1, 1)
                             .reshape(out, -1).gather(1, indices.long())),
    }


LAYERS = [  # ResNet-18 (CIFAR) 3x3 convolutions: (in, out, input size, stride)
    (64, 64, 32, 1), (64, 128, 32, 2), (128, 128, 16, 1), (128, 256, 16, 2), (256, 256, 8, 1),
    (256, 512, 8, 2), (512, 512, 4, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one repeat (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", choices=COLUMNS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.warmup, args.steps)
        return
    if args.quick:
        args.repeats, args.warmup, args.steps = 1, 1, 2
    torch.set_num_threads(args.threads)
    if not cpu.available():
        sys.exit(f"the C++ kernel is not available: {cpu.load_error()}")

    results: dict[str, list[dict[str, float]]] = {column: [] for column in COLUMNS}
    for repeat in range(args.repeats):
        for column in COLUMNS:
            results[column].append(run_column(column, args.threads, args.warmup, args.steps))
            print(f"repeat {repeat}: {column:16s} {results[column][-1]}", flush=True)
    step = {column: min(r["median_s"] for r in runs) for column, runs in results.items()}
    cpu_step = {column: min(r["cpu_s"] for r in runs) for column, runs in results.items()}
    rss = {column: min(r["peak_rss"] for r in runs) for column, runs in results.items()}
    state = {column: runs[0]["state"] for column, runs in results.items()}  # deterministic
    step_tensors = {column: runs[0]["step_tensors"] for column, runs in results.items()}
    tensors = {column: state[column] + step_tensors[column] for column in COLUMNS}

    lines = [
        "# Compact convolution training (ResNet-18, issue #17)",
        "",
        f"Produced by `python benchmarks/compact_conv.py --threads {args.threads} --repeats {args.repeats}`"
        f"{' --quick' if args.quick else ''}; torch {torch.__version__}, {platform.machine()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads.",
        "",
        "**These figures come from a loaded shared machine** (2 cores shared with other jobs; load "
        "average above the core count during the run): treat ratios as indicative only; the lead reruns "
        "on a quiet machine.",
        "",
        f"ResNet-18 (CIFAR variant), 3x{IMAGE}x{IMAGE} inputs (ImageNet-size steps would take minutes "
        f"each on 2 cores), batch {BATCH}, SRigL {SPARSITY:.0%} uniform, SGD momentum 0.9. Each column in "
        f"its own process; step = median of {args.steps} ordinary steps after {args.warmup} warm-up "
        f"steps, best of {args.repeats} runs; peak RSS = increase over the run (model, optimizer, "
        "activations, kernel scratch).",
        "",
        "CPU time (user + system of the process, all threads) is less disturbed by other jobs than wall "
        "time on a loaded machine; both are shown.",
        "",
        "Tensor memory is counted from tensors: `state` = parameters, buffers (masks, indices), gradients "
        "and optimizer state; `step` = the peak of what one forward + backward allocates and holds "
        "(activations saved for backward, gradients in flight; the C++ kernel's own scratch is not a "
        "tensor and is not counted, peak RSS includes it).",
        "",
        "| column | step wall (s) | wall vs masked | step CPU (s) | CPU vs masked | state (MiB) | step (MiB) "
        "| tensors vs masked | peak RSS (MiB) | RSS vs masked |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for column in COLUMNS:
        lines.append(f"| {column} | {step[column]:.3f} | {step['masked'] / step[column]:.2f}x faster | "
                     f"{cpu_step[column]:.3f} | {cpu_step['masked'] / cpu_step[column]:.2f}x faster | "
                     f"{state[column] / 2**20:.0f} | {step_tensors[column] / 2**20:.0f} | "
                     f"{tensors[column] / tensors['masked']:.2f}x | "
                     f"{rss[column] / 2**20:.0f} | {rss[column] / rss['masked']:.2f}x |")
    lines += [
        "",
        f"Targets (issue #17): compact >= 1.3x faster than masked ({step['masked'] / step['compact']:.2f}x "
        f"wall, {cpu_step['masked'] / cpu_step['compact']:.2f}x CPU measured) and <= 0.5x its training "
        f"memory ({tensors['compact'] / tensors['masked']:.2f}x counted from tensors, "
        f"{rss['compact'] / rss['masked']:.2f}x peak RSS).",
        "",
        f"## Per layer: direct kernel vs dense scatter + oneDNN conv, batch {BATCH}, {SPARSITY:.0%}",
        "",
        "Best of 5 calls, ms. `dense` = scatter the values into the dense weight and run the dense op "
        "(`F.conv2d`, `conv2d_input`, `conv2d_weight` + gather): the `compact-scatter` route.",
        "",
        "| layer (in, out, size, stride) | fwd direct | fwd dense | grad_x direct | grad_x dense | "
        "grad_values direct | grad_values dense | total ratio dense/direct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, out, size, s in LAYERS:
        t = time_layer(c, out, size, s, 1 - SPARSITY)
        direct = t["fwd"] + t["gx"] + t["gv"]
        dense = t["fwd_dense"] + t["gx_dense"] + t["gv_dense"]
        lines.append(f"| {c}, {out}, {size}, {s} | {t['fwd'] * 1e3:.1f} | {t['fwd_dense'] * 1e3:.1f} | "
                     f"{t['gx'] * 1e3:.1f} | {t['gx_dense'] * 1e3:.1f} | {t['gv'] * 1e3:.1f} | "
                     f"{t['gv_dense'] * 1e3:.1f} | {dense / direct:.2f}x |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "## Density sweep (layer 128, 128, 16, 1): where the dense route starts to win",
        "",
        "| density k / fan_in | direct fwd+bwd (ms) | dense fwd+bwd (ms) | ratio dense/direct |",
        "|---|---|---|---|",
    ]
    for density in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5):
        t = time_layer(128, 128, 16, 1, density)
        direct = t["fwd"] + t["gx"] + t["gv"]
        dense = t["fwd_dense"] + t["gx_dense"] + t["gv_dense"]
        lines.append(f"| {density:.2f} | {direct * 1e3:.1f} | {dense * 1e3:.1f} | {dense / direct:.2f}x |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "## Batch-tile width of the direct kernel (fwd + grad_x + grad_values, ms)",
        "",
        "`max_tile` = batch entries per transposed tile; `auto` is what `kConvRowsBytes` (csrc/conv.h) picks.",
        "",
        "| layer (in, out, size, stride) | 16 | 32 | 64 | auto |",
        "|---|---|---|---|---|",
    ]
    for c, out, size, s in LAYERS[::2]:
        t = time_tile_widths(c, out, size, s, 1 - SPARSITY)
        lines.append(f"| {c}, {out}, {size}, {s} | " + " | ".join(f"{t[w] * 1e3:.1f}" for w in (16, 32, 64, 0)) + " |")
        print(lines[-1], flush=True)
    lines += [
        "",
        f"`DIRECT_MAX_DENSITY` is {conv_function.DIRECT_MAX_DENSITY} (srigl/condensed/conv_function.py).",
        "",
    ]
    text = "\n".join(lines)
    previous = RESULTS.read_text() if RESULTS.exists() else ""
    if ANALYSIS_MARKER in previous:
        text += "\n" + previous[previous.index(ANALYSIS_MARKER):]
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
