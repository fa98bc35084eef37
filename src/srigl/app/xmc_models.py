"""Models of extreme multi-label classification (XMC) runs, by name: ``F`` bag-of-words features in,
one logit per label (``L`` of them) out.

* ``mlp``: ``Linear(F, hidden) -> ReLU -> Linear(hidden, L)``: a dense-input feature layer and the
  ``L``-way output head (``hidden`` defaults to 768, the width of a BERT-base embedding).
* ``linear``: ``Linear(F, L)``: the head alone, for features that are already dense embeddings
  (from a frozen encoder, for instance).

Both name their head in ``classifier_name`` (``"head"``), as the image models do. The sparsifier
finds the output layer by tracing the forward: the head is the last layer called, so it is
sparsified like every other ``Linear`` (SRigL keeps its fan-in constant per label) and is never
ablated: a label whose neuron were ablated could never be predicted again.

``head_device="meta"`` creates the head without values (the rest of the model as usual): a compact
sparsifier then allocates only its ``(L, k)`` values and indices (:func:`srigl.storage.compact.from_meta`),
never the dense ``(L, F)`` or ``(L, hidden)`` weight (2 GB at ``L = 670,091``, hidden 768).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from srigl.errors import InvalidConfigError

DEFAULT_HIDDEN = 768


class XMCMLP(nn.Module):
    """``(B, F)`` features -> ``(B, hidden)`` ReLU -> ``(B, L)`` label logits."""

    classifier_name = "head"
    first_layer_name = "features"

    def __init__(self, n_features: int, n_labels: int, hidden: int = DEFAULT_HIDDEN, head_device=None):
        super().__init__()
        self.features = nn.Linear(n_features, hidden)
        self.head = nn.Linear(hidden, n_labels, device=head_device)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).relu())


class XMCLinear(nn.Module):
    """``(B, F)`` dense features -> ``(B, L)`` label logits: the output head alone."""

    classifier_name = "head"
    first_layer_name = "head"

    def __init__(self, n_features: int, n_labels: int, head_device=None):
        super().__init__()
        self.head = nn.Linear(n_features, n_labels, device=head_device)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


# name -> (factory(n_features, n_labels, hidden, head_device), whether it has a hidden layer)
_XMC_MODELS: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "mlp": (lambda f, l, h, d: XMCMLP(f, l, h, head_device=d), True),
    "linear": (lambda f, l, h, d: XMCLinear(f, l, head_device=d), False),
}


def list_xmc_models() -> list[str]:
    """Names of the XMC models, sorted."""
    return sorted(_XMC_MODELS)


def has_hidden(name: str) -> bool:
    """Whether XMC model ``name`` takes a hidden width."""
    return _XMC_MODELS[name][1]


def create_xmc_model(name: str, n_features: int, n_labels: int, hidden: int | None = None,
                     head_device: torch.device | str | None = None) -> nn.Module:
    """Build XMC model ``name`` for ``n_features`` inputs and ``n_labels`` outputs.

    Draws its initial weights from the global RNG (call ``torch.manual_seed`` first).

    Args:
        head_device: where the head is created (default: the CPU, as the rest); ``"meta"`` for a
            head that only a compact sparsifier will materialise.

    Raises:
        InvalidConfigError: an unknown name (the valid ones are listed).
    """
    if name not in _XMC_MODELS:
        raise InvalidConfigError(f"unknown XMC model {name!r}; choose one of: {', '.join(list_xmc_models())}")
    return _XMC_MODELS[name][0](n_features, n_labels, hidden or DEFAULT_HIDDEN, head_device)


def prior_logit(n_positive: int, n_points: int, n_labels: int) -> float:
    """``log(p / (1 - p))`` of the mean label density ``p = n_positive / (n_points * n_labels)``.

    Raises:
        InvalidConfigError: ``p`` not strictly between 0 and 1 (no positive label, or every label
            positive on every point): the logit would be infinite.
    """
    cells = n_points * n_labels
    if not 0 < n_positive < cells:
        raise InvalidConfigError(
            f"{n_positive} positive labels over {n_points} points x {n_labels} labels: the label density must "
            "lie strictly between 0 and 1 to start the head's bias at its logit"
        )
    p = n_positive / cells
    return math.log(p) - math.log1p(-p)


def init_prior_bias(head: nn.Module, n_positive: int, n_points: int, n_labels: int) -> None:
    """Start every label's bias of ``head`` at :func:`prior_logit`, so the untrained head predicts the
    mean label density instead of 0.5 for each of the ``L`` labels.

    Why: from a bias of 0 every logit sits at sigmoid(0) = 0.5, so for thousands of steps the gradient
    of nearly every (label, input) weight says only "push this label down", and its size is that input's
    mean activation. RigL-style growth ranks inactive weights by that gradient, so it connects every
    label to the same few strongly active inputs (measured in results/extreme_output.md), which loses to
    random growth; once the bias starts at the prior, the gradient of a weight carries which inputs
    predict the label. (The same initialisation is standard for rare-positive classifiers.)
    """
    with torch.no_grad():
        head.bias.fill_(prior_logit(n_positive, n_points, n_labels))
