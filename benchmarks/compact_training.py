"""Compact vs masked-dense vs dense training: step time and training memory, side by side.

For ``mlp`` (784-300-100-10 on 1x28x28) and ``vit-tiny`` (3x32x32) at 90 % and 99 % ERK sparsity
(SRigL, gamma_sal 0.3, SGD momentum 0.9, batch 128, ``torch.set_num_threads(2)``), this measures

* the training step (forward + backward + ``optimizer.step`` + ``sp.step`` + ``zero_grad``) of the
  dense model, the masked-dense engine (``srigl.SRigL``) and the compact engine
  (``srigl.SRigL(..., compact=True)``); engines take turns step by step so that the load of a
  shared machine falls on all of them alike, and the median step is reported;
* the update step (dense-gradient collection + drop/grow), measured with ``delta = 4``; the cost of a
  step is the same whatever ``delta`` is, so it is amortised over ``delta = 100`` analytically:
  ``(99 * step + update_step) / 100``;
* training memory counted from tensors: parameters, buffers (masks, indices), gradients (measured
  after backward) and optimizer state, plus what the sparsifier holds on the step of an update
  (masked dense: a dense gradient per sparse tensor; compact: each layer's input and output
  gradient, and one layer's dense transients at a time);
* the peak-RSS increase of a fresh process building the model and training 30 steps (activations
  included), per engine.

Writes ``results/compact_training.md``. Usage:
``python benchmarks/compact_training.py [--quick] [--threads 2] [--rounds 30] [--block 1] [--no-rss] [--no-profile]``
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
import weakref
from pathlib import Path

# On a shared machine, OpenMP threads that spin-wait at barriers (the default) steal the cores other
# processes need and every 2-thread kernel then stalls for whole scheduler slices (we measured 1.5 ms
# matmuls taking 90 ms). Passive waiting must be chosen before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import srigl  # noqa: E402
from srigl.app.models import create_model  # noqa: E402

# name: (channels, image size, sparsity policy). ERK cannot make vit-tiny 99 % sparse with its 48-input
# patch embedding sparse (one weight per neuron is already 2 %), so it stays dense at every sparsity.
MODELS = {
    "mlp": (1, 28, srigl.SparsityPolicy()),
    "vit-tiny": (3, 32, srigl.SparsityPolicy(dense_first=True)),
}
ENGINES = ("dense", "masked", "compact")
BATCH = 128
DELTA = 100
UPDATE_ROUNDS = 6  # rounds that also time one update step per sparse engine
ANALYSIS_MARKER = "## Analysis"


def build(model_name: str, engine: str, sparsity: float, delta: int, total_steps: int = 10_000):
    """A seeded model, its SGD optimizer and (for sparse engines) its SRigL sparsifier."""
    channels, size, policy = MODELS[model_name]
    torch.manual_seed(0)
    model = create_model(model_name, in_channels=channels, image_size=size, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = None
    if engine != "dense":
        sp = srigl.SRigL(model, optimizer, sparsity=sparsity, total_steps=total_steps, delta=delta,
                         gamma_sal=0.3, policy=policy, compact=engine == "compact")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, channels, size, size, generator=generator)
    y = torch.randint(0, 10, (BATCH,), generator=generator)
    return model, optimizer, sp, x, y


def step(model, optimizer, sp, x, y) -> None:
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    if sp is not None:
        sp.step()
    optimizer.zero_grad()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated under it and still alive, over its ``with`` block.

    Every storage an operator returns is counted once, until the last tensor seen holding it dies;
    what existed before the block is not counted.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.holders: dict[int, int] = {}  # storage address -> tensors seen holding it

    def _release(self, key: int, nbytes: int) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                storage = tensor.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key not in self.holders:
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.holders[key] = self.holders.get(key, 0) + 1
                weakref.finalize(tensor, self._release, key, nbytes)
        return out


def training_memory(model_name: str, engine: str, sparsity: float) -> dict[str, int]:
    """Bytes of parameters, buffers, gradients and optimizer state, and what an update step adds."""
    model, optimizer, sp, x, y = build(model_name, engine, sparsity, delta=2)
    step(model, optimizer, sp, x, y)  # optimizer state exists from the first step on
    nn.functional.cross_entropy(model(x), y).backward()  # step 2: an update step for the sparse engines
    memory = {
        "params": _bytes(model.parameters()),
        "buffers": _bytes(model.buffers()),
        "grads": _bytes(p.grad for p in model.parameters()),
        "optimizer": _bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    memory["total"] = sum(memory.values())
    memory["update_extra"] = 0
    if sp is not None:
        # Held from the backward of an update step until the update: the masked engine's dense
        # gradient per sparse tensor; the compact engine's per-layer input and output gradient, or
        # the dense gradient they form, whichever is smaller. Then the peak of what the update
        # itself allocates (scores, top-k, the compact engine's one-layer dense views and remaps).
        held = _bytes(sp.held_tensors())
        optimizer.step()
        with LiveBytes() as tracker:
            sp.step()
        assert sp.last_update.get("step") == 2, "the measured sp.step() must update the masks"
        memory["update_extra"] = held + tracker.peak
    optimizer.zero_grad()
    return memory


def time_engines(model_name: str, sparsity: float, rounds: int, block: int) -> dict[str, dict[str, float]]:
    """Median step and update-step seconds of every engine, measured in interleaved rounds so that a
    shared machine's load falls on all engines alike."""
    setups = {engine: build(model_name, engine, sparsity, delta=10**9) for engine in ENGINES}
    update_setups = {engine: build(model_name, engine, sparsity, delta=4) for engine in ENGINES[1:]}
    for setup in [*setups.values(), *update_setups.values()]:  # warm-up (kernel build, allocator)
        for _ in range(2):
            step(*setup)
    steps: dict[str, list[float]] = {engine: [] for engine in ENGINES}
    updates: dict[str, list[float]] = {engine: [] for engine in ENGINES[1:]}
    for round_ in range(rounds):
        for engine in ENGINES:
            for _ in range(block):
                start = time.perf_counter()
                step(*setups[engine])
                steps[engine].append(time.perf_counter() - start)
        if round_ >= UPDATE_ROUNDS:
            continue
        for engine in ENGINES[1:]:
            model, optimizer, sp, x, y = update_setups[engine]
            while not sp.schedule.is_update_step(sp.step_count + 1):
                step(model, optimizer, sp, x, y)
            start = time.perf_counter()
            step(model, optimizer, sp, x, y)
            updates[engine].append(time.perf_counter() - start)
            assert sp.last_update.get("step") == sp.step_count, "the timed step must be an update step"
    result = {}
    for engine in ENGINES:
        median = statistics.median(steps[engine])
        update = statistics.median(updates[engine]) if engine in updates else median
        result[engine] = {"step": median, "update_step": update, "amortised": ((DELTA - 1) * median + update) / DELTA}
    return result


# Operator name -> what it is, for the profile of one step (first match wins).
CATEGORIES = (
    ("fan-in product (srigl kernel)", ("srigl_fanin::",)),
    ("dense matmul / conv", ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution",
                             "aten::convolution_backward")),
    ("attention core (SDPA)", ("aten::_scaled_dot_product",)),
    ("GELU + LayerNorm", ("aten::gelu", "aten::native_layer_norm")),
    ("copies, fills, masking, elementwise", ("aten::copy_", "aten::fill_", "aten::mul", "aten::add", "aten::zero_",
                                             "aten::clone", "aten::masked_fill", "aten::cat", "aten::sum",
                                             "aten::index", "aten::where")),
)


def profile_breakdown(model_name: str, sparsity: float, rounds: int = 4) -> dict[str, dict[str, float]]:
    """Self CPU milliseconds per training step of every engine, by operator category (profiler
    overhead included), one profiled step per engine per round, interleaved like the timing."""
    from torch.profiler import ProfilerActivity, profile

    setups = {engine: build(model_name, engine, sparsity, delta=10**9) for engine in ENGINES}
    totals = {engine: dict.fromkeys([name for name, _ in CATEGORIES] + ["other"], 0.0) for engine in ENGINES}
    for setup in setups.values():
        for _ in range(2):
            step(*setup)
    for _ in range(rounds):
        for engine, setup in setups.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(*setup)
            for event in prof.key_averages():
                category = next((name for name, prefixes in CATEGORIES if event.key.startswith(prefixes)), "other")
                totals[engine][category] += event.self_cpu_time_total / 1e3 / rounds
    return totals


def _rss(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in bytes, from Linux ``/proc/self/status``.
    Unlike ``ru_maxrss``, which survives ``execve`` and so starts at the size of the forking parent,
    these belong to this process image."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_child(model_name: str, engine: str, sparsity: float, threads: int) -> None:
    """Run in a fresh process: print peak RSS over building the model and 30 training steps, minus
    the RSS before (torch imported and warmed up, the fan-in kernel loaded), in bytes."""
    torch.set_num_threads(threads)
    from srigl import kernels

    # One-time costs before the baseline: the C++ kernel library, BLAS / oneDNN and autograd set-up,
    # and the ~70 MB of modules the first torch.optim optimizer imports.
    warm = nn.Linear(8, 8)
    warm_optimizer = torch.optim.SGD(warm.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 8)
    (warm(x).sum() + kernels.fanin_matmul(x, warm.weight[:, :2], torch.zeros(8, 2, dtype=torch.int16)).sum()).backward()
    warm_optimizer.step()
    del warm, warm_optimizer, x
    base = _rss("VmRSS")
    setup = build(model_name, engine, sparsity, delta=10)
    for _ in range(30):
        step(*setup)
    print(json.dumps(_rss("VmHWM") - base))


def rss_delta(model_name: str, engine: str, sparsity: float) -> int:
    threads = torch.get_num_threads()
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", model_name, engine, str(sparsity), str(threads)],
        check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def kernel_backend() -> str:
    try:
        from srigl import kernels

        return f"srigl.kernels backend {kernels.backend_name('cpu')!r}"
    except (ImportError, AttributeError) as error:
        return f"srigl.kernels unavailable ({error})"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def report(rows: list[dict], args, started: float, load_before: tuple[float, ...], profiles: dict) -> str:
    lines = [
        "# Compact vs masked-dense vs dense training",
        "",
        f"`python benchmarks/compact_training.py{' --quick' if args.quick else ''} --threads {args.threads}`: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch {torch.__version__}, `torch.set_num_threads({torch.get_num_threads()})`, batch {BATCH}, "
        f"SGD momentum 0.9, SRigL gamma_sal 0.3, ERK; fan-in kernel: {kernel_backend()}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        f"{args.rounds} interleaved rounds of {args.block} step(s) per engine ({UPDATE_ROUNDS} with an update step); "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {time.time() - started:.0f} s; "
        f"1-min load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (shared machine). "
        "vit-tiny keeps its patch embedding dense (`SparsityPolicy(dense_first=True)`).",
        "",
        "Step = forward + backward + optimizer.step + sp.step + zero_grad (median, ms). Update = the step "
        "that collects dense gradients and updates masks. Amortised = (99 step + 1 update) / 100 "
        "(delta = 100). Memory = parameters + buffers (masks / indices) + gradients + optimizer state, "
        "counted from tensors (MiB); update extra = what the sparsifier holds from the backward of an "
        "update step until the update, plus the peak it allocates during the update (measured with a "
        "torch dispatch mode); peak vs masked = (memory + update extra) / the same for masked. "
        "RSS = peak RSS of a fresh process over building the model and 30 steps, minus its RSS before "
        "(activations and allocator caching included).",
        "",
        "| model | sparsity | engine | step ms | update ms | amortised ms | speed-up vs masked | "
        "memory MiB | vs masked | update extra MiB | peak vs masked | RSS delta MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['sparsity']:.0%} | {row['engine']} | {1e3 * row['step']:.2f} | "
            f"{1e3 * row['update_step']:.2f} | {1e3 * row['amortised']:.2f} | {row['speedup']:.2f}x | "
            f"{_mib(row['memory']['total'])} | {row['memory_ratio']:.3f} | {_mib(row['memory']['update_extra'])} | "
            f"{row['peak_ratio']:.3f} | "
            f"{_mib(row['rss']) if row['rss'] is not None else 'n/a'} |"
        )
    lines += ["", "Memory breakdown (MiB: params / buffers / grads / optimizer state):", ""]
    for row in rows:
        m = row["memory"]
        lines.append(
            f"- {row['model']} {row['sparsity']:.0%} {row['engine']}: {_mib(m['params'])} / {_mib(m['buffers'])} / "
            f"{_mib(m['grads'])} / {_mib(m['optimizer'])}"
        )
    if profiles:
        lines += [
            "",
            "Where a vit-tiny step goes at 90 % (self CPU ms per step by operator, torch.profiler, 4 "
            "interleaved rounds of one step per engine; profiler overhead included):",
            "",
            "| operators | " + " | ".join(ENGINES) + " |",
            "|---|" + "---|" * len(ENGINES),
        ]
        for category in profiles[ENGINES[0]]:
            lines.append(f"| {category} | " + " | ".join(f"{profiles[e][category]:.1f}" for e in ENGINES) + " |")
        lines.append("| total | " + " | ".join(f"{sum(profiles[e].values()):.1f}" for e in ENGINES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps, no RSS (a smoke run)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.99])
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-operator profile of vit-tiny 90 %%")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "compact_training.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        name, engine, sparsity, threads = args.rss_child
        rss_child(name, engine, float(sparsity), int(threads))
        return
    if args.quick:
        args.rounds, args.block, args.no_rss, args.no_profile = 2, 3, True, True
    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()
    rows = []
    for model_name in args.models:
        for sparsity in args.sparsities:
            times = time_engines(model_name, sparsity, args.rounds, args.block)
            memories = {engine: training_memory(model_name, engine, sparsity) for engine in ENGINES}
            for engine in ENGINES:
                row = {"model": model_name, "sparsity": sparsity, "engine": engine, **times[engine],
                       "memory": memories[engine]}
                row["speedup"] = times["masked"]["amortised"] / times[engine]["amortised"]
                row["memory_ratio"] = memories[engine]["total"] / memories["masked"]["total"]
                peak = {e: memories[e]["total"] + memories[e]["update_extra"] for e in ENGINES}
                row["peak_ratio"] = peak[engine] / peak["masked"]
                row["rss"] = None if args.no_rss else rss_delta(model_name, engine, sparsity)
                rows.append(row)
                print(f"{model_name} {sparsity:.0%} {engine:8s} step {1e3 * row['step']:7.2f} ms  "
                      f"amortised {1e3 * row['amortised']:7.2f} ms  x{row['speedup']:.2f}  "
                      f"mem {_mib(memories[engine]['total'])} MiB ({row['memory_ratio']:.3f})", flush=True)
    profiles = {}
    if not args.no_profile and "vit-tiny" in args.models:
        profiles = profile_breakdown("vit-tiny", 0.9)
    text = report(rows, args, started, load_before, profiles)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hand-written analysis below the tables survives a rerun (re-read it against the new numbers).
    previous = out.read_text() if out.exists() else ""
    if ANALYSIS_MARKER in previous:
        text += "\n" + previous[previous.index(ANALYSIS_MARKER):]
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
