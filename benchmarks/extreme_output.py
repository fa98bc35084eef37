"""Extreme output layer (XMC head): compact SRigL vs masked SRigL vs a dense head, side by side.

Part 1, speed and memory: a 768 -> L head (Amazon-670K's L = 670,091 by default) with fan-in k,
Adam, batch 64, BCE-with-logits over all L labels against Zipf-distributed multi-hot targets from
:mod:`srigl.app.datasets.xmc_synthetic` (CSR, :func:`bce_with_logits_csr`: no dense target). The
compact head is built on the ``meta`` device, so the sparsifier never allocates the dense layer.
Each configuration runs in its own subprocess, so its peak RSS (whole process, ``ru_maxrss``) is
its own: ordinary step time (median), the mask-update step, and peak RSS through both.

Part 2, quality at equal budget: a feature MLP (F sparse BoW features -> 768, ReLU) with the
sparse head, trained for a fixed number of steps on synthetic data with SRigL's gradient growth
and with SET's random growth (same seed, same data order, compact storage), then P@1/3/5 and
nDCG@1/3/5 on held-out points. The head is the output layer, so it is never ablated: SRigL on it
is constant fan-in RigL.

    .venv/bin/python benchmarks/extreme_output.py                       # the full run (minutes)
    .venv/bin/python benchmarks/extreme_output.py --quick --out /tmp/x.md  # seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

FEATURES, BATCH = 768, 64


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux counts kB


def _head(kind: str, labels: int, fan_in: int, total_steps: int, delta: int, method: str = "srigl", prefix=()):
    """``(model, optimizer, sparsifier)``: ``prefix`` modules, then the 768 -> ``labels`` head."""
    import torch
    from torch import nn

    import srigl

    device = "meta" if kind == "compact" else None  # compact starts as values + indices only
    model = nn.Sequential(*prefix, nn.Linear(FEATURES, labels, device=device))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    head = f"{len(prefix)}.weight"
    sparsity = {name: 0.0 for name, p in model.named_parameters() if name.endswith("weight") and name != head}
    sparsity[head] = 1 - fan_in / FEATURES
    sparsifier = None
    if kind != "dense":
        cls = srigl.SET if method == "set" else srigl.SRigL
        extra = {} if method == "set" else {"gamma_sal": 0.3}
        sparsifier = cls(model, optimizer, sparsity=sparsity, total_steps=total_steps, delta=delta,
                         structure=srigl.ConstantFanIn(), compact=kind == "compact", seed=0, **extra)
    return model, optimizer, sparsifier


def run_speed(kind: str, labels: int, fan_in: int, steps: int) -> dict:
    """Median ordinary step, the update step and peak RSS of one head configuration."""
    import torch

    from srigl.app.datasets.xmc_batches import bce_with_logits_csr, iterate_batches
    from srigl.app.datasets.xmc_synthetic import make_synthetic_xmc

    torch.set_num_threads(2)
    torch.manual_seed(0)
    delta = steps // 2 + 1  # one update, in the middle of the run
    start = time.perf_counter()
    model, optimizer, sparsifier = _head(kind, labels, fan_in, total_steps=4 * steps, delta=delta)
    build_s = time.perf_counter() - start
    build_gb = _peak_gb()
    data = make_synthetic_xmc(BATCH, 64, labels, seed=1)
    batch = next(iterate_batches(data, BATCH, shuffle=False))
    x = torch.randn(BATCH, FEATURES)
    times, update = [], None
    for i in range(1, steps + 1):
        start = time.perf_counter()
        loss = bce_with_logits_csr(model(x), batch.labels)
        loss.backward()
        optimizer.step()
        if sparsifier is not None:
            sparsifier.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if sparsifier is not None and sparsifier.schedule.is_update_step(i):
            update = elapsed
        elif i > 1:  # the first step pays one-time costs (kernel load, allocator growth)
            times.append(elapsed)
    return {"kind": kind, "fan_in": fan_in, "build_s": build_s, "build_gb": build_gb,
            "step_s": statistics.median(times), "update_s": update, "peak_gb": _peak_gb()}


def run_quality(method: str, labels: int, fan_in: int, steps: int, n_features: int, n_test: int) -> dict:
    """P@k / nDCG@k after ``steps`` steps of a feature MLP + sparse head grown by ``method``."""
    import torch
    from torch import nn

    from srigl.app.datasets.xmc_batches import bce_with_logits_csr, iterate_batches
    from srigl.app.datasets.xmc_synthetic import make_synthetic_xmc
    from srigl.app.xmc_metrics import xmc_metrics

    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = make_synthetic_xmc(steps * BATCH + n_test, n_features, labels, zipf_exponent=0.8, seed=2)
    train_ids, test_ids = torch.arange(steps * BATCH), torch.arange(steps * BATCH, len(data))
    from srigl.app.datasets.xmc import XMCDataset, take_rows

    train = XMCDataset(take_rows(data.features, train_ids), take_rows(data.labels, train_ids))
    test = XMCDataset(take_rows(data.features, test_ids), take_rows(data.labels, test_ids))
    prefix = (nn.Linear(n_features, FEATURES), nn.ReLU())
    model, optimizer, sparsifier = _head("compact", labels, fan_in, total_steps=steps, delta=max(steps // 8, 1),
                                         method=method, prefix=prefix)
    start = time.perf_counter()
    for batch in iterate_batches(train, BATCH, seed=0):
        loss = bce_with_logits_csr(model(batch.features), batch.labels)
        loss.backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    totals: dict[str, float] = {}
    with torch.no_grad():
        for batch in iterate_batches(test, 256, shuffle=False):
            got = xmc_metrics(model(batch.features), batch.labels.indptr, batch.labels.indices, labels)
            for name, value in got.items():
                totals[name] = totals.get(name, 0.0) + value * batch.row_ids.numel()
    return {"method": method, "train_s": train_s, "peak_gb": _peak_gb(), **{k: v / len(test) for k, v in totals.items()}}


def _sub(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_lines(labels: int, fan_in: int) -> list[str]:
    gb = 1e9
    values = labels * fan_in * 4
    return [
        f"Where the memory of the compact head goes at L = {labels:,}, k = {fan_in} (fp32, int16 indices, batch {BATCH}):",
        "",
        f"- values {values / gb:.2f} GB, indices {labels * fan_in * 2 / gb:.2f} GB, the values' gradient "
        f"{values / gb:.2f} GB, Adam's two moments {2 * values / gb:.2f} GB; the dense bias with its gradient and "
        f"moments {4 * labels * 4 / gb:.3f} GB;",
        f"- the logits: {BATCH * labels * 4 / gb:.2f} GB each for the logits, their gradient and the loss's "
        "softplus temporary (a dense (B, L) float32 each); on the step before an update the head's output "
        f"gradient ({BATCH * labels * 4 / gb:.2f} GB) is kept to form g^T x block by block;",
        "- the update's own extra: one block of grow scores (srigl.blockwise.BLOCK_ELEMENTS = 4M entries, a few "
        "16 MB tensors), plus per-entry tensors of the layout (drop scores, keep flags, new indices and "
        f"source positions, about {labels * fan_in * 25 / gb:.2f} GB at 25 bytes an entry);",
        "- the labels are CSR (bce_with_logits_csr), never a dense (B, L) target.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, default=670_091)
    parser.add_argument("--fan-ins", default="32,64,128")
    parser.add_argument("--steps", type=int, default=8, help="steps per speed configuration (one is an update)")
    parser.add_argument("--masked", default="32", help="fan-ins to run masked SRigL at ('' for none)")
    parser.add_argument("--quality-steps", type=int, default=300)
    parser.add_argument("--quality-features", type=int, default=10_000)
    parser.add_argument("--quality-test", type=int, default=2000)
    parser.add_argument("--no-quality", action="store_true", help="speed and memory only (part 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): the CI smoke test")
    parser.add_argument("--out", default="results/extreme_output.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--fan-in", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.labels, args.fan_ins, args.steps, args.masked = 3000, "32", 4, "32"
        args.quality_steps, args.quality_features, args.quality_test = 12, 500, 128
    if args.one:
        kind, _, method = args.one.partition(":")
        if kind == "quality":
            result = run_quality(method, args.labels, args.fan_in, args.quality_steps, args.quality_features,
                                 args.quality_test)
        else:
            result = run_speed(kind, args.labels, args.fan_in, args.steps)
        print(json.dumps(result))
        return

    common = ["--labels", str(args.labels), "--steps", str(args.steps), "--quality-steps", str(args.quality_steps),
              "--quality-features", str(args.quality_features), "--quality-test", str(args.quality_test)]
    fan_ins = [int(f) for f in args.fan_ins.split(",") if f]
    masked = [int(f) for f in args.masked.split(",") if f]
    speed = {("dense", fan_ins[0]): _sub(["--one", "dense", "--fan-in", str(fan_ins[0]), *common])}
    print(speed, flush=True)
    for k in fan_ins:
        for kind in ("compact", "masked") if k in masked else ("compact",):
            speed[(kind, k)] = _sub(["--one", kind, "--fan-in", str(k), *common])
            print(kind, k, speed[(kind, k)], flush=True)
    quality = {} if args.no_quality else {
        m: _sub(["--one", f"quality:{m}", "--fan-in", str(fan_ins[0]), *common]) for m in ("srigl", "set")
    }
    print(quality, flush=True)
    write_report(args, fan_ins, speed, quality)


def write_report(args, fan_ins: list[int], speed: dict, quality: dict) -> None:
    dense = speed[("dense", fan_ins[0])]
    lines = [
        "# Extreme output layer: compact SRigL vs masked SRigL vs a dense head",
        "",
        f"768 -> {args.labels:,} labels, Adam, batch {BATCH}, BCE over all labels (CSR targets, Zipf label "
        "frequencies), 2 threads, this machine; every configuration in its own process (peak RSS is the whole "
        "process, construction included). The compact head is built on the meta device. Produced by "
        f"`benchmarks/extreme_output.py{' --quick' if args.quick else ''}`.",
        "",
        "| head | fan-in | build | ordinary step | update step | update / ordinary | dense step / ordinary | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, spec, unit=""):
        return "—" if value is None else f"{value:{spec}}{unit}"

    for (kind, k), row in speed.items():
        if "error" in row:
            lines.append(f"| {kind} | {k} | failed: {row['error']} | | | | | |")
            continue
        ratio = row["update_s"] / row["step_s"] if row["update_s"] else None
        vs_dense = dense["step_s"] / row["step_s"] if "step_s" in dense else None
        lines.append(
            f"| {kind} | {'—' if kind == 'dense' else k} | {row['build_s']:.1f} s, {row['build_gb']:.2f} GB | "
            f"{row['step_s']:.3f} s | {fmt(row['update_s'], '.2f', ' s')} | {fmt(ratio, '.1f')} | "
            f"{fmt(vs_dense, '.2f', 'x')} | {row['peak_gb']:.2f} GB |"
        )
    lines += ["", "Targets at fan-in 32: peak RSS <= 2 GB through ordinary and update steps; an update step <= 15 "
              "ordinary steps; the ordinary step >= 5x faster than the dense head.", ""]
    c = speed.get(("compact", fan_ins[0]), {})
    if "step_s" in c:
        checks = [
            (c["peak_gb"] <= 2.0, f"peak RSS {c['peak_gb']:.2f} GB (target <= 2)"),
            (c["update_s"] / c["step_s"] <= 15, f"update = {c['update_s'] / c['step_s']:.1f} ordinary steps (target <= 15)"),
        ]
        if "step_s" in dense:
            checks.append((dense["step_s"] / c["step_s"] >= 5,
                           f"ordinary step {dense['step_s'] / c['step_s']:.1f}x faster than dense (target >= 5)"))
        lines += [f"- {'met' if ok else 'MISSED'}: {text}" for ok, text in checks]
    lines += ["", *_memory_lines(args.labels, fan_ins[0]), ""]
    if not quality:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    lines += [
        f"## P@k at equal budget: gradient growth (SRigL) vs random growth (SET), fan-in {fan_ins[0]}",
        "",
        f"Feature MLP ({args.quality_features:,} sparse BoW features -> 768, ReLU) + compact head, "
        f"{args.quality_steps} steps of batch {BATCH} (each point seen once), mask update every "
        f"{max(args.quality_steps // 8, 1)} steps until 75 % of the run, same seed and data order; "
        f"{args.quality_test:,} held-out points of the same synthetic distribution (Zipf exponent 0.8).",
        "",
        "| growth | P@1 | P@3 | P@5 | nDCG@3 | nDCG@5 | train time | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in quality.items():
        if "error" in row:
            lines.append(f"| {method} | failed: {row['error']} | | | | | | |")
            continue
        lines.append(
            f"| {method} | {100 * row['P@1']:.2f} | {100 * row['P@3']:.2f} | {100 * row['P@5']:.2f} | "
            f"{100 * row['nDCG@3']:.2f} | {100 * row['nDCG@5']:.2f} | {row['train_s']:.0f} s | {row['peak_gb']:.2f} GB |"
        )
    s, r = quality.get("srigl", {}), quality.get("set", {})
    if "P@1" in s and "P@1" in r:
        mean = {m: sum(q[f"P@{k}"] for k in (1, 3, 5)) / 3 for m, q in (("srigl", s), ("set", r))}
        better = mean["srigl"] > mean["set"]
        lines += ["", f"- {'met' if better else 'MISSED'}: gradient growth "
                  f"{'beats' if better else 'does not beat'} random growth on mean P@1/3/5 "
                  f"({100 * mean['srigl']:.2f} vs {100 * mean['set']:.2f})."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
