"""Small helpers for torch.distributed runs: who am I, and are all replicas still identical?

Nothing here starts processes: launch with ``torchrun`` (one node or many) and initialise the process
group as usual. The sparsifier itself needs no distributed setup beyond that: on update steps it
averages the dense gradients over ranks, so every rank computes the same masks.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Mapping

import torch

from srigl.errors import InvalidConfigError, ReplicaDivergenceError


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in the default group; 1 without an initialised process group."""
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    """This process's rank in the default group; 0 without an initialised process group."""
    dist = _dist()
    return dist.get_rank() if dist else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the process that writes files and prints."""
    return rank() == 0


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the ranks in place (a collective: every rank calls it, in the same
    order); unchanged without a process group. The one averaging helper of srigl."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it is true on any rank (one collective for all of them), so that all
    ranks take the same branch."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return tuple(bool(f) for f in flags)
    # gloo and NCCL both reduce float tensors; MAX of 0/1 is "any".
    value = torch.tensor([float(f) for f in flags], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in value.tolist())


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for a single-machine rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _digest(tensor: torch.Tensor) -> str:
    # Hash the raw bytes: equality is exact (bitwise), and only 64 characters per tensor travel.
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # (numel * itemsize,)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest() + f"|{tuple(tensor.shape)}|{tensor.dtype}"


def check_replicas_in_sync(tensors: Mapping[str, torch.Tensor], what: str = "tensors") -> None:
    """Raise unless every rank holds bitwise-identical ``tensors`` (a collective: call it on all ranks).

    Args:
        tensors: ``{name: tensor}``, the same names on every rank (e.g. ``sparsifier.masks()`` or
            ``dict(model.named_parameters())``).
        what: a word for the message ("masks", "weights").

    Raises:
        ReplicaDivergenceError: naming the tensors that differ and the ranks that disagree with rank 0.
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return
    mine = {name: _digest(t) for name, t in sorted(tensors.items())}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    reference = gathered[0]
    differing: dict[str, list[int]] = {}
    for other_rank, digests in enumerate(gathered):
        for name in sorted(set(reference) | set(digests)):
            if reference.get(name) != digests.get(name):
                differing.setdefault(name, []).append(other_rank)
    if differing:
        listed = "; ".join(f"{name} on ranks {ranks}" for name, ranks in list(differing.items())[:8])
        raise ReplicaDivergenceError(
            f"{len(differing)} of {len(reference)} {what} differ from rank 0 (world size {len(gathered)}): {listed}"
        )


def refuse_sharded(model: torch.nn.Module) -> None:
    """Refuse a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Each rank then holds a shard of every weight (its parameters are DTensors), so a rank's top-k
    would not see whole neurons and the masks would differ between ranks. DDP keeps whole weights.

    Raises:
        InvalidConfigError: some parameter of ``model`` is a DTensor.
    """
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise InvalidConfigError(
            f"{type(model).__name__} is sharded with FSDP2 (fully_shard): {len(sharded)} parameters are "
            f"DTensors (e.g. {sharded[:3]}); srigl needs whole weights on every rank to keep masks "
            "rank-consistent. Build the sparsifier on the unsharded model and use DDP "
            "(net = sparsifier.wrap_ddp()) instead"
        )


def wrap_ddp(model: torch.nn.Module, layers, ignored: list[str], **ddp_kwargs) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel``, the tensors named ``ignored`` (compact layers) left to
    their storage, which averages their gradients (:meth:`srigl.Sparsifier.wrap_ddp`)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidConfigError("wrap_ddp needs an initialized process group (torch.distributed.init_process_group)")
    if ignored:
        # DDP reads this attribute of the module it wraps: parameters and buffers it must skip.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    for layer in layers:
        layer.average_over_ranks()
    return DistributedDataParallel(model, **ddp_kwargs)
