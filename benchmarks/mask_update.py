"""Cost of srigl's mask updates relative to a training step, measured side by side in one run.

For each model at 90 % ERK sparsity (SRigL with ablation, and RigL) this prints:

* the mean dense training step (no sparsifier) and the mean masked training step (gradient and
  weight re-masking hooks active, no update),
* the extra cost of the step that collects dense gradients, and of one mask update,
* the update overhead amortised over ``delta = 100`` steps, as a fraction of a masked step.

Every update step costs the same whatever ``delta`` is, so the script runs with ``delta = 4`` (three
plain steps, then an update) and amortises over 100 analytically. Writes ``results/mask_update.md``.

Usage: ``python benchmarks/mask_update.py [--quick] [--threads 2] [--batch 64]``
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import srigl
from srigl.app.models import create_model

MODELS = {
    # name: (model kwargs, input shape (C, H, W))
    "mlp": ({}, (1, 28, 28)),
    "resnet18": ({}, (3, 32, 32)),
    "vit-tiny": ({}, (3, 32, 32)),
}
DELTA = 100


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, algorithm: type, batch: int, rounds: int) -> dict[str, float]:
    kwargs, (c, h, w) = MODELS[name]
    torch.manual_seed(0)
    base = create_model(name, in_channels=c, image_size=h, num_classes=10, **kwargs)
    x = torch.randn(batch, c, h, w)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    dense = copy.deepcopy(base)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)

    def dense_step():
        loss_fn(dense(x), y).backward()
        dense_opt.step()
        dense_opt.zero_grad()

    sparse = copy.deepcopy(base)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9)
    # delta = 4: steps 1-3 are plain, step 4 collects dense gradients and updates the masks.
    sp = algorithm(sparse, opt, sparsity=0.9, total_steps=1_000_000, delta=4)

    def forward_backward_opt():
        loss_fn(sparse(x), y).backward()
        opt.step()

    dense_step()  # warm-up (allocator, kernels)
    forward_backward_opt()
    sp.step()
    opt.zero_grad()
    for _ in range(2):  # reach the start of a 4-step cycle (steps 2, 3 plain; step 4 is an update)
        forward_backward_opt()
        sp.step()
        opt.zero_grad()
    forward_backward_opt()
    sp.step()
    opt.zero_grad()

    dense_times, plain_times, collect_times, update_times = [], [], [], []
    for _ in range(rounds):
        for _ in range(3):
            dense_times.append(_timed(dense_step))
            plain_times.append(_timed(lambda: (forward_backward_opt(), sp.step(), opt.zero_grad())))
        collect_times.append(_timed(forward_backward_opt))  # backward also clones dense gradients
        update_times.append(_timed(sp.step))
        opt.zero_grad()
        assert sp.last_update.get("step") == sp.step_count, "the timed step was not an update step"
    dense_t = statistics.median(dense_times)
    plain_t = statistics.median(plain_times)
    collect_extra = max(statistics.median(collect_times) - plain_t, 0.0)
    update_t = statistics.median(update_times)
    amortised = (update_t + collect_extra) / DELTA
    return {
        "dense_step": dense_t,
        "masked_step": plain_t,
        "collect_extra": collect_extra,
        "update": update_t,
        "amortised": amortised,
        "overhead_ratio": amortised / plain_t,
        "hook_ratio": plain_t / dense_t,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round, mlp only")
    parser.add_argument("--out", type=Path, default=Path("results/mask_update.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["mlp"] if args.quick else list(MODELS)
    rounds = 1 if args.quick else args.rounds
    rows = []
    header = (
        f"{'model':10} {'method':6} {'dense step':>11} {'masked step':>12} {'hooks/dense':>12} "
        f"{'collect+':>9} {'update':>9} {'amortised/100':>14} {'overhead':>9}"
    )
    print(header)
    for name in names:
        for algorithm in (srigl.SRigL, srigl.RigL):
            r = measure(name, algorithm, args.batch, rounds)
            rows.append((name, algorithm.name, r))
            print(
                f"{name:10} {algorithm.name:6} {r['dense_step'] * 1e3:9.2f}ms {r['masked_step'] * 1e3:10.2f}ms "
                f"{r['hook_ratio']:11.3f}x {r['collect_extra'] * 1e3:7.2f}ms {r['update'] * 1e3:7.2f}ms "
                f"{r['amortised'] * 1e3:12.3f}ms {r['overhead_ratio'] * 100:8.3f}%"
            )
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [
        "# Mask-update overhead (benchmarks/mask_update.py)",
        "",
        f"CPU: {cpu}; threads: {args.threads}; torch {torch.__version__}; batch {args.batch}; 90 % ERK; "
        f"SGD momentum; medians of {rounds * 3} plain steps and {rounds} updates, all measured in one run.",
        "",
        "| model | method | dense step (ms) | masked step (ms) | masked / dense | dense-grad collection extra (ms) "
        "| one mask update (ms) | update cost per step at ΔT=100 (ms) | overhead vs masked step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, method, r in rows:
        lines.append(
            f"| {name} | {method} | {r['dense_step'] * 1e3:.2f} | {r['masked_step'] * 1e3:.2f} | "
            f"{r['hook_ratio']:.3f}× | {r['collect_extra'] * 1e3:.2f} | {r['update'] * 1e3:.2f} | "
            f"{r['amortised'] * 1e3:.3f} | {r['overhead_ratio'] * 100:.3f} % |"
        )
    resnet = [r for name, method, r in rows if name == "resnet18" and method == "srigl"]
    if resnet:
        verdict = "met" if resnet[0]["overhead_ratio"] <= 0.02 else "NOT met"
        lines += ["", f"Target (update overhead ≤ 2 % of step time, ResNet-18, SRigL): **{verdict}** "
                  f"({resnet[0]['overhead_ratio'] * 100:.3f} %)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
