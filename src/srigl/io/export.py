"""ONNX export of (condensed) models.

torch 2.13's ``torch.onnx.export`` defaults to the dynamo exporter (``dynamo=True``: torch.export,
then onnxscript's aten-to-ONNX translation), and that is the path used here; the TorchScript
exporter (``dynamo=False``) is deprecated. While torch.export traces, ``torch.compiler.is_exporting()``
is True and the condensed layers compute their fan-in matmul as plain ``index_select -> mul -> sum``
(ONNX ``Gather``, ``Mul``, ``ReduceSum``) instead of calling srigl's compiled kernel, so the file
runs in any ONNX runtime with no custom operator. Convolutions export their ``F.unfold`` as ONNX
ops as well.

The exported ``Gather`` reads no range check of srigl's: onnxruntime wraps a negative index around
(-5 reads input 59 of 64) where eager inference refuses it. So every condensed layer's storage is
checked (:meth:`~srigl.condensed.layers.CondensedLinear.check_storage`) before anything is traced.

onnx/onnxscript are imported by torch inside ``torch.onnx.export``; nothing is imported here at
module import time beyond torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from srigl.errors import SriglError

__all__ = ["export_onnx"]


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
) -> Path:
    """Export ``model`` (in eval mode) to a self-contained ONNX file.

    Args:
        model: a model, typically the output of :func:`srigl.condense`.
        example_input: one input tensor; its first dimension is the batch.
        path: destination ``.onnx`` file (weights embedded, no external data file).
        dynamic_batch: let the batch dimension vary at run time (input name ``"input"``).
        opset_version: ONNX opset; torch's default when None.

    Returns:
        The path written.

    Raises:
        FanInOperandError, IndexOutOfRangeError: a condensed layer's indices or active rows are
            out of range, repeated or misshapen (the message names the layer); nothing is written.
    """
    from srigl.condensed.layers import _CondensedLayer

    for name, module in model.named_modules():
        if isinstance(module, _CondensedLayer):
            try:
                module.check_storage()
            except SriglError as error:
                raise type(error)(f"{name or 'the root'}: {error}") from None
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        program = torch.onnx.export(
            model,
            (example_input,),
            dynamo=True,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset_version,
            verbose=False,
        )
    finally:
        model.train(was_training)
    program.save(str(path), external_data=False)
    return path
