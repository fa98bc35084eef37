"""ONNX export of (condensed) models.

torch 2.13's ``torch.onnx.export`` defaults to the dynamo exporter (``dynamo=True``: torch.export,
then onnxscript's aten-to-ONNX translation), and that is the path used here; the TorchScript
exporter (``dynamo=False``) is deprecated. While torch.export traces, ``torch.compiler.is_exporting()``
is True and the condensed layers compute their product in plain aten ops instead of calling srigl's
compiled kernel, so the file runs in any ONNX runtime with no custom operator. How they compute it is
the export's ``layout`` (:mod:`srigl.condensed.exported`): ``"matmul"`` (default) stores the
condensed weights and expands them with a ``ScatterElements`` that onnxruntime folds at load, then
runs an ordinary ``MatMul`` / ``Conv`` (dense speed, fewer rows where neurons were ablated);
``"gather"`` runs ``Gather`` -> ``Mul`` -> ``ReduceSum`` on the condensed weights (never expanded,
much slower).

The exported graph reads no range check of srigl's: onnxruntime wraps a negative index around
(-5 reads input 59 of 64) where eager inference refuses it. So every condensed layer's storage is
checked (:meth:`~srigl.condensed.layers.CondensedLinear.check_storage`) before anything is traced.

onnx/onnxscript are imported by torch inside ``torch.onnx.export``; :func:`export_onnx` first asks
:func:`srigl._optional.require` for both, so a missing one reads as MissingDependencyError naming
``pip install 'srigl[export]'`` rather than torch's traceback. Nothing is imported here at module
import time beyond torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from srigl._optional import require
from srigl.errors import SriglError

__all__ = ["export_onnx"]


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    layout: str = "matmul",
) -> Path:
    """Export ``model`` (in eval mode) to a self-contained ONNX file.

    Args:
        model: a model, typically the output of :func:`srigl.condense`.
        example_input: one input tensor, or a tuple of them for a model with several inputs; the
            first dimension of each is the batch (any size, 1 included).
        path: destination ``.onnx`` file (weights embedded, no external data file).
        dynamic_batch: let the batch dimension vary at run time. Inputs are named ``"input"``
            (one) or ``"input_0"``, ``"input_1"``, ... (several).
        opset_version: ONNX opset; torch's default when None.
        layout: how condensed layers are written, ``"matmul"`` or ``"gather"`` (see
            :mod:`srigl.condensed.exported`). Both files hold only the condensed weights;
            ``"matmul"`` runs at the runtime's dense speed over the active neurons and holds the
            expanded weights in the runtime's memory, ``"gather"`` never expands them and is much
            slower.

    Returns:
        The path written.

    Raises:
        FanInOperandError, IndexOutOfRangeError: a condensed layer's indices or active rows are
            out of range, repeated or misshapen (the message names the layer); nothing is written.
        MissingDependencyError: onnx or onnxscript is not installed.
        ValueError: ``layout`` is neither ``"matmul"`` nor ``"gather"``.
    """
    for package in ("onnx", "onnxscript"):  # torch imports both inside torch.onnx.export
        require(package, "srigl.export_onnx")
    from srigl.condensed.exported import EXPORT_LAYOUTS, using_export_layout
    from srigl.condensed.layers import _CondensedLayer

    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, EXPORT_LAYOUTS))}, got {layout!r}")

    for name, module in model.named_modules():
        if isinstance(module, _CondensedLayer):
            try:
                module.check_storage()
            except SriglError as error:
                raise type(error)(f"{name or 'the root'}: {error}") from None
    path = Path(path)
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in inputs):
        raise TypeError(f"example_input must be a tensor or a tuple of tensors with a batch dimension, got {example_input!r:.80}")
    if dynamic_batch and any(x.shape[0] == 1 for x in inputs):
        # torch.export specialises a dimension of size 1 ("Invalid ranges [2:1]" for a dynamic
        # batch): trace with the example repeated to batch 2; the graph is the same for any batch.
        inputs = tuple(x.expand(2, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x for x in inputs)
    names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    was_training = model.training
    model.eval()
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} for _ in inputs) if dynamic_batch else None
    try:
        with using_export_layout(layout):
            program = torch.onnx.export(
                model,
                inputs,
                dynamo=True,
                input_names=names,
                output_names=["output"],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset_version,
                verbose=False,
            )
    finally:
        model.train(was_training)
    program.save(str(path), external_data=False)
    return path
