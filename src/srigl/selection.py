"""Which tensors become sparse: a policy, and a report of every decision with its reason."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from srigl.errors import InvalidConfigError
from srigl.orientation import TRANSPOSED_WEIGHT_TYPES, WeightView, qualnames, stores_transposed

# Module types whose 2-D+ weights are sparsified by default. Linear subclasses (e.g. the
# out_proj of nn.MultiheadAttention) are matched through isinstance.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)

# Types of libraries the core does not import, by "module.qualname": Hugging Face GPT-2's Conv1D
# (weight stored (in, out), read through srigl.orientation's transposed view).
DEFAULT_TYPE_NAMES: tuple[str, ...] = tuple(sorted(TRANSPOSED_WEIGHT_TYPES))


def matches_type(module: nn.Module, types: tuple[type[nn.Module] | str, ...]) -> bool:
    """Whether ``module`` is an instance of one of ``types`` (classes, or ``"module.qualname"`` strings
    matched against its class and base classes)."""
    classes = tuple(t for t in types if isinstance(t, type))
    names = {t for t in types if isinstance(t, str)}
    return isinstance(module, classes) or bool(names and names & qualnames(type(module)))


def type_name(t: type[nn.Module] | str) -> str:
    """A policy type's short name for messages (``"Linear"``, ``"Conv1D"``)."""
    return t.__name__ if isinstance(t, type) else t.rpartition(".")[2]


@dataclass(frozen=True)
class SparsityPolicy:
    """Selects the tensors to sparsify.

    Attributes:
        types: module types whose weights may be sparsified: classes, or ``"module.qualname"``
            strings for types of libraries srigl does not import (Hugging Face's
            ``"transformers.pytorch_utils.Conv1D"``, whose weight is read transposed).
        include: if non-empty, only parameter FQNs matching one of these fnmatch patterns.
        exclude: parameter FQNs matching any of these fnmatch patterns stay dense.
        dense_first: keep the first eligible layer (in module order) dense.
        dense_last: keep the output layer (the classifier; see :func:`output_weight`) dense.
        min_ndim: tensors with fewer dimensions (biases, norms) stay dense.
    """

    types: tuple[type[nn.Module] | str, ...] = DEFAULT_TYPES + DEFAULT_TYPE_NAMES
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dense_first: bool = False
    dense_last: bool = False
    min_ndim: int = 2


@dataclass(frozen=True)
class Candidate:
    """A tensor the policy looked at."""

    name: str  # fully-qualified parameter name, e.g. "features.0.weight"
    module_name: str
    param_name: str
    shape: tuple[int, ...]
    sparse: bool
    reason: str
    is_output: bool = field(default=False)
    #: The weight is stored ``(fan_in, out)`` (Hugging Face ``Conv1D``); see :mod:`srigl.orientation`.
    transposed: bool = field(default=False)

    @property
    def view(self) -> WeightView:
        """How the engine reads this tensor as ``(out, fan_in)``."""
        return WeightView(self.shape, self.transposed)


def _weight_params(module: nn.Module) -> list[str]:
    """Names of the module's own (non-recursive) parameters that are weights, not biases."""
    return [n for n, p in module.named_parameters(recurse=False) if p is not None and "bias" not in n]


def called_order(model: nn.Module) -> list[str] | None:
    """Names of ``model``'s submodules in the order its forward calls them (``torch.fx`` trace).

    None when the model cannot be traced symbolically (data-dependent control flow, for instance).
    """
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 -- any tracing failure just means "order unknown"
        return None
    return [node.target for node in graph.nodes if node.op == "call_module"]


def output_weight(model: nn.Module, eligible: list[str], modules: dict[str, str]) -> str | None:
    """The output layer's weight among ``eligible`` FQNs: the last one whose module the forward calls.

    Args:
        model: the model (traced with ``torch.fx`` to find the call order).
        eligible: FQNs of the weights that may be sparse, in registration order.
        modules: ``{weight FQN: owning module name}``.

    Falls back to the last registered weight when the model cannot be traced, or when the trace
    calls none of them (e.g. the layers are inside a leaf module).
    """
    if not eligible:
        return None
    order = called_order(model)
    if order:
        rank = {name: i for i, name in enumerate(order)}  # a module called twice: its last call

        def call_of(weight: str) -> int | None:
            # The trace stops at leaf modules (nn.MultiheadAttention holds out_proj): a weight is
            # called when its module or the nearest traced ancestor is.
            name = modules[weight]
            while name not in rank:
                if not name:
                    return None
                name = name.rpartition(".")[0]
            return rank[name]

        calls = {w: call_of(w) for w in eligible}
        called = [w for w in eligible if calls[w] is not None]
        if called:
            # Within one call, registration order decides (a leaf's weights in the order it holds them).
            return max(called, key=lambda w: (calls[w], eligible.index(w)))
    return eligible[-1]


def select(model: nn.Module, policy: SparsityPolicy, output: str | None = None) -> list[Candidate]:
    """Decide, for every parameter of ``model``, whether it is sparsified and why.

    Args:
        model: the model.
        policy: which tensors may be sparse.
        output: FQN of the output layer's weight; None finds it with :func:`output_weight`.

    Returns:
        One :class:`Candidate` per parameter (in module order); ``sparse`` says whether it is selected.
        The output layer's weight is flagged ``is_output`` (the classifier, never ablated), and a
        weight stored ``(fan_in, out)`` is flagged ``transposed``.

    Raises:
        InvalidConfigError: ``output`` names no parameter of ``model``.
    """
    eligible: list[tuple[str, str, nn.Module]] = []  # (module_name, param_name, module)
    for module_name, module in model.named_modules():
        if matches_type(module, policy.types):
            for param_name in _weight_params(module):
                if getattr(module, param_name).dim() >= policy.min_ndim:
                    eligible.append((module_name, param_name, module))
    eligible_names = [f"{m}.{p}" if m else p for m, p, _ in eligible]
    first = eligible_names[0] if eligible_names else None
    if output is None:
        last = output_weight(model, eligible_names, {n: m for n, (m, _, _) in zip(eligible_names, eligible)})
    else:
        params = dict(model.named_parameters())
        if output not in params:
            near = [n for n in params if n.endswith(output.rpartition(".")[2])][:5]
            raise InvalidConfigError(
                f"output_layer={output!r} is not a parameter of {type(model).__name__} "
                f"({len(params)} parameters; e.g. {near or list(params)[:5]})"
            )
        last = output

    decisions: list[Candidate] = []
    for name, param in model.named_parameters():
        module_name, _, param_name = name.rpartition(".")
        shape = tuple(param.shape)
        if name not in eligible_names:
            owner = model.get_submodule(module_name) if module_name else model
            if param.dim() < policy.min_ndim:
                reason = f"ndim {param.dim()} < {policy.min_ndim} (bias or norm)"
            elif not matches_type(owner, policy.types):
                reason = f"type {type(owner).__name__} not in sparse types"
            else:
                reason = "not a weight"
            decisions.append(Candidate(name, module_name, param_name, shape, False, reason))
            continue
        reason, sparse = "selected", True
        if policy.include and not any(fnmatch.fnmatchcase(name, p) for p in policy.include):
            reason, sparse = f"not matched by include {list(policy.include)}", False
        elif any(fnmatch.fnmatchcase(name, p) for p in policy.exclude):
            pattern = next(p for p in policy.exclude if fnmatch.fnmatchcase(name, p))
            reason, sparse = f"excluded by pattern {pattern!r}", False
        elif policy.dense_first and name == first:
            reason, sparse = "first layer kept dense (dense_first=True)", False
        elif policy.dense_last and name == last:
            reason, sparse = "output layer kept dense (dense_last=True)", False
        owner = model.get_submodule(module_name) if module_name else model
        decisions.append(Candidate(
            name, module_name, param_name, shape, sparse, reason, is_output=name == last,
            transposed=stores_transposed(owner, param_name),
        ))
    return decisions
