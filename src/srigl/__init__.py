"""srigl: dynamic sparse training with structured sparsity for PyTorch.

The core (sparsifiers, structures, distributions, schedules) imports only torch. Condensed layers
and kernels are imported lazily on first use. Data, models and the training app live in
:mod:`srigl.app`, which nothing here imports.
"""

from srigl.algorithms import ALGORITHMS, RigL, SET, SRigL, Static, get_algorithm, register_algorithm
from srigl.distributions import erk, uniform
from srigl.errors import (
    CheckpointError,
    CheckpointMismatchError,
    FanInTooSmallError,
    InfeasibleSparsityError,
    InvalidConfigError,
    InvalidSparsityError,
    LayerTooLargeError,
    MaskInvariantError,
    NoSparsifiableLayerError,
    NotConstantFanInError,
    ParameterNotInOptimizerError,
    ReplicaDivergenceError,
    SriglError,
    StateDictMismatchError,
    StepOrderError,
)
from srigl.schedules import CosineDrop
from srigl.selection import SparsityPolicy
from srigl.sparsifier import Sparsifier
from srigl.structures import NM, ConstantFanIn, Unstructured, topk_mask

__version__ = "0.1.0"

_LAZY = {
    "condense": ("srigl.condensed", "condense"),
    "CondensedLinear": ("srigl.condensed", "CondensedLinear"),
    "CondensedConv2d": ("srigl.condensed", "CondensedConv2d"),
    "CondensedMultiheadAttention": ("srigl.condensed", "CondensedMultiheadAttention"),
    "save_condensed": ("srigl.io.serialization", "save_condensed"),
    "load_condensed": ("srigl.io.serialization", "load_condensed"),
    "export_onnx": ("srigl.io.export", "export_onnx"),
    "fanin_matmul": ("srigl.kernels", "fanin_matmul"),
    "condense_tensor": ("srigl.condensed", "condense_tensor"),
    "register_condenser": ("srigl.condensed", "register_condenser"),
    "CompactMultiheadAttention": ("srigl.condensed", "CondensedMultiheadAttention"),  # the same class
    "to_masked_dense": ("srigl.condensed.twins", "to_masked_dense"),
    "from_masked_dense": ("srigl.condensed.twins", "from_masked_dense"),
    "save_checkpoint": ("srigl.io.checkpoint", "save_checkpoint"),
    "load_checkpoint": ("srigl.io.checkpoint", "load_checkpoint"),
    "training_state": ("srigl.io.checkpoint", "training_state"),
    "restore_training_state": ("srigl.io.checkpoint", "restore_training_state"),
}


def __getattr__(name: str):
    # Integrations load on first use so `import srigl` stays torch-only and side-effect free.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name == "CompactSRigL":
        raise AttributeError(
            "srigl.CompactSRigL is gone: compact training is a storage of the one engine, "
            "srigl.SRigL(model, optimizer, ..., compact=True)"
        )
    raise AttributeError(f"module 'srigl' has no attribute {name!r}")


__all__ = [
    "ALGORITHMS", "CheckpointError", "CheckpointMismatchError", "ReplicaDivergenceError", "CosineDrop", "ConstantFanIn", "FanInTooSmallError", "InfeasibleSparsityError",
    "InvalidConfigError", "InvalidSparsityError", "MaskInvariantError", "NM", "NoSparsifiableLayerError", "NotConstantFanInError",
    "ParameterNotInOptimizerError", "RigL", "SET", "SRigL", "Sparsifier", "SparsityPolicy", "SriglError",
    "StateDictMismatchError", "Static", "StepOrderError", "Unstructured", "erk", "get_algorithm",
    "register_algorithm", "topk_mask", "uniform", *_LAZY,
]
