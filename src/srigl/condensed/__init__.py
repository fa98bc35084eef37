"""Condensed constant fan-in layers, and :func:`condense` to turn a trained sparse model into them.

A constant fan-in mask gives every active output neuron exactly ``k`` incoming weights, so a layer
can be stored as ``values`` and ``indices`` of shape ``(n_active, k)``: row ``i`` holds the weights
of output neuron ``active_rows[i]`` and the fan-in positions they read. Neurons with no active weight
(*ablated*) are not stored; they output exactly their bias, so a condensed layer computes what the
masked dense layer computes.

* :mod:`~srigl.condensed.tensor`: :func:`condense_tensor`, the one place where ``(weight, mask)``
  becomes that triple and where constant fan-in is checked.
* :mod:`~srigl.condensed.layers`: every condensed layer is a ``from_dense`` classmethod over it,
  registered by dense module type with :func:`register_condenser` (:data:`CONDENSERS`).
* :mod:`~srigl.condensed.attention`: ``nn.MultiheadAttention`` with condensable projections.
* :mod:`~srigl.condensed.surgery`: removal of ablated neurons across layers (``torch.fx``).
* :mod:`~srigl.condensed.convert`: :func:`condense` copies a model, removes ablated neurons together
  with the next layer's matching inputs where the graph allows it, swaps every constant fan-in layer
  for its condensed twin and returns the condensed model (with ``return_report=True`` also a
  plain-dict report).
* :mod:`~srigl.condensed.twins`: conversion between masked-dense and compact form for compact
  training (:func:`~srigl.condensed.twins.from_masked_dense`,
  :func:`~srigl.condensed.twins.to_masked_dense`).
"""

from srigl.condensed.attention import CondensedMultiheadAttention, masked_dense_twin, why_attention_not_condensable
from srigl.condensed.convert import condense
from srigl.condensed.layers import CONDENSERS, CondensedConv2d, CondensedLinear, register_condenser
from srigl.condensed.tensor import CondensedTensor, condense_tensor, constant_fan_in
from srigl.errors import MaskError

__all__ = [
    "CONDENSERS",
    "CondensedConv2d",
    "CondensedLinear",
    "CondensedMultiheadAttention",
    "CondensedTensor",
    "MaskError",
    "condense",
    "condense_tensor",
    "constant_fan_in",
    "masked_dense_twin",
    "register_condenser",
    "why_attention_not_condensable",
]
