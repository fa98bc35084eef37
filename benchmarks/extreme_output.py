"""Extreme output layer (XMC head): compact SRigL vs a dense head, side by side in one run.

A 768 -> L head with fan-in k, Adam, batch 64, BCE-with-logits over L labels on synthetic multi-hot
targets (a few labels per row). Each configuration runs in its own subprocess so its peak RSS
(whole process, ``ru_maxrss``) is its own: ordinary step time, mask-update step time (SRigL's
``g^T x`` formed block by block, :mod:`srigl.blockwise`), and the dense head's step for the ratio.

Not yet measured here (issue #16 still open): the 670,091-label shape (it needs the meta-device
construction so the sparsifier never builds the dense layer), masked SRigL, and P@k after a fixed
budget on :mod:`srigl.app.datasets.xmc_synthetic` data.

    .venv/bin/python benchmarks/extreme_output.py [--labels 100000] [--fan-in 32] [--out results/extreme_output.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run_one(kind: str, labels: int, fan_in: int, steps: int) -> dict:
    import torch
    from torch import nn

    import srigl

    torch.set_num_threads(2)
    torch.manual_seed(0)
    features, batch = 768, 64
    head = nn.Linear(features, labels)
    model = nn.Sequential(head)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sparsifier = None
    if kind == "compact":
        sparsifier = srigl.SRigL(model, optimizer, sparsity={"0.weight": 1 - fan_in / features},
                                 total_steps=10 * steps, delta=steps, compact=True)
    x = torch.randn(batch, features)
    target = torch.zeros(batch, labels)
    target[torch.arange(batch).repeat_interleave(5), torch.randint(0, labels, (batch * 5,))] = 1.0

    def step() -> float:
        start = time.perf_counter()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), target)
        loss.backward()
        optimizer.step()
        if sparsifier is not None:
            sparsifier.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times, update = [], None
    for i in range(1, steps + 1):
        elapsed = step()
        if sparsifier is not None and sparsifier.schedule.is_update_step(i):
            update = elapsed
        elif i > 1:
            times.append(elapsed)
    return {"kind": kind, "step_s": statistics.median(times), "update_s": update,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--fan-in", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="results/extreme_output.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.labels, args.fan_in, args.steps)))
        return
    rows = {}
    for kind in ("compact", "dense"):
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--labels", str(args.labels), "--fan-in",
                              str(args.fan_in), "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[kind], flush=True)
    c, d = rows["compact"], rows["dense"]
    lines = [
        "# Extreme output layer: compact SRigL vs dense head (first measurement, issue #16 open)",
        "",
        f"768 -> {args.labels:,} labels, fan-in {args.fan_in}, Adam, batch 64, BCE over all labels, 2 threads; "
        "each column in its own process (peak RSS is the whole process). Produced by `benchmarks/extreme_output.py`.",
        "",
        "| head | ordinary step | mask-update step | peak RSS |",
        "|---|---|---|---|",
        f"| compact SRigL | {c['step_s']:.3f} s | {c['update_s']:.3f} s | {c['peak_rss_gb']:.2f} GB |",
        f"| dense | {d['step_s']:.3f} s | — | {d['peak_rss_gb']:.2f} GB |",
        "",
        f"- ordinary step: compact is {d['step_s'] / c['step_s']:.2f}x faster than the dense head (target >= 5x);",
        f"- an update step costs {c['update_s'] / c['step_s']:.1f} ordinary steps (target <= 15);",
        f"- peak RSS compact / dense: {c['peak_rss_gb'] / d['peak_rss_gb']:.2f}.",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
