"""Named exceptions. Every message carries the numbers needed to act on it."""

from __future__ import annotations


class SriglError(Exception):
    """Base class of every error srigl raises on purpose."""


class InvalidSparsityError(SriglError, ValueError):
    """A sparsity outside [0, 1), or a per-layer sparsity that cannot be met."""


class InfeasibleSparsityError(InvalidSparsityError):
    """The global target cannot be met by the distribution (e.g. ERK with too many dense layers)."""

    def __init__(self, message: str, max_feasible: float):
        super().__init__(message)
        self.max_feasible = max_feasible


class FanInTooSmallError(InvalidSparsityError):
    """A constant fan-in layer whose fan-in is too small to keep even one weight per neuron."""


class InvalidConfigError(SriglError, ValueError):
    """A hyperparameter outside its valid range (gamma_sal, delta, t_end, alpha, ...)."""


class NoSparsifiableLayerError(SriglError, ValueError):
    """The selection policy found no tensor to sparsify in the model."""


class ParameterNotInOptimizerError(SriglError, ValueError):
    """A tensor selected for sparsification is not optimised by the given optimizer."""


class StepOrderError(SriglError, RuntimeError):
    """`sparsifier.step()` was called without an `optimizer.step()` since the previous call."""


class StateDictMismatchError(SriglError, ValueError):
    """A state dict from another model, sparsity or algorithm was given to `load_state_dict`."""


class MaskInvariantError(SriglError, RuntimeError):
    """A mask update broke its structure's invariant (an internal error: please report it)."""


class NotConstantFanInError(MaskInvariantError, ValueError):
    """A mask that should have constant fan-in does not."""


class CheckpointError(SriglError, RuntimeError):
    """A checkpoint that is missing, corrupt, truncated, not written by srigl, or cannot be saved."""


class CheckpointMismatchError(CheckpointError, StateDictMismatchError):
    """A checkpoint from another model, sparsity, algorithm, optimizer or scheduler was given to restore."""


class ReplicaDivergenceError(SriglError, RuntimeError):
    """Ranks of a distributed run hold different masks or weights where they must be identical."""


class MaskError(SriglError, ValueError):
    """A mask that does not fit its weight (shape, dtype, name) or that the weight does not obey."""


class MissingDependencyError(SriglError, ImportError):
    """An optional package a feature needs is not installed; the message names the pip extra."""


class LayerTooLargeError(SriglError, MemoryError):
    """A layer's storage would not fit the memory its device has free; the message gives both sizes."""


class ContextLengthError(SriglError, ValueError):
    """A decoder was given more cached plus new tokens than its context length holds."""
