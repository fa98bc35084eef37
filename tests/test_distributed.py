"""Distributed training on CPU with gloo: two ranks, DDP, identical masks, same result as one process.

``WORKER`` (written to a temporary file) is launched by ``torchrun`` with two processes on
127.0.0.1. Each rank trains on its own half of every global batch; after every mask update the ranks
compare masks and weights bitwise (:func:`srigl.distributed.check_replicas_in_sync`), and rank 0
saves the final state. This process runs the same script single-process over the whole global batch
and compares: DDP averages the gradients, the sparsifier averages the dense gradients it collected
(local, before DDP's all-reduce) at update steps, so both runs see the same numbers up to float
summation order.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import srigl
from srigl.distributed import check_replicas_in_sync, find_free_port, is_main_process, rank, world_size
from srigl.errors import ReplicaDivergenceError

pytestmark = pytest.mark.distributed

SRC = str(Path(srigl.__file__).resolve().parents[1])

WORKER = r'''
import gc
import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import srigl
from srigl.distributed import check_replicas_in_sync, rank, world_size

STEPS, DELTA, GLOBAL_BATCH, NAN_STEP = 24, 3, 16, 6  # updates after steps 3, 6, 9, 12, 15 (t_end = 18)
# (algorithm, when the sparsifier is built relative to the DDP wrap, inject an inf at NAN_STEP)
CASES = [
    ("rigl", "before_ddp", False),
    ("srigl", "after_ddp", False),
    ("srigl", "before_ddp", False),
    ("set", "after_ddp", False),
    ("srigl", "after_ddp", True),
    # Compact training: the sparsifier wraps DDP itself and averages the compact values' gradients;
    # gamma_sal 0.9 ablates neurons, so updates swap in differently shaped values Parameters.
    ("srigl-compact", "wrap_ddp", False),
]


def make_sparsifier(algorithm, model, opt, **kwargs):
    if algorithm == "srigl-compact":
        return srigl.SRigL(model, opt, compact=True, gamma_sal=0.9, **kwargs)
    return srigl.get_algorithm(algorithm)(model, opt, **kwargs)


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def global_batch(step, inject):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 10, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    if inject and step == NAN_STEP:
        x[1, 0] = float("inf")  # row 1: on rank 1 only when sharded over two ranks
    return x, y


def run(algorithm, order, inject, distributed):
    model, opt = build()
    kwargs = dict(sparsity=0.7, total_steps=STEPS, delta=DELTA, distribution="uniform", seed=5)
    if not distributed:
        net, sp = model, make_sparsifier(algorithm, model, opt, **kwargs)
    elif order == "before_ddp":
        sp = make_sparsifier(algorithm, model, opt, **kwargs)
        net = DistributedDataParallel(model)
    elif order == "wrap_ddp":
        sp = make_sparsifier(algorithm, model, opt, **kwargs)
        net = sp.wrap_ddp()
    else:
        net = DistributedDataParallel(model)
        sp = make_sparsifier(algorithm, net, opt, **kwargs)
    shapes = [tuple(p.shape) for p in model.parameters()]
    log = []
    for step in range(1, STEPS + 1):
        x, y = global_batch(step, inject)
        if distributed:
            x, y = x[rank()::world_size()], y[rank()::world_size()]  # this rank's shard
        loss = torch.nn.functional.cross_entropy(net(x), y)  # mean over the shard; DDP averages shards
        loss.backward()
        if inject:
            for p in model.parameters():  # what a careful loop does: never step on non-finite gradients
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = sp.step()
        opt.zero_grad()
        if stats is not None:
            log.append({"step": step, "skipped": bool(stats.get("skipped")), "warned": len(caught)})
            if distributed:
                check_replicas_in_sync(sp.masks(), "masks")
                check_replicas_in_sync({n: p.detach() for n, p in model.named_parameters()}, "weights")
                check_replicas_in_sync({n: s["momentum_buffer"] for n, s in ((n, opt.state[p]) for n, p in model.named_parameters())}, "momentum")
    return {
        "masks": sp.masks(),
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "log": log,
        "layout_changed": shapes != [tuple(p.shape) for p in model.parameters()],
    }


if __name__ == "__main__":
    out = sys.argv[1]
    dist.init_process_group("gloo")  # env:// from torchrun
    # Top-k tie-breaking must not depend on the rank: all-equal scores, every structure.
    ties = torch.zeros(64, 48)
    check_replicas_in_sync({
        "unstructured": srigl.topk_mask(ties, 500, srigl.Unstructured()),
        "constant_fan_in": srigl.topk_mask(ties, 7, srigl.ConstantFanIn()),
        "n:m": srigl.topk_mask(ties, 2, srigl.NM(2, 4)),
    }, "tie-broken masks")
    for algorithm, order, inject in CASES:
        result = run(algorithm, order, inject, distributed=True)
        result["world_size"] = world_size()
        torch.save(result, f"{out}/{algorithm}-{order}-{inject}-rank{rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Free the DDP wrappers (reference cycles) now: they hold the process group, whose gloo worker
    # threads would otherwise outlive it into interpreter shutdown and abort the process there
    # ("terminate called without an active exception") when one frees a finished collective late.
    gc.collect()
'''


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    # Build the C++ kernel here first (compact runs use it), so that the ranks, and any other test
    # worker, do not all compile it at once on a cold cache. (The rank aborts once blamed on that,
    # "terminate called without an active exception", were gloo threads outliving the process
    # group into interpreter shutdown: see the gc.collect() at the end of WORKER and in srigl.app.cli.)
    from srigl.kernels import cpu_extension_available

    cpu_extension_available()
    for _ in range(3):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(find_free_port()), *args,
        ]
        result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
        # Another process may take the free port between the probe and torchrun's bind: try another.
        if "EADDRINUSE" not in result.stderr and "address already in use" not in result.stderr.lower():
            break
    return result


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    script = root / "worker.py"
    script.write_text(WORKER)
    result = _torchrun([str(script), str(root)], cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return root, runpy.run_path(str(script))


CASE_IDS = ["rigl-before_ddp", "srigl-after_ddp", "srigl-before_ddp", "set-after_ddp", "srigl-after_ddp-nan",
            "srigl-compact-wrap_ddp"]


@pytest.mark.parametrize("case", range(6), ids=CASE_IDS)
def test_ranks_agree_and_match_single_process(ddp_results, case):
    root, ns = ddp_results
    algorithm, order, inject = ns["CASES"][case]
    ranks = [torch.load(root / f"{algorithm}-{order}-{inject}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    # Masks and weights were compared bitwise on both ranks after every update; recheck the end state.
    for name in ranks[0]["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name]), name
    for name in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    assert ranks[0]["log"] == ranks[1]["log"]
    assert [entry["step"] for entry in ranks[0]["log"]] == [3, 6, 9, 12, 15]

    single = ns["run"](algorithm, order, inject, distributed=False)
    assert single["log"] == ranks[0]["log"]
    for name, mask in single["masks"].items():
        assert torch.equal(mask, ranks[0]["masks"][name]), f"{name}: masks differ from the single-process run"
    for name, weight in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    # Masks really moved during the run (otherwise agreeing would prove little).
    model, opt = ns["build"]()
    initial = ns["make_sparsifier"](algorithm, model, opt, sparsity=0.7, total_steps=24, delta=3, distribution="uniform", seed=5)
    assert any(not torch.equal(initial.masks()[n], m) for n, m in single["masks"].items())
    if algorithm == "srigl-compact":  # ablation really swapped Parameters under DDP
        assert single["layout_changed"] and ranks[0]["layout_changed"]


def test_non_finite_gradient_on_one_rank_skips_the_update_on_every_rank(ddp_results):
    root, ns = ddp_results
    for r in (0, 1):
        log = torch.load(root / f"srigl-after_ddp-True-rank{r}.pt", weights_only=True)["log"]
        by_step = {entry["step"]: entry for entry in log}
        # The inf was in rank 1's shard only; rank 0 skipped too because the dense gradients are
        # averaged over ranks before the finiteness check.
        assert by_step[6] == {"step": 6, "skipped": True, "warned": 1}
        assert not by_step[9]["skipped"] and not by_step[3]["skipped"]


def test_helpers_without_a_process_group():
    assert world_size() == 1 and rank() == 0 and is_main_process()
    check_replicas_in_sync({"a": torch.ones(2)})  # a no-op in a single process
    port = find_free_port()
    assert 0 < port < 65536


DIVERGE = r'''
import torch
import torch.distributed as dist

from srigl.distributed import check_replicas_in_sync, rank
from srigl.errors import ReplicaDivergenceError

dist.init_process_group("gloo")
same = torch.arange(6.0)
different = torch.zeros(3, dtype=torch.bool)
different[rank()] = True
try:
    check_replicas_in_sync({"fc.weight_mask": different, "fc.weight": same}, "masks")
except ReplicaDivergenceError as e:
    print(f"rank{rank()}: {e}", flush=True)
dist.destroy_process_group()
'''


def test_divergence_is_reported_with_names_and_ranks(tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE)
    result = _torchrun([str(script)], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    for r in (0, 1):
        assert f"rank{r}: 1 of 2 masks differ from rank 0 (world size 2): fc.weight_mask on ranks [1]" in result.stdout


@pytest.mark.parametrize("engine", [[], ["--compact"]], ids=["masked-dense", "compact"])
def test_torchrun_cli_writes_one_run_folder(tmp_path, engine):
    pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn")
    out = tmp_path / "run"
    result = _torchrun(
        ["-m", "srigl", "train", "--data", "digits", "--model", "mlp", "--method", "srigl", "--sparsity", "0.8",
         "--epochs", "1", "--batch-size", "32", "--limit-train", "256", "--limit-test", "64", "--delta", "2",
         "--no-progress", "--seed", "0", "--out", str(out), *engine],
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert runs == [out], f"expected exactly one run folder, found {runs}"
    for name in ("config.toml", "metrics.csv", "summary.json", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    from srigl.io.checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["sparsifier_config"]["algorithm"] == "srigl"
    if engine:  # the compact run's checkpoint holds condensed values, not dense weights
        assert any(key.endswith(".values") for key in state["model"]), sorted(state["model"])[:5]
    assert not any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())
    shutil.rmtree(out)


PER_RANK = r'''
import os
import sys

from srigl.app.cli import main

# "{rank}" in an argument becomes this rank's number: per-rank flags under one torchrun command.
sys.exit(main([arg.replace("{rank}", os.environ["RANK"]) for arg in sys.argv[1:]]))
'''


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--seed", "{rank}", "--compact"], "seed (rank 0: 0, rank 1: 1)"),
        (["--sparsity", "0.{rank}5"], "sparsity (rank 0: 0.05, rank 1: 0.15)"),
    ],
    ids=["seed-compact", "sparsity-masked-dense"],
)
def test_ranks_started_with_different_configs_fail_fast(tmp_path, flags, words):
    pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn")
    script = tmp_path / "per_rank.py"
    script.write_text(PER_RANK)
    out = tmp_path / "run"
    result = _torchrun(
        [str(script), "train", "--data", "digits", "--method", "srigl", "--epochs", "1", "--batch-size", "32",
         "--limit-train", "128", "--limit-test", "64", "--no-progress", "--out", str(out), *flags],
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode != 0
    assert "epoch 1/1" not in result.stdout  # stopped before any training step
    # every rank stops with the same named error (instead of training on, or a gloo abort)
    assert result.stderr.count("the ranks were started with different configs") >= 2, result.stderr[-4000:]
    assert words in result.stderr
    assert not (out / "checkpoints").exists()


def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    import datetime

    import torch.distributed as dist

    from srigl.app.train import init_process

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    proc = init_process("cpu", timeout=7.5)
    assert proc.world == 2 and proc.owns_group
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=7.5)}


SLOW_RANK = r'''
import os
import sys
import time

from srigl.app import datasets
from srigl.app.cli import main

if os.environ["RANK"] == "1":
    real = datasets.batches

    def stalled(dataset, order, batch_size, num_workers=0):
        for i, batch in enumerate(real(dataset, order, batch_size, num_workers)):
            if i == 2:
                time.sleep(8)  # a rank that stops answering (frozen, swapping, stuck on I/O)
            yield batch

    datasets.batches = stalled
sys.exit(main(sys.argv[1:]))
'''


def test_a_stalled_rank_ends_the_run_after_dist_timeout(tmp_path):
    # L5 (issue #14): without a timeout a frozen rank blocked the others for gloo's default 30 minutes.
    pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn")
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK)
    result = _torchrun(
        [str(script), "train", "--data", "digits", "--method", "srigl", "--epochs", "1", "--batch-size", "32",
         "--limit-train", "256", "--limit-test", "64", "--no-progress", "--out", str(tmp_path / "run"),
         "--dist-timeout", "2"],
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode != 0
    assert "srigl train: error: rank 0: another rank did not answer within 2 s (--dist-timeout)" in result.stderr, \
        result.stderr[-4000:]


OTHER_MASKS = r'''
import dataclasses
import os
import sys

from srigl.app import train as train_module
from srigl.app.cli import main

if os.environ["RANK"] == "1":
    # Same config on both ranks, but rank 1 draws other masks (as another torch version or a
    # patched sparsifier could): only the mask comparison can tell.
    real = train_module.build_sparsifier
    train_module.build_sparsifier = lambda config, *a: real(dataclasses.replace(config, seed=config.seed + 1), *a)
sys.exit(main(sys.argv[1:]))
'''


def test_ranks_with_the_same_config_but_other_masks_fail_fast(tmp_path):
    pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn")
    script = tmp_path / "other_masks.py"
    script.write_text(OTHER_MASKS)
    result = _torchrun(
        [str(script), "train", "--data", "digits", "--method", "srigl", "--epochs", "1", "--batch-size", "32",
         "--limit-train", "128", "--limit-test", "64", "--no-progress", "--out", str(tmp_path / "run")],
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode != 0
    assert "epoch 1/1" not in result.stdout
    assert result.stderr.count("masks (at start) differ from rank 0 (world size 2): fc1.weight on ranks [1]") >= 2, \
        result.stderr[-4000:]


FSDP2 = r'''
import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import srigl
from srigl.distributed import rank

dist.init_process_group("gloo")
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
fully_shard(model)
try:
    srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=10)
except srigl.errors.InvalidConfigError as e:
    print(f"rank{rank()}: {e}", flush=True)
dist.destroy_process_group()
gc.collect()
'''


def test_an_fsdp2_sharded_model_is_refused_by_name_on_every_rank(tmp_path):
    """fully_shard runs on CPU with gloo, but each rank holds only a shard of each weight (DTensors):
    the sparsifier refuses it and names DDP (sparsifier.wrap_ddp) as the alternative."""
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2)
    result = _torchrun([str(script)], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    for r in (0, 1):
        assert (f"rank{r}: FSDPSequential is sharded with FSDP2 (fully_shard): 4 parameters are DTensors "
                "(e.g. ['0.weight', '0.bias', '2.weight'])") in result.stdout, result.stdout
    assert result.stdout.count("use DDP (net = sparsifier.wrap_ddp()) instead") == 2
